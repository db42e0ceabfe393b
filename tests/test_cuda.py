"""CUDA: the flex-attention training path (compiled ``BlockMask`` and kernel) against SDPA, in bf16.

Run with ``pytest -m cuda``; skipped without a CUDA device. The figures are printed (``-s`` shows
them): losses, relative gradient differences and the loss after one AdamW step, for both paths and
for an fp32 SDPA reference that shows the size of bf16 noise.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from qwen3_draft_helpers import DraftBatch, make_draft, random_batch
from torch import Tensor

from dspark_core.modeling.blocks import sample_anchors
from dspark_core.modeling.loss import DSparkObjective
from dspark_qwen3.modeling import Qwen3DSparkModel

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

SEQ = 300  # with N*B = 168 block queries: several 128-wide tiles in both dimensions
BLOCK = 7
ANCHORS = 24


def cuda_batch(dtype: torch.dtype, *, packed: bool) -> tuple[DraftBatch, Tensor, Tensor, Tensor | None]:
    batch = random_batch(2, SEQ, seed=31)
    batch.loss_mask[0, :40] = 0  # a prompt
    batch.loss_mask[1, 250:] = 0  # a response that ends before the row does
    documents = None
    if packed:
        documents = torch.zeros(2, SEQ, dtype=torch.long)
        documents[:, 100:] = 1
        documents[:, 220:] = 2
    anchors, keep = sample_anchors(
        batch.loss_mask, ANCHORS, document_ids=documents, generator=torch.Generator().manual_seed(0)
    )
    keep[1, -3:] = False  # and a few blocks that are not kept
    device = torch.device("cuda")
    moved = DraftBatch(
        batch.input_ids.to(device),
        batch.target_features.to(device, dtype),
        batch.target_final_hidden.to(device, dtype),
        batch.loss_mask.to(device),
    )
    docs = None if documents is None else documents.to(device)
    return moved, anchors.to(device), keep.to(device), docs


def training_step(
    model: Qwen3DSparkModel, attn: str, batch: DraftBatch, anchors: Tensor, keep: Tensor, docs: Tensor | None
) -> dict[str, Any]:
    model.config._attn_implementation = attn
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    out = DSparkObjective()(model, model(*batch.args(), anchors=anchors, keep=keep, document_ids=docs))
    out.loss.backward()
    grads = {name: p.grad.float().clone() for name, p in model.named_parameters() if p.grad is not None}
    optimizer.step()
    with torch.no_grad():
        after = DSparkObjective()(
            model, model(*batch.args(), anchors=anchors, keep=keep, document_ids=docs)
        ).loss
    torch.cuda.synchronize()
    return {
        "loss": float(out.loss.detach()),
        "ce": float(out.ce),
        "l1": float(out.l1),
        "confidence": float(out.confidence),
        "after": float(after),
        "grads": grads,
    }


def relative_difference(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    assert a.keys() == b.keys()
    num = sum(float((a[k] - b[k]).pow(2).sum()) for k in a)
    den = sum(float(b[k].pow(2).sum()) for k in b)
    return (num / den) ** 0.5


@pytest.mark.parametrize("packed", [False, True], ids=["single", "packed"])
def test_flex_bf16_training_step_matches_sdpa(packed: bool) -> None:
    base = make_draft(seed=5, markov_head_type="rnn", block_size=BLOCK, num_anchors=ANCHORS)
    fp32 = copy.deepcopy(base).to("cuda")
    bf16 = base.to("cuda", torch.bfloat16)
    assert bf16.rotary_emb.inv_freq.dtype == torch.float32

    batch32, anchors, keep, docs = cuda_batch(torch.float32, packed=packed)
    batch16, _, _, _ = cuda_batch(torch.bfloat16, packed=packed)
    reference = training_step(fp32, "sdpa", batch32, anchors, keep, docs)
    sdpa = training_step(copy.deepcopy(bf16), "sdpa", batch16, anchors, keep, docs)
    flex = training_step(copy.deepcopy(bf16), "flex_attention", batch16, anchors, keep, docs)

    flex_vs_sdpa = relative_difference(flex["grads"], sdpa["grads"])
    sdpa_vs_fp32 = relative_difference(sdpa["grads"], reference["grads"])
    flex_vs_fp32 = relative_difference(flex["grads"], reference["grads"])
    print(f"\n[cuda {torch.cuda.get_device_name()} packed={packed}]")
    for name, result in (("fp32 sdpa", reference), ("bf16 sdpa", sdpa), ("bf16 flex", flex)):
        print(
            f"  {name:10s} loss {result['loss']:.6f} (ce {result['ce']:.4f} l1 {result['l1']:.4f} "
            f"conf {result['confidence']:.4f}); after one AdamW step {result['after']:.6f}"
        )
    print(
        f"  relative grad difference: flex vs sdpa {flex_vs_sdpa:.3e}, sdpa vs fp32 {sdpa_vs_fp32:.3e}, "
        f"flex vs fp32 {flex_vs_fp32:.3e}"
    )

    for result in (sdpa, flex):
        assert all(torch.isfinite(g).all() for g in result["grads"].values())
    assert "embed_tokens.weight" not in flex["grads"] and "lm_head.weight" not in flex["grads"]
    # bf16 tolerance: a relative loss difference of 1e-2 is a few bf16 ulps of the summed terms.
    assert abs(flex["loss"] - sdpa["loss"]) <= 1e-2 * abs(sdpa["loss"])
    assert abs(flex["loss"] - reference["loss"]) <= 2e-2 * abs(reference["loss"])
    assert abs(flex["after"] - sdpa["after"]) <= 1e-2 * abs(sdpa["after"])
    # flex is no further from the fp32 reference than bf16 SDPA is, up to bf16 noise
    assert flex_vs_sdpa < 0.1
    assert flex_vs_fp32 < max(2 * sdpa_vs_fp32, 0.05)


def test_flex_fp32_forward_matches_sdpa_on_cuda() -> None:
    model = make_draft(seed=6, markov_head_type="gated", block_size=BLOCK, num_anchors=ANCHORS).to("cuda")
    batch, anchors, keep, docs = cuda_batch(torch.float32, packed=True)
    logits = {}
    for attn in ("sdpa", "flex_attention"):
        model.config._attn_implementation = attn
        with torch.no_grad():
            out = model(*batch.args(), anchors=anchors, keep=keep, document_ids=docs, return_logits=True)
        assert out.logits is not None
        logits[attn] = out.logits
    difference = float((logits["flex_attention"] - logits["sdpa"]).abs().max())
    print(f"\n[cuda fp32] max |flex - sdpa| logits {difference:.3e}")
    # TF32 matmuls may be enabled by the caller; 1e-2 covers them, a mask error is O(1)
    assert difference < 1e-2
