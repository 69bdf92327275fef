"""Pytree key paths as plain names: one spelling for dict keys, NamedTuple fields and
sequence indices, the same for a live pytree and orbax's metadata of a saved one."""

from typing import Any

import jax


def path_names(path) -> tuple[str, ...]:
  """A key path (``jax.tree_util.tree_flatten_with_path``) as a tuple of plain names."""
  return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def map_with_names(fn, tree: Any, *rest: Any) -> Any:
  """``jax.tree.map`` whose ``fn`` also gets the leaf's ``path_names`` as first argument."""
  return jax.tree_util.tree_map_with_path(lambda p, *x: fn(path_names(p), *x), tree, *rest)
