"""The UniTSFace loss family as pure functions of cosines, labels, biases and masks.

Sample-to-class losses take cosines to the class centres W, sample-to-sample losses take
cosines to the memory bank M; all return per-sample losses [B] computed in fp32. No state and
no sharding here: the class-sharded head (``unitsface_jax.head``) reuses the same arithmetic
through ``class_axis``.
"""

from unitsface_jax.losses.memory import last_occurrence
from unitsface_jax.losses.memory import write_memory
from unitsface_jax.losses.cosine import cosine_similarity
from unitsface_jax.losses.margin import adaface
from unitsface_jax.losses.margin import adaface_statistics
from unitsface_jax.losses.margin import combined_margin
from unitsface_jax.losses.margin import curricular_t
from unitsface_jax.losses.margin import curricularface
from unitsface_jax.losses.margin import feature_norm
from unitsface_jax.losses.margin import magface
from unitsface_jax.losses.objective import unitsface_objective
from unitsface_jax.losses.sample_to_class import arcface
from unitsface_jax.losses.sample_to_class import cosface
from unitsface_jax.losses.sample_to_class import initial_bce_bias
from unitsface_jax.losses.sample_to_class import normalized_bce
from unitsface_jax.losses.sample_to_class import uce
from unitsface_jax.losses.sample_to_sample import init_threshold_bias
from unitsface_jax.losses.sample_to_sample import s2s_bce
from unitsface_jax.losses.sample_to_sample import s2s_softmax
from unitsface_jax.losses.sample_to_sample import threshold_bias_for_step
from unitsface_jax.losses.sample_to_sample import uss

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
    "s2s_bce",
    "s2s_softmax",
    "threshold_bias_for_step",
    "uce",
    "unitsface_objective",
    "uss",
    "write_memory",
]
