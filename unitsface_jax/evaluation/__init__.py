"""Face recognition evaluation: embedding extraction and the field's protocols.

Verification sets (insightface ``.bin``, LFW ``pairs.txt``), IJB-B/C (1:1 and 1:N) and
MegaFace Challenge 1, with reports (table, JSON, ROC PNG). The training loop calls
``load_sets(config.eval.bins)`` once and ``evaluate_sets(nnx_apply_fn(model), sets)`` at each
evaluation.
"""

from unitsface_jax.evaluation.extract import (batch_mesh, embed, extract_raw, l2_normalize,
                                              nnx_apply_fn)
from unitsface_jax.evaluation.metrics import roc, tar_at_far
from unitsface_jax.evaluation.verification import (UnsafePickleError, VerificationSet,
                                                   accuracies, evaluate_set, evaluate_sets,
                                                   kfold_accuracy, load_bin, load_pairs,
                                                   load_sets)

__all__ = ["UnsafePickleError", "VerificationSet", "accuracies", "batch_mesh", "embed",
           "evaluate_set", "evaluate_sets", "extract_raw", "kfold_accuracy", "l2_normalize",
           "load_bin", "load_pairs", "load_sets", "nnx_apply_fn", "roc", "tar_at_far"]
