"""The DSpark objective against direct, unchunked computations of every term."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from dspark_core.errors import DraftConfigError
from dspark_core.modeling.loss import (
    ECE_NUM_BINS,
    DSparkLossConfig,
    DSparkObjectiveOutput,
    dspark_objective,
    slot_weights,
)

M, B, H, V, R = 6, 5, 12, 50, 4


@dataclass
class Batch:
    draft_hidden: Tensor
    markov_latent: Tensor | None
    teacher_hidden: Tensor
    lm_head_weight: Tensor
    markov_w2_weight: Tensor | None
    labels: Tensor
    eval_mask: Tensor
    confidence_logits: Tensor | None

    def leaves(self) -> dict[str, Tensor]:
        """The tensors gradients must reach (those that require grad)."""
        named = {
            "draft_hidden": self.draft_hidden,
            "markov_latent": self.markov_latent,
            "lm_head_weight": self.lm_head_weight,
            "markov_w2_weight": self.markov_w2_weight,
            "confidence_logits": self.confidence_logits,
        }
        return {k: v for k, v in named.items() if v is not None and v.requires_grad}

    def kwargs(self) -> dict[str, Tensor | None]:
        return {
            "draft_hidden": self.draft_hidden,
            "markov_latent": self.markov_latent,
            "teacher_hidden": self.teacher_hidden,
            "lm_head_weight": self.lm_head_weight,
            "markov_w2_weight": self.markov_w2_weight,
            "labels": self.labels,
            "eval_mask": self.eval_mask,
            "confidence_logits": self.confidence_logits,
        }


def prefix_mask(lengths: list[int], block_size: int = B) -> Tensor:
    return torch.arange(block_size)[None, :] < torch.tensor(lengths)[:, None]


def make_batch(
    *,
    markov: bool = True,
    confidence: bool = True,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    lengths: list[int] | None = None,
    lm_head_grad: bool = False,
) -> Batch:
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0) -> Tensor:
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    draft = randn(M, B, H)
    # The teacher is near the draft so alpha spreads over (0, 1) rather than sitting near 0.
    teacher = (draft.double() + torch.randn(M, B, H, generator=gen, dtype=torch.float64) * 0.7).to(dtype)
    lengths = lengths if lengths is not None else [5, 3, 0, 1, 5, 2]
    return Batch(
        draft_hidden=draft.requires_grad_(),
        markov_latent=randn(M, B, R).requires_grad_() if markov else None,
        teacher_hidden=teacher,
        lm_head_weight=randn(V, H, scale=0.6).requires_grad_(lm_head_grad),
        markov_w2_weight=randn(V, R, scale=0.5).requires_grad_() if markov else None,
        labels=torch.randint(0, V, (M, B), generator=gen),
        eval_mask=prefix_mask(lengths),
        confidence_logits=randn(M, B, scale=1.5).requires_grad_() if confidence else None,
    )


def direct(batch: Batch, config: DSparkLossConfig, softcap: float | None = None) -> dict[str, Tensor]:
    """The objective written out in full: [M, B, V] logits, no gathering, no chunking."""

    def capped(logits: Tensor) -> Tensor:
        return logits if softcap is None else softcap * torch.tanh(logits / softcap)

    logits = capped(batch.draft_hidden @ batch.lm_head_weight.T)
    if batch.markov_latent is not None and batch.markov_w2_weight is not None:
        logits = logits + batch.markov_latent @ batch.markov_w2_weight.T
    teacher_logits = capped(batch.teacher_hidden @ batch.lm_head_weight.T).detach()
    ce = -torch.log_softmax(logits, dim=-1).gather(-1, batch.labels[..., None]).squeeze(-1)
    d = (torch.softmax(logits, dim=-1) - torch.softmax(teacher_logits, dim=-1)).abs().sum(-1)
    alpha = (1 - d / 2).clamp(0, 1)
    gamma = config.decay_gamma
    w = torch.tensor(
        [
            [
                float(batch.eval_mask[n, k]) * (1.0 if gamma is None else math.exp(-k / gamma))
                for k in range(B)
            ]
            for n in range(M)
        ],
        dtype=logits.dtype,
    )
    den = w.sum()
    terms = {"ce": (w * ce).sum() / den, "l1": (w * d).sum() / den}
    if batch.confidence_logits is not None:
        bce = F.binary_cross_entropy_with_logits(batch.confidence_logits, alpha.detach(), reduction="none")
        terms["confidence"] = (w * bce).sum() / den
    else:
        terms["confidence"] = torch.zeros((), dtype=logits.dtype)
    terms["loss"] = (
        config.ce_weight * terms["ce"]
        + config.l1_weight * terms["l1"]
        + config.confidence_weight * terms["confidence"]
    )
    terms["alpha"] = alpha.detach()
    return terms


def run(batch: Batch, config: DSparkLossConfig) -> DSparkObjectiveOutput:
    return dspark_objective(**batch.kwargs(), config=config)  # type: ignore[arg-type]


def grads(loss: Tensor, batch: Batch) -> dict[str, Tensor]:
    leaves = batch.leaves()
    values = torch.autograd.grad(loss, list(leaves.values()))
    return dict(zip(leaves, values, strict=True))


def assert_grads_close(
    got: dict[str, Tensor], want: dict[str, Tensor], *, rtol: float | None = None, atol: float | None = None
) -> None:
    assert got.keys() == want.keys()
    for name in got:
        torch.testing.assert_close(got[name], want[name], rtol=rtol, atol=atol, msg=f"gradient of {name}")


@pytest.mark.parametrize("markov", [True, False], ids=["markov", "no-markov"])
@pytest.mark.parametrize("confidence", [True, False], ids=["conf", "no-conf"])
@pytest.mark.parametrize("gamma", [4.0, 1.5, None], ids=["gamma4", "gamma1.5", "no-decay"])
def test_terms_and_gradients_match_direct_computation(
    markov: bool, confidence: bool, gamma: float | None
) -> None:
    batch = make_batch(markov=markov, confidence=confidence)
    config = DSparkLossConfig(decay_gamma=gamma)
    out = run(batch, config)
    ref = direct(batch, config)

    for name in ("ce", "l1", "confidence"):
        torch.testing.assert_close(getattr(out, name), ref[name].detach(), msg=name)
        assert not getattr(out, name).requires_grad
    torch.testing.assert_close(out.loss, ref["loss"])
    assert ref["l1"] > 0.1 and ref["ce"] > 0.1  # the case is not degenerate
    if confidence:
        assert ref["confidence"] > 0.1
    assert_grads_close(grads(out.loss, batch), grads(ref["loss"], batch))


@pytest.mark.parametrize("markov", [True, False], ids=["markov", "no-markov"])
@pytest.mark.parametrize("chunk_size", [3, None], ids=["chunked", "whole"])
def test_logit_softcap_matches_direct_computation(markov: bool, chunk_size: int | None) -> None:
    """Gemma's final_logit_softcapping: cap * tanh(z / cap) on the lm_head logits of draft and
    teacher, the Markov term added after it; terms and every gradient (lm_head's included)."""
    batch = make_batch(markov=markov, lm_head_grad=True)
    config = DSparkLossConfig(chunk_size=chunk_size)
    cap = 1.5  # small enough that tanh bends the logits of this batch
    out = dspark_objective(**batch.kwargs(), config=config, logit_softcap=cap)  # type: ignore[arg-type]
    ref = direct(batch, config, softcap=cap)
    uncapped = direct(batch, config)
    for name in ("ce", "l1", "confidence"):
        torch.testing.assert_close(getattr(out, name), ref[name].detach(), msg=name)
    assert abs(float(ref["l1"].detach()) - float(uncapped["l1"].detach())) > 1e-3  # the cap matters
    assert_grads_close(grads(out.loss, batch), grads(ref["loss"], batch))


def test_custom_term_weights() -> None:
    batch = make_batch()
    config = DSparkLossConfig(ce_weight=0.7, l1_weight=0.0, confidence_weight=2.5)
    out = run(batch, config)
    ref = direct(batch, config)
    torch.testing.assert_close(out.loss, ref["loss"])
    torch.testing.assert_close(out.loss, 0.7 * out.ce + 2.5 * out.confidence)
    assert_grads_close(grads(out.loss, batch), grads(ref["loss"], batch))


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 1000])
def test_chunked_equals_unchunked(chunk_size: int) -> None:
    batch = make_batch(dtype=torch.float32, lm_head_grad=True)
    whole = run(batch, DSparkLossConfig(chunk_size=None))
    chunked = run(batch, DSparkLossConfig(chunk_size=chunk_size))
    for name in ("loss", "ce", "l1", "confidence"):
        torch.testing.assert_close(getattr(chunked, name), getattr(whole, name), msg=name)
    assert_grads_close(grads(chunked.loss, batch), grads(whole.loss, batch), rtol=1e-5, atol=1e-6)


def test_gradcheck_of_chunked_backward() -> None:
    """The closed-form backward agrees with finite differences (fp64, several chunks).

    Left out on purpose, because their gradient is not the derivative of the loss value that finite
    differences see: the confidence term (its target alpha is detached) and the lm_head weight (it
    also makes the detached teacher logits). ``test_trainable_lm_head_...`` covers the latter.
    """
    batch = make_batch(confidence=False)
    config = DSparkLossConfig(chunk_size=4)

    def loss(hidden: Tensor, latent: Tensor, w2: Tensor) -> Tensor:
        return dspark_objective(
            draft_hidden=hidden,
            markov_latent=latent,
            teacher_hidden=batch.teacher_hidden,
            lm_head_weight=batch.lm_head_weight,
            markov_w2_weight=w2,
            labels=batch.labels,
            eval_mask=batch.eval_mask,
            confidence_logits=None,
            config=config,
        ).loss

    inputs = (batch.draft_hidden, batch.markov_latent, batch.markov_w2_weight)
    assert torch.autograd.gradcheck(loss, inputs)  # type: ignore[arg-type]


def test_slot_weights_decay_explicit() -> None:
    mask = prefix_mask([5, 3, 0])
    weights = slot_weights(mask, 4.0, dtype=torch.float64)
    for n, length in enumerate([5, 3, 0]):
        for k in range(B):
            assert weights[n, k].item() == pytest.approx(math.exp(-k / 4.0) if k < length else 0.0, rel=1e-12)
    assert weights[0, 4].item() == pytest.approx(math.exp(-1.0))
    torch.testing.assert_close(slot_weights(mask, None), mask.float())
    torch.testing.assert_close(slot_weights(mask, math.inf), mask.float())


def test_no_decay_is_plain_mean_over_supervised_slots() -> None:
    batch = make_batch()
    out = run(batch, DSparkLossConfig(decay_gamma=None))
    ref = direct(batch, DSparkLossConfig(decay_gamma=None))
    mask = batch.eval_mask
    assert batch.markov_latent is not None and batch.markov_w2_weight is not None
    logits = batch.draft_hidden @ batch.lm_head_weight.T + batch.markov_latent @ batch.markov_w2_weight.T
    ce = F.cross_entropy(logits[mask], batch.labels[mask])  # mean over the masked slots
    torch.testing.assert_close(out.ce, ce.detach())
    # Decay changes the weighting, so with a slot-dependent term the values must differ.
    decayed = run(batch, DSparkLossConfig(decay_gamma=1.0))
    assert not torch.allclose(decayed.ce, out.ce)
    torch.testing.assert_close(out.l1, ref["l1"].detach())


def test_frozen_lm_head_gets_no_gradient() -> None:
    batch = make_batch(dtype=torch.float32)
    assert not batch.lm_head_weight.requires_grad
    out = run(batch, DSparkLossConfig(chunk_size=5))
    torch.autograd.backward(out.loss)
    assert batch.lm_head_weight.grad is None
    for name, leaf in batch.leaves().items():
        assert leaf.grad is not None and leaf.grad.abs().sum() > 0, name


def test_trainable_lm_head_gets_draft_path_gradient_only() -> None:
    batch = make_batch(lm_head_grad=True)
    config = DSparkLossConfig(chunk_size=5)
    got = grads(run(batch, config).loss, batch)
    want = grads(direct(batch, config)["loss"], batch)
    assert_grads_close(got, want)


def test_unsupervised_slots_do_not_matter() -> None:
    batch = make_batch()
    config = DSparkLossConfig(chunk_size=3)
    out = run(batch, config)
    got = grads(out.loss, batch)
    off = ~batch.eval_mask

    noisy = make_batch(seed=1)
    with torch.no_grad():
        for name in ("draft_hidden", "markov_latent", "teacher_hidden", "confidence_logits"):
            tensor = getattr(batch, name).detach().clone()
            tensor[off] = getattr(noisy, name).detach()[off] * 100
            setattr(noisy, name, tensor.requires_grad_(name != "teacher_hidden"))
    noisy.lm_head_weight = batch.lm_head_weight
    noisy.markov_w2_weight = batch.markov_w2_weight
    noisy.labels = batch.labels.masked_fill(off, -100)  # never read off the mask
    again = run(noisy, config)
    for name in ("loss", "ce", "l1", "confidence"):
        torch.testing.assert_close(getattr(again, name), getattr(out, name), msg=name)
    assert got["draft_hidden"][off].abs().max() == 0
    assert got["confidence_logits"][off].abs().max() == 0


def test_empty_mask_gives_zero_loss_and_zero_gradients() -> None:
    batch = make_batch(lengths=[0] * M)
    out = run(batch, DSparkLossConfig())
    assert out.loss.item() == 0.0 and out.ce.item() == 0.0 and out.confidence.item() == 0.0
    got = grads(out.loss, batch)
    for name, grad in got.items():
        assert torch.isfinite(grad).all() and grad.abs().max() == 0, name
    num, den = out.diagnostics["tau_proxy"]
    assert num.item() == 0.0 and den.item() == 0.0


def test_diagnostics_match_direct_computation() -> None:
    batch = make_batch(seed=3)
    out = run(batch, DSparkLossConfig(chunk_size=4))
    alpha = direct(batch, DSparkLossConfig())["alpha"]
    mask = batch.eval_mask

    expected_keys = {f"alpha@{k}" for k in range(B)} | {"tau_proxy", "confidence_ece", "confidence_bias"}
    assert set(out.diagnostics) == expected_keys
    for num, den in out.diagnostics.values():
        assert num.dtype == den.dtype == torch.float64 and num.dim() == den.dim() == 0

    for k in range(B):
        num, den = out.diagnostics[f"alpha@{k}"]
        assert den.item() == mask[:, k].sum().item()
        assert num.item() == pytest.approx(alpha[:, k][mask[:, k]].sum().item(), rel=1e-9, abs=1e-12)

    taus = []
    for n in range(M):
        if not mask[n, 0]:
            continue
        total, run_product = 1.0, 1.0
        for k in range(B):
            run_product *= alpha[n, k].item() if mask[n, k] else 0.0
            total += run_product
        taus.append(total)
    num, den = out.diagnostics["tau_proxy"]
    assert den.item() == len(taus) == 5
    assert num.item() == pytest.approx(sum(taus), rel=1e-9)

    assert batch.confidence_logits is not None
    prob = torch.sigmoid(batch.confidence_logits.detach())[mask].tolist()
    target = alpha[mask].tolist()
    gaps = [0.0] * ECE_NUM_BINS
    for c, a in zip(prob, target, strict=True):
        gaps[min(int(c * ECE_NUM_BINS), ECE_NUM_BINS - 1)] += c - a
    num, den = out.diagnostics["confidence_ece"]
    assert den.item() == len(prob)
    assert num.item() == pytest.approx(sum(abs(g) for g in gaps), rel=1e-9)
    num, den = out.diagnostics["confidence_bias"]
    assert den.item() == len(prob)
    assert num.item() == pytest.approx(sum(prob) - sum(target), rel=1e-9, abs=1e-12)


def test_diagnostics_without_confidence_head() -> None:
    out = run(make_batch(confidence=False), DSparkLossConfig())
    assert set(out.diagnostics) == {f"alpha@{k}" for k in range(B)} | {"tau_proxy"}
    assert out.confidence.item() == 0.0


def test_tau_is_one_plus_valid_slots_when_draft_equals_teacher() -> None:
    lengths = [5, 3, 0, 1, 5, 2]
    batch = make_batch(markov=False, lengths=lengths)
    batch.teacher_hidden = batch.draft_hidden.detach().clone()
    out = run(batch, DSparkLossConfig())
    assert out.l1.item() == pytest.approx(0.0, abs=1e-12)
    num, den = out.diagnostics["tau_proxy"]
    valid = [n for n in lengths if n > 0]
    assert den.item() == len(valid)
    assert num.item() == pytest.approx(sum(1 + n for n in valid), rel=1e-12)
    for k in range(B):
        num, den = out.diagnostics[f"alpha@{k}"]
        assert num.item() == pytest.approx(den.item(), rel=1e-12)


def test_bf16_inputs_are_computed_in_fp32() -> None:
    batch = make_batch(dtype=torch.bfloat16)
    out = run(batch, DSparkLossConfig(chunk_size=4))
    assert out.loss.dtype == out.ce.dtype == torch.float32

    upcast = make_batch(dtype=torch.bfloat16)
    for name, value in upcast.kwargs().items():
        if value is not None and value.is_floating_point():
            setattr(upcast, name, value.detach().float().requires_grad_(value.requires_grad))
    ref = direct(upcast, DSparkLossConfig())
    torch.testing.assert_close(out.loss, ref["loss"], rtol=1e-5, atol=1e-6)

    got = grads(out.loss, batch)
    want = grads(ref["loss"], upcast)
    for name in got:
        assert got[name].dtype == torch.bfloat16
        # bf16 keeps ~3 significant digits; the comparison is only against rounding of the result.
        torch.testing.assert_close(got[name].float(), want[name].bfloat16().float(), rtol=1e-2, atol=1e-4)


def test_config_defaults() -> None:
    config = DSparkLossConfig()
    assert (config.ce_weight, config.l1_weight, config.confidence_weight) == (0.1, 0.9, 1.0)
    assert config.decay_gamma == 4.0 and config.chunk_size == 4096
    assert DSparkLossConfig(decay_gamma=None, chunk_size=None).chunk_size is None


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("ce_weight", -0.1),
        ("l1_weight", -1.0),
        ("confidence_weight", float("nan")),
        ("ce_weight", float("inf")),
        ("decay_gamma", 0.0),
        ("decay_gamma", -4.0),
        ("decay_gamma", float("nan")),
        ("chunk_size", 0),
        ("chunk_size", -3),
        ("chunk_size", 2.5),
        ("chunk_size", True),
    ],
)
def test_config_validation_names_the_field(field: str, value: Any) -> None:
    with pytest.raises(DraftConfigError, match=field):
        replace(DSparkLossConfig(), **{field: value})


def test_input_validation() -> None:
    batch = make_batch()
    config = DSparkLossConfig()
    kwargs = batch.kwargs()
    bad_cases: list[tuple[dict[str, Tensor | None], str]] = [
        ({"markov_w2_weight": None}, "markov_latent and markov_w2_weight"),
        ({"teacher_hidden": batch.teacher_hidden[:, :2]}, "teacher_hidden"),
        ({"eval_mask": batch.eval_mask.long()}, "eval_mask"),
        ({"labels": batch.labels[:, :2]}, "labels"),
        ({"labels": batch.labels.masked_fill(batch.eval_mask, V)}, r"labels must lie in \[0, 50\)"),
        ({"markov_w2_weight": torch.zeros(V, R + 1, dtype=torch.float64)}, "markov_w2_weight"),
        ({"lm_head_weight": torch.zeros(V, H + 1, dtype=torch.float64)}, "lm_head_weight"),
    ]
    for change, message in bad_cases:
        with pytest.raises(ValueError, match=message):
            dspark_objective(**{**kwargs, **change}, config=config)  # type: ignore[arg-type]


def test_all_reduce_without_process_group_is_an_error() -> None:
    batch = make_batch()
    with pytest.raises(RuntimeError, match="not initialised"):
        dspark_objective(**batch.kwargs(), config=DSparkLossConfig(), all_reduce=True)  # type: ignore[arg-type]


def test_caller_autocast_does_not_change_the_objective() -> None:
    """Training runs the draft under bf16 autocast; the vocabulary terms must stay fp32."""
    config = DSparkLossConfig(chunk_size=4)
    plain = make_batch(dtype=torch.float32)
    reference = run(plain, config)
    reference_grads = grads(reference.loss, plain)
    under = make_batch(dtype=torch.float32)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        got = run(under, config)
    assert got.loss.dtype == torch.float32
    torch.testing.assert_close(got.loss, reference.loss)
    got_grads = grads(got.loss, under)
    for name, grad in reference_grads.items():
        torch.testing.assert_close(got_grads[name], grad, msg=name)
