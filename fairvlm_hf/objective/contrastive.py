"""Per-pair CLIP loss with the global batch as negatives, and the per-pair cosine.

The loss of pair ``i`` is the mean of its image-to-text and text-to-image cross-entropies,
returned per pair (no reduction) so that bad-pair mining can weight it and the group regulariser
can compare its distribution across groups. Its mean over one process equals ``CLIPModel``'s
own loss. Under several processes each rank scores its local rows against the features of every
rank (open_clip's ``local_loss=True, gather_with_grad=True``), so the negatives are the global
batch and one process with batch ``W * B`` gives the same losses as ``W`` processes with ``B``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fairvlm_hf.objective.distributed import all_gather_with_grad, rank


def _check_embeddings(image_embeds: Tensor, text_embeds: Tensor) -> None:
    if image_embeds.dim() != 2 or text_embeds.dim() != 2:
        raise ValueError(
            "image_embeds and text_embeds must be 2-D (batch, dim), got shapes "
            f"{tuple(image_embeds.shape)} and {tuple(text_embeds.shape)}"
        )
    if image_embeds.shape != text_embeds.shape:
        raise ValueError(
            "image_embeds and text_embeds must have the same shape, got "
            f"{tuple(image_embeds.shape)} and {tuple(text_embeds.shape)}"
        )
    if image_embeds.shape[0] == 0:
        raise ValueError("image_embeds and text_embeds hold no pairs (batch size 0)")


def pairwise_clip_loss(
    image_embeds: Tensor, text_embeds: Tensor, logit_scale: Tensor | float
) -> Tensor:
    """Per-pair symmetric contrastive loss ``l_i`` for the local rows, shape ``(B_local,)``.

    Args:
        image_embeds: ``(B, D)`` L2-normalised image embeddings of this rank.
        text_embeds: ``(B, D)`` L2-normalised text embeddings of this rank (row ``i`` pairs with
            image row ``i``).
        logit_scale: the temperature already exponentiated (``CLIPModel.logit_scale.exp()``).

    With ``W`` processes the features of every rank are gathered with their gradients, the
    logits of the local rows are ``tau * U_local @ V_all^T`` and ``tau * V_local @ U_all^T``, and
    the target of local row ``i`` is ``rank * B + i``; every rank must hold the same ``B``.
    ``l_i = (CE_image_i + CE_text_i) / 2``, computed in float32.
    """
    _check_embeddings(image_embeds, text_embeds)
    if isinstance(logit_scale, Tensor) and logit_scale.numel() != 1:
        raise ValueError(
            f"logit_scale must be a scalar, got a tensor of shape {tuple(logit_scale.shape)}"
        )
    image = image_embeds.float()
    text = text_embeds.float()
    scale = logit_scale.float().reshape(()) if isinstance(logit_scale, Tensor) else logit_scale
    all_image = all_gather_with_grad(image)
    all_text = all_gather_with_grad(text)
    batch = image.shape[0]
    labels = torch.arange(batch, device=image.device) + rank() * batch
    logits_per_image = scale * image @ all_text.T
    logits_per_text = scale * text @ all_image.T
    loss_image = F.cross_entropy(logits_per_image, labels, reduction="none")
    loss_text = F.cross_entropy(logits_per_text, labels, reduction="none")
    return (loss_image + loss_text) / 2


def pair_cosine(image_embeds: Tensor, text_embeds: Tensor) -> Tensor:
    """Cosine similarity of each image with its own text, shape ``(B,)``.

    This is the ``similarity`` fairness target: one number per pair (not FairCLIP's
    ``diag(L @ L)`` of the logit matrix). The inputs need not be normalised.
    """
    _check_embeddings(image_embeds, text_embeds)
    return F.cosine_similarity(image_embeds.float(), text_embeds.float(), dim=-1)
