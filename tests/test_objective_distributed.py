"""Cross-process gathers and the gradient bookkeeping of the full objective on 2 gloo processes.

Each rank minimises ``J_r = mean_local(w l) + lambda * R(all-gathered l)`` under DDP; the
gradients must equal those of ``mean_global(w l) + lambda * R`` computed by one process on the
global batch. The spawned interpreters import this module: keep its imports light.
"""

from __future__ import annotations

import math
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fairvlm_hf.objective.bad_pairs import BadPairMiner
from fairvlm_hf.objective.contrastive import pairwise_clip_loss
from fairvlm_hf.objective.distributed import (
    all_gather_no_grad,
    all_gather_with_grad,
    rank,
    world_size,
)
from fairvlm_hf.objective.group_ot import GroupSinkhorn

WORLD = 2
LOCAL_BATCH = 6
IN_DIM, EMBED_DIM = 5, 4
LAMBDA = 0.7
METHODS = ("sinkhorn", "exact_1d")


class Encoders(nn.Module):
    """A tiny linear 'CLIP': two projections and a learned log temperature."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.image = nn.Linear(IN_DIM, EMBED_DIM)
        self.text = nn.Linear(IN_DIM, EMBED_DIM)
        self.log_scale = nn.Parameter(torch.tensor(math.log(10.0)))

    def forward(self, images, texts):
        u = F.normalize(self.image(images), dim=-1)
        v = F.normalize(self.text(texts), dim=-1)
        return u, v, self.log_scale.exp()


def _global_batch():
    generator = torch.Generator().manual_seed(17)
    n = WORLD * LOCAL_BATCH
    return {
        "images": torch.randn(n, IN_DIM, generator=generator),
        "texts": torch.randn(n, IN_DIM, generator=generator),
        "sample_id": torch.randperm(n, generator=generator) + 100,
        "race": torch.tensor([0, 1, 2, 0, 1, 2, 0, 0, 1, -1, 2, 2]),
        "gender": torch.tensor([0, 1, 0, 1, 0, 1, 0, 1, 1, 1, 0, -1]),
    }


def _pair_weights(ids: torch.Tensor) -> torch.Tensor:
    """Fixed, detached per-pair weights (as the miner would give)."""
    return 0.5 + 0.5 * torch.cos(ids.double()).float()


def _objective(model, batch, method: str) -> torch.Tensor:
    """J on whatever batch this process holds (local rows under DDP, all rows alone)."""
    u, v, scale = model(batch["images"], batch["texts"])
    losses = pairwise_clip_loss(u, v, scale)
    robust = (_pair_weights(batch["sample_id"]) * losses).mean()
    values = all_gather_with_grad(losses)
    groups = {name: all_gather_no_grad(batch[name]) for name in ("race", "gender")}
    reg, _ = GroupSinkhorn(["race", "gender"], method=method)(values, groups)
    return robust + LAMBDA * reg


def _worker(rank_: int, store: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank_,
        world_size=WORLD,
        timeout=timedelta(seconds=60),
    )
    result: dict = {"rank": rank(), "world": world_size()}
    try:
        full = _global_batch()
        local = {k: v[rank_ * LOCAL_BATCH : (rank_ + 1) * LOCAL_BATCH] for k, v in full.items()}

        # gathers: rank order, and the backward of the differentiable one
        result["ids"] = all_gather_no_grad(local["sample_id"])
        x = torch.arange(3.0, requires_grad=True) + 10 * rank_
        x.retain_grad()
        gathered = all_gather_with_grad(x)
        coefficients = torch.arange(6.0) * (rank_ + 1)  # rank r weighs the gathered rows by r+1
        (gathered * coefficients).sum().backward()
        result["gathered"] = gathered.detach()
        result["gather_grad"] = x.grad.clone()
        try:
            all_gather_no_grad(torch.zeros(3 + rank_))
        except ValueError as error:
            result["shape_error"] = str(error)

        # the objective under DDP
        for method in METHODS:
            model = DistributedDataParallel(Encoders())
            _objective(model, local, method).backward()
            result[f"grads_{method}"] = [p.grad.clone() for p in model.module.parameters()]

        # bad-pair memory from gathered ids and losses is the same on every rank
        miner = BadPairMiner(warmup_epochs=1, threshold="mad", min_pairs=4)
        model = Encoders()
        with torch.no_grad():
            u, v, scale = model(local["images"], local["texts"])
            losses = pairwise_clip_loss(u, v, scale)
        miner.observe(all_gather_no_grad(local["sample_id"]), all_gather_no_grad(losses))
        miner.start_epoch(1)
        result["miner"] = miner.state_dict()
        torch.save(result, Path(out_dir) / f"{rank_}.pt")
    finally:
        dist.destroy_process_group()


def test_single_process_defaults():
    assert world_size() == 1 and rank() == 0
    x = torch.randn(4, 2, requires_grad=True)
    assert all_gather_with_grad(x) is x
    y = all_gather_no_grad(x)
    assert not y.requires_grad and torch.equal(y, x.detach())


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(str(tmp / "store"), str(tmp)), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.distributed
def test_gathers_in_rank_order_with_summed_gradients(two_ranks):
    full = _global_batch()
    for r, result in enumerate(two_ranks):
        assert result["rank"] == r and result["world"] == WORLD
        assert torch.equal(result["ids"], full["sample_id"])
        assert result["gathered"].tolist() == [0.0, 1.0, 2.0, 10.0, 11.0, 12.0]
        # d/dx_r of sum_q sum_j (q+1) * j * gathered_j: rows 3r..3r+2, summed over q = 0, 1
        rows = torch.arange(3.0) + 3 * r
        torch.testing.assert_close(result["gather_grad"], rows * (1 + 2))
        assert "same shape" in result["shape_error"] and "[(3,), (4,)]" in result["shape_error"]


@pytest.mark.distributed
@pytest.mark.parametrize("method", METHODS)
def test_ddp_gradients_equal_the_global_objective(two_ranks, method):
    model = Encoders()
    _objective(model, _global_batch(), method).backward()
    expected = [p.grad for p in model.parameters()]
    assert any(float(g.abs().max()) > 1e-3 for g in expected)
    for result in two_ranks:
        for got, want in zip(result[f"grads_{method}"], expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)

    # the regulariser matters: without it the gradients differ
    plain = Encoders()
    u, v, scale = plain(_global_batch()["images"], _global_batch()["texts"])
    losses = pairwise_clip_loss(u, v, scale)
    (_pair_weights(_global_batch()["sample_id"]) * losses).mean().backward()
    assert not all(
        torch.allclose(p.grad, g, atol=1e-5)
        for p, g in zip(plain.parameters(), expected, strict=True)
    )


@pytest.mark.distributed
def test_miner_state_is_identical_on_every_rank(two_ranks):
    first, second = (r["miner"] for r in two_ranks)
    assert first.keys() == second.keys()
    for key, value in first.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, second[key]), key
        else:
            assert value == second[key], key
    single = BadPairMiner(warmup_epochs=1, threshold="mad", min_pairs=4)
    full = _global_batch()
    with torch.no_grad():
        u, v, scale = Encoders()(full["images"], full["texts"])
        losses = pairwise_clip_loss(u, v, scale)
    single.observe(full["sample_id"], losses)
    single.start_epoch(1)
    mine = single.state_dict()
    torch.testing.assert_close(mine["buffer.hist_sum"], first["buffer.hist_sum"])
    assert torch.equal(mine["buffer.flags"], first["buffer.flags"])
