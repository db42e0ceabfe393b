"""Cross-rank normalisation of the DSpark objective under real DDP (2 CPU processes, gloo).

Each rank gets part of one fixed batch, with most supervised slots on rank 0. After DDP averages
the gradients they must equal the single-process gradient on the whole batch; per-rank
normalisation (``all_reduce=False``) must not, which shows the comparison can fail.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from spawn_ranks import spawn_ranks
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from dspark_core.modeling.loss import DSparkLossConfig, DSparkObjectiveOutput, dspark_objective

pytestmark = pytest.mark.slow  # two spawned interpreters importing torch: ~8 s on 2 cores

WORLD_SIZE = 2
M, B, FEATURES, H, R, V = 8, 4, 6, 10, 3, 40
# Rank 0 holds blocks 0..5 (20 supervised slots), rank 1 blocks 6..7 (1 slot): very uneven.
SPLIT = 6
LENGTHS = [4, 4, 3, 4, 1, 4, 1, 0]
CONFIG = DSparkLossConfig(chunk_size=3)
TIMEOUT_S = 120.0


class TinyDraft(nn.Module):
    """Stand-in for a draft: trainable maps to hidden, Markov latent and confidence; frozen lm_head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(FEATURES, H)
        self.markov = nn.Linear(FEATURES, R)
        self.markov_w2 = nn.Linear(R, V, bias=False)
        self.confidence = nn.Linear(H, 1)
        self.lm_head = nn.Linear(H, V, bias=False).requires_grad_(False)
        self.double()

    def forward(
        self, features: Tensor, teacher: Tensor, labels: Tensor, eval_mask: Tensor, **reduction: Any
    ) -> DSparkObjectiveOutput:
        hidden = torch.tanh(self.proj(features))
        return dspark_objective(
            draft_hidden=hidden,
            markov_latent=torch.tanh(self.markov(features)),
            teacher_hidden=teacher,
            lm_head_weight=self.lm_head.weight,
            markov_w2_weight=self.markov_w2.weight,
            labels=labels,
            eval_mask=eval_mask,
            confidence_logits=self.confidence(hidden).squeeze(-1),
            config=CONFIG,
            **reduction,
        )


def full_batch() -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(1)
    return {
        "features": torch.randn(M, B, FEATURES, generator=gen, dtype=torch.float64),
        "teacher": torch.randn(M, B, H, generator=gen, dtype=torch.float64),
        "labels": torch.randint(0, V, (M, B), generator=gen),
        "eval_mask": torch.arange(B)[None, :] < torch.tensor(LENGTHS)[:, None],
    }


def summarise(out: DSparkObjectiveOutput, model: nn.Module) -> dict[str, Any]:
    return {
        "loss": out.loss.detach(),
        "terms": {name: getattr(out, name) for name in ("ce", "l1", "confidence")},
        "diagnostics": out.diagnostics,
        "grads": {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None},
        "frozen_grad": model.lm_head.weight.grad,  # type: ignore[union-attr]
    }


def _worker(rank: int, store: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD_SIZE)
    try:
        rows = slice(0, SPLIT) if rank == 0 else slice(SPLIT, M)
        local = {name: value[rows] for name, value in full_batch().items()}
        group = dist.new_group([0, 1])
        modes: dict[str, dict[str, Any]] = {
            "default_group": {},
            "explicit_group": {"process_group": group},
            "per_rank": {"all_reduce": False},
        }
        results = {}
        for mode, reduction in modes.items():
            model = DistributedDataParallel(TinyDraft())
            out = model(**local, **reduction)
            torch.autograd.backward(out.loss)
            results[mode] = summarise(out, model.module)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_ranks(tmp_path: Path) -> list[dict[str, Any]]:
    return spawn_ranks(_worker, WORLD_SIZE, tmp_path, timeout_s=TIMEOUT_S)


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return run_ranks(tmp_path_factory.mktemp("dist"))


@pytest.fixture(scope="module")
def single() -> dict[str, Any]:
    model = TinyDraft()
    out = model(**full_batch())
    torch.autograd.backward(out.loss)
    return summarise(out, model)


@pytest.mark.parametrize("mode", ["default_group", "explicit_group"])
def test_ddp_gradient_equals_single_process_gradient(
    rank_results: list[dict[str, Any]], single: dict[str, Any], mode: str
) -> None:
    for result in rank_results:
        got = result[mode]["grads"]
        assert (
            got.keys()
            == single["grads"].keys()
            == {
                "proj.weight",
                "proj.bias",
                "markov.weight",
                "markov.bias",
                "markov_w2.weight",
                "confidence.weight",
                "confidence.bias",
            }
        )
        for name, grad in got.items():
            torch.testing.assert_close(grad, single["grads"][name], msg=name)
        assert result[mode]["frozen_grad"] is None


@pytest.mark.parametrize("mode", ["default_group", "explicit_group"])
def test_terms_and_diagnostics_equal_single_process(
    rank_results: list[dict[str, Any]], single: dict[str, Any], mode: str
) -> None:
    # Each rank's loss is its share times the world size; their mean is the global loss.
    mean_loss = sum(result[mode]["loss"] for result in rank_results) / WORLD_SIZE
    torch.testing.assert_close(mean_loss, single["loss"])
    for result in rank_results:
        for name, value in result[mode]["terms"].items():
            torch.testing.assert_close(value, single["terms"][name], msg=name)
        diagnostics = result[mode]["diagnostics"]
        assert diagnostics.keys() == single["diagnostics"].keys()
        for name, (num, den) in diagnostics.items():
            want_num, want_den = single["diagnostics"][name]
            torch.testing.assert_close(num, want_num, msg=name)
            torch.testing.assert_close(den, want_den, msg=name)


def test_per_rank_normalisation_would_fail(
    rank_results: list[dict[str, Any]], single: dict[str, Any]
) -> None:
    """The uneven split makes naive per-rank means differ from the global mean."""
    naive = rank_results[0]["per_rank"]
    assert not torch.allclose(naive["grads"]["markov_w2.weight"], single["grads"]["markov_w2.weight"])
    assert not torch.allclose(naive["grads"]["proj.weight"], single["grads"]["proj.weight"])
    assert not torch.allclose(naive["terms"]["ce"], single["terms"]["ce"])
