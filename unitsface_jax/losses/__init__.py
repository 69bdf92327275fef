"""The UniTSFace loss family as pure functions of cosines, labels, biases and masks.

Each sample-to-class loss (cosines to the class centres W) is one file in ``s2c/``, each
sample-to-sample loss (cosines to the memory bank M) one file in ``s2s/``, registered by name
in ``registry`` with its options, state and checks; adding a loss is adding a file
(docs/design.md, "Adding a loss"). The functions below are their single-device forms: they
return per-sample losses [B] computed in fp32. No state and no sharding here: the
class-sharded head (``unitsface_jax.head``) runs the same arithmetic through the registry's
``per_sample`` with ``class_axis`` reductions over the devices.
"""

import sys
import types

from unitsface_jax.losses import class_axis
from unitsface_jax.losses import registry
from unitsface_jax.losses.cosine import cosine_similarity
from unitsface_jax.losses.cosine import feature_norm
from unitsface_jax.losses.memory import last_occurrence
from unitsface_jax.losses.memory import write_memory
from unitsface_jax.losses.objective import unitsface_objective
from unitsface_jax.losses.s2c import adaface as _adaface
from unitsface_jax.losses.s2c import arcface as _arcface
from unitsface_jax.losses.s2c import combined as _combined
from unitsface_jax.losses.s2c import curricularface as _curricularface
from unitsface_jax.losses.s2c import magface as _magface
from unitsface_jax.losses.s2c.adaface import adaface
from unitsface_jax.losses.s2c.adaface import adaface_statistics
from unitsface_jax.losses.s2c.arcface import arcface
from unitsface_jax.losses.s2c.combined import combined_margin
from unitsface_jax.losses.s2c.cosface import cosface
from unitsface_jax.losses.s2c.curricularface import curricular_t
from unitsface_jax.losses.s2c.curricularface import curricularface
from unitsface_jax.losses.s2c.magface import magface
from unitsface_jax.losses.s2c.normalized_bce import normalized_bce
from unitsface_jax.losses.s2c.uce import uce
from unitsface_jax.losses.s2s.s2s_bce import s2s_bce
from unitsface_jax.losses.s2s.s2s_softmax import s2s_softmax
from unitsface_jax.losses.s2s.uss import uss
from unitsface_jax.losses.threshold import init_threshold_bias
from unitsface_jax.losses.threshold import threshold_bias_for_step

initial_bce_bias = class_axis.initial_bce_bias

__all__ = [
    "adaface",
    "adaface_statistics",
    "arcface",
    "combined_margin",
    "cosface",
    "cosine_similarity",
    "curricular_t",
    "curricularface",
    "feature_norm",
    "init_threshold_bias",
    "initial_bce_bias",
    "last_occurrence",
    "magface",
    "normalized_bce",
    "registry",
    "s2s_bce",
    "s2s_softmax",
    "threshold_bias_for_step",
    "uce",
    "unitsface_objective",
    "uss",
    "write_memory",
]


def _module_path(name: str, doc: str, **members) -> types.ModuleType:
  """A module at ``unitsface_jax.losses.<name>`` holding ``members``: the two module paths of
  the layout before one file per loss that code still imports (``losses.margin``,
  ``losses.sample_to_class``)."""
  module = types.ModuleType(f"{__name__}.{name}", doc)
  module.__dict__.update(members)
  sys.modules[module.__name__] = module
  return module


margin = _module_path(
    "margin", "Former home of the margin losses; now losses/s2c/<loss>.py.",
    combined_margin_logits=_combined.combined_margin_logits, combined_margin=combined_margin,
    adaface_logits=_adaface.adaface_logits, adaface_statistics=adaface_statistics,
    adaface=adaface, ADAFACE_EPS=_adaface.ADAFACE_EPS,
    curricular_logits=_curricularface.curricular_logits, curricular_t=curricular_t,
    curricularface=curricularface, magface_logits=_magface.magface_logits,
    magface_margin=_magface.magface_margin, magface_regularizer=_magface.magface_regularizer,
    magface=magface, feature_norm=feature_norm)
sample_to_class = _module_path(
    "sample_to_class", "Former home of CosFace, ArcFace, normalized BCE and UCE.",
    arcface_logits=_arcface.arcface_logits, arcface=arcface, cosface=cosface,
    normalized_bce=normalized_bce, uce=uce, initial_bce_bias=initial_bce_bias)
