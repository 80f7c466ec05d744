"""The robust and fair objective in pure torch: contrastive loss, bad-pair mining, group OT."""

from fairvlm_hf.objective.bad_pairs import (
    CLEAN,
    FAULTY,
    KIND_NAMES,
    NOISY,
    BadPairMiner,
    fit_two_gaussians,
    median,
)
from fairvlm_hf.objective.contrastive import pair_cosine, pairwise_clip_loss
from fairvlm_hf.objective.distributed import (
    all_gather_no_grad,
    all_gather_with_grad,
    rank,
    world_size,
)
from fairvlm_hf.objective.group_ot import GroupSinkhorn, exact_1d_ot

__all__ = [
    "CLEAN",
    "FAULTY",
    "KIND_NAMES",
    "NOISY",
    "BadPairMiner",
    "GroupSinkhorn",
    "all_gather_no_grad",
    "all_gather_with_grad",
    "exact_1d_ot",
    "fit_two_gaussians",
    "median",
    "pair_cosine",
    "pairwise_clip_loss",
    "rank",
    "world_size",
]
