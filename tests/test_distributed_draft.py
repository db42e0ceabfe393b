"""The whole Qwen3 draft under DDP: 2 CPU processes over gloo, with fixed anchors.

The combined batch is split unevenly between the ranks (rank 1 has few supervised slots). After DDP
averages the gradients, every parameter's gradient must equal the single-process gradient on the
combined batch, both with the default process group and with one passed to ``forward``. Averaging
per-rank means instead (the naive normalisation) gives other gradients, so the comparison can fail.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from qwen3_draft_helpers import DraftBatch, make_draft, random_batch
from spawn_ranks import spawn_ranks
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from dspark_core.modeling.loss import DSparkObjective
from dspark_qwen3.modeling import Qwen3DSparkModel

pytestmark = pytest.mark.slow  # two spawned interpreters importing torch and transformers

WORLD_SIZE = 2
ROWS = 4
SEQ = 24
TIMEOUT_S = 180.0
ANCHORS = torch.tensor([[0, 5, 9, 16], [2, 8, 13, 20], [1, 6, 14, 0], [3, 10, 18, 21]])
KEEP = torch.tensor([[True] * 4, [True] * 4, [True, True, True, False], [True] * 4])
MODES = ("default_group", "explicit_group")


def combined_batch() -> tuple[DraftBatch, Tensor, Tensor]:
    batch = random_batch(ROWS, SEQ, seed=21)
    # Rank 0 (rows 0-1) is fully supervised; rank 1 (rows 2-3) only in short responses.
    batch.loss_mask[2] = 0
    batch.loss_mask[2, 6:9] = 1
    batch.loss_mask[3] = 0
    batch.loss_mask[3, 18:24] = 1
    return batch, ANCHORS, KEEP


def rank_rows(rank: int) -> slice:
    return slice(0, 2) if rank == 0 else slice(2, 4)


def new_model() -> Qwen3DSparkModel:
    return make_draft(seed=17, markov_head_type="rnn").train()


def gradients(model: torch.nn.Module) -> dict[str, Tensor | None]:
    return {name: None if p.grad is None else p.grad.clone() for name, p in model.named_parameters()}


def forward_backward(
    model: Any, batch: DraftBatch, anchors: Tensor, keep: Tensor, **kwargs: Any
) -> dict[str, Any]:
    module = model.module if isinstance(model, DistributedDataParallel) else model
    out = DSparkObjective(**kwargs)(module, model(*batch.args(), anchors=anchors, keep=keep))
    out.loss.backward()
    return {
        "loss": out.loss.detach(),
        "terms": {name: getattr(out, name).detach() for name in ("ce", "l1", "confidence")},
        "grads": gradients(module),
    }


def _worker(rank: int, store: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD_SIZE)
    try:
        batch, anchors, keep = combined_batch()
        rows = rank_rows(rank)
        local = DraftBatch(*(t[rows] for t in batch.args()))
        group = dist.new_group(list(range(WORLD_SIZE)))
        results = {}
        for mode in MODES:
            kwargs = {"process_group": group} if mode == "explicit_group" else {}
            ddp = DistributedDataParallel(new_model(), process_group=group)
            results[mode] = forward_backward(ddp, local, anchors[rows], keep[rows], **kwargs)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return spawn_ranks(_worker, WORLD_SIZE, tmp_path_factory.mktemp("ddp-draft"), timeout_s=TIMEOUT_S)


@pytest.fixture(scope="module")
def single() -> dict[str, Any]:
    assert not dist.is_initialized()
    batch, anchors, keep = combined_batch()
    return forward_backward(new_model(), batch, anchors, keep)


def assert_same_gradients(got: dict[str, Tensor | None], want: dict[str, Tensor | None]) -> None:
    assert got.keys() == want.keys()
    for name, grad in got.items():
        expected = want[name]
        if name in ("embed_tokens.weight", "lm_head.weight"):
            assert grad is None and expected is None, name
            continue
        assert grad is not None and expected is not None, name
        scale = float(expected.abs().max())
        assert scale > 0, name
        torch.testing.assert_close(grad, expected, atol=1e-5 * scale, rtol=1e-4, msg=name)


@pytest.mark.parametrize("mode", MODES)
def test_ddp_gradients_equal_single_process_gradients(
    rank_results: list[dict[str, Any]], single: dict[str, Any], mode: str
) -> None:
    for result in rank_results:
        assert_same_gradients(result[mode]["grads"], single["grads"])


@pytest.mark.parametrize("mode", MODES)
def test_terms_are_global_and_the_losses_average_to_the_single_process_loss(
    rank_results: list[dict[str, Any]], single: dict[str, Any], mode: str
) -> None:
    mean_loss = sum(result[mode]["loss"] for result in rank_results) / WORLD_SIZE
    torch.testing.assert_close(mean_loss, single["loss"], atol=1e-5, rtol=1e-5)
    for result in rank_results:
        for name, value in result[mode]["terms"].items():
            torch.testing.assert_close(value, single["terms"][name], atol=1e-5, rtol=1e-5, msg=name)


def test_per_rank_means_would_give_other_gradients(single: dict[str, Any]) -> None:
    """Sanity: averaging each rank's own normalised gradient (no cross-rank denominators) differs."""
    batch, anchors, keep = combined_batch()
    naive: dict[str, Tensor] = {}
    for rank in range(WORLD_SIZE):
        rows = rank_rows(rank)
        local = DraftBatch(*(t[rows] for t in batch.args()))
        grads = forward_backward(new_model(), local, anchors[rows], keep[rows])["grads"]
        for name, grad in grads.items():
            if grad is not None:
                naive[name] = naive.get(name, torch.zeros_like(grad)) + grad / WORLD_SIZE
    differs = [
        name
        for name, grad in naive.items()
        if not torch.allclose(grad, single["grads"][name], atol=1e-5 * float(grad.abs().max()), rtol=1e-4)
    ]
    assert "fc.weight" in differs and "markov_head.markov_w2.weight" in differs
