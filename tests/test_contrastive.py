"""Per-pair CLIP loss: CLIPModel's own loss, a hand-worked case, and global negatives on 2 ranks.

The two-process test spawns fresh interpreters that import this module: heavy imports (scipy,
sklearn, transformers) stay inside the tests that need them.
"""

from __future__ import annotations

import math
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from fairvlm_hf.objective.contrastive import pair_cosine, pairwise_clip_loss

WORLD = 2
LOCAL_BATCH = 4
IN_DIM, EMBED_DIM = 6, 5


def _tiny_clip():
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        text_config={
            "vocab_size": 64,
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 16,
        },
        vision_config={
            "image_size": 16,
            "patch_size": 8,
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
        },
        projection_dim=16,
    )
    torch.manual_seed(0)
    return CLIPModel(config).eval()


def test_mean_equals_clipmodel_loss_and_its_gradient():
    model = _tiny_clip()
    generator = torch.Generator().manual_seed(1)
    inputs = {
        "input_ids": torch.randint(2, 64, (6, 10), generator=generator),
        "pixel_values": torch.randn(6, 3, 16, 16, generator=generator),
    }
    out = model(**inputs, return_loss=True)
    ours = pairwise_clip_loss(out.image_embeds, out.text_embeds, model.logit_scale.exp())
    assert ours.shape == (6,)
    torch.testing.assert_close(ours.mean(), out.loss, rtol=0, atol=1e-6)

    grads_hf = torch.autograd.grad(out.loss, list(model.parameters()), retain_graph=True)
    grads_ours = torch.autograd.grad(ours.mean(), list(model.parameters()))
    for a, b in zip(grads_hf, grads_ours, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_hand_worked_orthonormal_case():
    # U = V = I_3, tau = 1: each row of the logits is (1, 0, 0) up to order, so
    # CE = -log(e / (e + 2)) in both directions and l_i = log(e + 2) - 1 for every pair.
    eye = torch.eye(3)
    losses = pairwise_clip_loss(eye, eye, torch.tensor(1.0))
    expected = math.log(math.e + 2) - 1
    torch.testing.assert_close(losses, torch.full((3,), expected))


def test_matches_independent_numpy_log_softmax():
    from scipy.special import logsumexp

    generator = torch.Generator().manual_seed(2)
    u = F.normalize(torch.randn(7, 4, generator=generator), dim=-1)
    v = F.normalize(torch.randn(7, 4, generator=generator), dim=-1)
    tau = 14.3
    losses = pairwise_clip_loss(u, v, torch.tensor(tau))
    logits = tau * u.double().numpy() @ v.double().numpy().T
    row = logsumexp(logits, axis=1) - np.diag(logits)
    col = logsumexp(logits, axis=0) - np.diag(logits)
    np.testing.assert_allclose(losses.numpy(), (row + col) / 2, rtol=1e-5)
    # and against F.cross_entropy on the two logit matrices
    lt = torch.tensor(logits)
    labels = torch.arange(7)
    ce = (
        F.cross_entropy(lt, labels, reduction="none")
        + F.cross_entropy(lt.T, labels, reduction="none")
    ) / 2
    torch.testing.assert_close(losses.double(), ce, rtol=1e-5, atol=1e-6)


def test_float_logit_scale_and_low_precision_inputs():
    u = F.normalize(torch.randn(5, 8), dim=-1)
    v = F.normalize(torch.randn(5, 8), dim=-1)
    ref = pairwise_clip_loss(u, v, torch.tensor(20.0))
    torch.testing.assert_close(pairwise_clip_loss(u, v, 20.0), ref)
    low = pairwise_clip_loss(u.bfloat16(), v.bfloat16(), torch.tensor(20.0))
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, ref, rtol=0.05, atol=0.05)


def test_pair_cosine_is_the_per_pair_cosine():
    from sklearn.metrics.pairwise import cosine_similarity

    generator = torch.Generator().manual_seed(3)
    u, v = torch.randn(6, 5, generator=generator), torch.randn(6, 5, generator=generator)
    expected = np.diag(cosine_similarity(u.numpy(), v.numpy()))
    np.testing.assert_allclose(pair_cosine(u, v).numpy(), expected, rtol=1e-5)
    un, vn = F.normalize(u, dim=-1), F.normalize(v, dim=-1)
    torch.testing.assert_close(pair_cosine(un, vn), (un @ vn.T).diagonal())


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="same shape"):
        pairwise_clip_loss(torch.randn(3, 4), torch.randn(2, 4), 1.0)
    with pytest.raises(ValueError, match="2-D"):
        pairwise_clip_loss(torch.randn(3), torch.randn(3), 1.0)
    with pytest.raises(ValueError, match="scalar"):
        pairwise_clip_loss(torch.randn(3, 4), torch.randn(3, 4), torch.ones(2))
    with pytest.raises(ValueError, match="same shape"):
        pair_cosine(torch.randn(3, 4), torch.randn(3, 5))


# ----------------------------------------------------------------------------- two processes
def _problem():
    """A global batch of 2B pairs and tiny linear encoders, identical in every process."""
    generator = torch.Generator().manual_seed(11)
    images = torch.randn(WORLD * LOCAL_BATCH, IN_DIM, generator=generator)
    texts = torch.randn(WORLD * LOCAL_BATCH, IN_DIM, generator=generator)
    torch.manual_seed(5)
    image_encoder = torch.nn.Linear(IN_DIM, EMBED_DIM)
    text_encoder = torch.nn.Linear(IN_DIM, EMBED_DIM)
    log_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    return images, texts, image_encoder, text_encoder, log_scale


def _losses(images, texts, image_encoder, text_encoder, log_scale):
    u = F.normalize(image_encoder(images), dim=-1)
    v = F.normalize(text_encoder(texts), dim=-1)
    return pairwise_clip_loss(u, v, log_scale.exp())


def _params(image_encoder, text_encoder, log_scale):
    return [*image_encoder.parameters(), *text_encoder.parameters(), log_scale]


def _worker(rank: int, store: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=WORLD,
        timeout=timedelta(seconds=60),
    )
    try:
        images, texts, image_encoder, text_encoder, log_scale = _problem()
        local = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        losses = _losses(images[local], texts[local], image_encoder, text_encoder, log_scale)
        losses.mean().backward()
        params = _params(image_encoder, text_encoder, log_scale)
        grads = []
        for p in params:  # what DDP does: average the gradients over ranks
            g = p.grad.clone()
            dist.all_reduce(g)
            grads.append(g / WORLD)
        torch.save({"losses": losses.detach(), "grads": grads}, Path(out_dir) / f"{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_processes_equal_one_process_with_the_global_batch(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=True)
    results = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(WORLD)]

    images, texts, image_encoder, text_encoder, log_scale = _problem()
    losses = _losses(images, texts, image_encoder, text_encoder, log_scale)
    losses.mean().backward()
    gathered = torch.cat([r["losses"] for r in results])
    torch.testing.assert_close(gathered, losses.detach(), rtol=1e-6, atol=1e-6)
    for rank_result in results:
        for got, p in zip(
            rank_result["grads"], _params(image_encoder, text_encoder, log_scale), strict=True
        ):
            torch.testing.assert_close(got, p.grad, rtol=1e-5, atol=1e-6)
    # the local-negatives loss (what CLIPModel computes on each rank) would differ
    half = _losses(images[:LOCAL_BATCH], texts[:LOCAL_BATCH], *_problem()[2:])
    assert not torch.allclose(half, losses[:LOCAL_BATCH].detach(), atol=1e-3)
