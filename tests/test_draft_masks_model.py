"""The block attention mask, seen through the whole draft model.

- the flex ``BlockMask`` forward equals the SDPA (and eager) forward on CPU, with blocks that are not
  kept and with packed documents;
- strictness: a block's logits do not depend on the target features at positions >= its anchor,
  and do depend on those before it;
- packing: a block never sees another document's context, and equals the same document run alone.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import pytest
import torch
from qwen3_draft_helpers import HEAD_TYPES, MASK, DraftBatch, make_draft, random_batch
from torch import Tensor

from dspark_core.modeling.loss import DSparkObjective
from dspark_qwen3.modeling import Qwen3DSparkModel

ATTENTION = ("sdpa", "eager", "flex_attention")
SEQ = 40
# Row 0 has an unkept padding block, row 1 an unkept block in the middle; anchors are sorted per row.
ANCHORS = torch.tensor([[0, 5, 11, 20, 0], [3, 7, 8, 22, 30]])
KEEP = torch.tensor([[True, True, True, True, False], [True, True, False, True, True]])
# Three documents in row 0 (starting at 0, 12 and 27), two in row 1 (starting at 0 and 20).
DOCS = torch.tensor([[0] * 12 + [1] * 15 + [2] * 13, [5] * 20 + [6] * 20])
PACKED_ANCHORS = torch.tensor([[2, 12, 15, 25, 30], [0, 18, 20, 21, 33]])
PACKED_KEEP = torch.tensor([[True, True, True, True, True], [True, False, True, True, True]])


@pytest.fixture(autouse=True)
def _quiet_cpu_flex() -> Iterator[None]:
    # Uncompiled flex attention on CPU warns that it materialises the scores; that is what we want here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        yield


def run(
    model: Qwen3DSparkModel,
    batch: DraftBatch,
    anchors: Tensor,
    keep: Tensor,
    document_ids: Tensor | None = None,
    *,
    attn: str = "sdpa",
) -> tuple[Tensor, Tensor, Tensor]:
    """(logits [b, N, B, V], confidence logits [b, N, B], loss) with fixed anchors."""
    model.config._attn_implementation = attn
    try:
        with torch.no_grad():
            out = model(
                *batch.args(), anchors=anchors, keep=keep, document_ids=document_ids, return_logits=True
            )
    finally:
        model.config._attn_implementation = "sdpa"
    assert out.logits is not None and out.confidence_logits is not None
    return out.logits, out.confidence_logits, DSparkObjective()(model, out).loss


# ---------------------------------------------------------------------------------------------------
# flex == SDPA == eager
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("head", HEAD_TYPES)
@pytest.mark.parametrize("packed", [False, True], ids=["single", "packed"])
def test_flex_and_eager_forward_equal_sdpa(head: str, packed: bool) -> None:
    model = make_draft(seed=1, markov_head_type=head)
    batch = random_batch(2, SEQ, seed=2)
    anchors, keep = (PACKED_ANCHORS, PACKED_KEEP) if packed else (ANCHORS, KEEP)
    docs = DOCS if packed else None
    reference = run(model, batch, anchors, keep, docs, attn="sdpa")
    assert torch.isfinite(reference[0]).all()  # also the unkept blocks: no fully masked row
    for attn in ("eager", "flex_attention"):
        got = run(model, batch, anchors, keep, docs, attn=attn)
        for name, a, b in zip(("logits", "confidence", "loss"), got, reference, strict=True):
            torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5, msg=f"{attn} {name}")


def test_flex_vs_sdpa_comparison_can_fail() -> None:
    """The comparison above is sensitive to the mask: dropping packing or keep changes the output."""
    model = make_draft(seed=1)
    batch = random_batch(2, SEQ, seed=2)
    packed = run(model, batch, PACKED_ANCHORS, PACKED_KEEP, DOCS, attn="sdpa")[0]
    unpacked = run(model, batch, PACKED_ANCHORS, PACKED_KEEP, None, attn="flex_attention")[0]
    assert (packed - unpacked).abs().max() > 1e-2
    dropped = run(model, batch, ANCHORS, KEEP, attn="sdpa")[0]
    all_kept = run(model, batch, ANCHORS, torch.ones_like(KEEP), attn="flex_attention")[0]
    # the unkept blocks differ (they see context once kept); the kept ones do not
    assert (dropped[~KEEP] - all_kept[~KEEP]).abs().max() > 1e-2
    torch.testing.assert_close(dropped[KEEP], all_kept[KEEP], atol=2e-5, rtol=2e-5)


def test_unkept_block_sees_only_itself() -> None:
    """An unkept block is all mask tokens attending within itself: the same whatever the context."""
    model = make_draft(seed=3, markov_rank=0, confidence_head_with_markov=False)
    batch = random_batch(2, SEQ, seed=4)
    for attn in ATTENTION:
        logits = run(model, batch, ANCHORS, KEEP, attn=attn)[0]
        other = random_batch(2, SEQ, seed=5)
        other_logits = run(model, other, ANCHORS, KEEP, attn=attn)[0]
        torch.testing.assert_close(logits[~KEEP], other_logits[~KEEP], atol=1e-5, rtol=1e-5)
        # ... and equals a kept block at anchor 0 whose anchor token is the mask token (no context either)
        ids = batch.input_ids.clone()
        ids[:, 0] = MASK
        kept_at_zero = run(
            model,
            DraftBatch(ids, *batch.args()[1:]),
            torch.zeros(2, 1, dtype=torch.long),
            torch.ones(2, 1, dtype=torch.bool),
            attn=attn,
        )[0]
        torch.testing.assert_close(logits[0, 4], kept_at_zero[0, 0], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------
# Strictness
# ---------------------------------------------------------------------------------------------------


def perturbed(batch: DraftBatch, positions: Tensor, row: int, *, seed: int = 99) -> DraftBatch:
    """A copy of ``batch`` whose target features (and final hidden states) in ``row`` at ``positions``
    are replaced by fresh random values."""
    gen = torch.Generator().manual_seed(seed)
    features = batch.target_features.clone()
    final = batch.target_final_hidden.clone()
    features[row, positions] = torch.randn(features[row, positions].shape, generator=gen)
    final[row, positions] = torch.randn(final[row, positions].shape, generator=gen)
    return DraftBatch(batch.input_ids, features, final, batch.loss_mask)


def run_variants(
    model: Qwen3DSparkModel,
    batch: DraftBatch,
    anchors: Tensor,
    keep: Tensor,
    document_ids: Tensor | None,
    variants: list[tuple[int, Tensor]],
    *,
    attn: str,
) -> Tensor:
    """Logits of each ``(row, positions)`` perturbation of ``batch``, run as the rows of one batch
    (rows never see each other: see ``test_the_other_row_is_never_seen``). Returns ``[len, N, B, V]``."""
    rows = [perturbed(batch, positions, row, seed=100 + i) for i, (row, positions) in enumerate(variants)]
    index = torch.tensor([row for row, _ in variants])
    stacked = DraftBatch(
        *(
            torch.cat([v.args()[j][r : r + 1] for v, r in zip(rows, index.tolist(), strict=True)])
            for j in range(4)
        )
    )
    docs = None if document_ids is None else document_ids[index]
    return run(model, stacked, anchors[index], keep[index], docs, attn=attn)[0]


@pytest.mark.parametrize("attn", ATTENTION)
def test_features_at_or_after_the_anchor_are_never_seen(attn: str) -> None:
    model = make_draft(seed=6, markov_head_type="rnn")
    batch = random_batch(2, SEQ, seed=7)
    logits = run(model, batch, ANCHORS, KEEP, attn=attn)[0]
    unseen: list[tuple[int, int, Tensor]] = []
    seen: list[tuple[int, int, Tensor]] = []
    for row in range(2):
        for n in range(ANCHORS.shape[1]):
            if not KEEP[row, n]:
                continue
            a = int(ANCHORS[row, n])
            # everything from the anchor on, and the anchor's own features alone
            unseen += [(row, n, torch.arange(a, SEQ)), (row, n, torch.tensor([a]))]
            if a > 0:
                # everything before the anchor, and the position just before it alone
                seen += [(row, n, torch.arange(0, a)), (row, n, torch.tensor([a - 1]))]
    assert len(unseen) == 16 and len(seen) == 14
    variants = unseen + seen
    changed = run_variants(model, batch, ANCHORS, KEEP, None, [(r, p) for r, _, p in variants], attn=attn)
    for i, (row, n, positions) in enumerate(variants):
        difference = (changed[i, n] - logits[row, n]).abs().max()
        if i < len(unseen):
            assert difference <= 1e-6, (row, n, positions)
        else:
            assert difference > 1e-3, (row, n, positions)


def test_the_other_row_is_never_seen() -> None:
    model = make_draft(seed=6)
    batch = random_batch(2, SEQ, seed=7)
    logits = run(model, batch, ANCHORS, KEEP)[0]
    changed = run(model, perturbed(batch, torch.arange(SEQ), 1), ANCHORS, KEEP)[0]
    torch.testing.assert_close(changed[0], logits[0], atol=1e-6, rtol=0)
    assert (changed[1][KEEP[1]] - logits[1][KEEP[1]]).abs().max() > 1e-3


def test_block_reads_only_its_anchor_token() -> None:
    """Without a Markov head, a block's logits depend on ``input_ids`` only through ``input_ids[a_n]``."""
    model = make_draft(seed=8, markov_rank=0, confidence_head_with_markov=False)
    batch = random_batch(1, SEQ, seed=9)
    anchors, keep = ANCHORS[:1, :4], KEEP[:1, :4]
    logits = run(model, batch, anchors, keep)[0]
    for n in range(4):
        a = int(anchors[0, n])
        ids = batch.input_ids.clone()
        others = torch.arange(SEQ) != a
        ids[0, others] = (ids[0, others] + 7) % MASK
        changed = run(model, DraftBatch(ids, *batch.args()[1:]), anchors, keep)[0]
        torch.testing.assert_close(changed[0, n], logits[0, n], atol=1e-6, rtol=0)
        ids = batch.input_ids.clone()
        ids[0, a] = (ids[0, a] + 7) % MASK
        changed = run(model, DraftBatch(ids, *batch.args()[1:]), anchors, keep)[0]
        assert (changed[0, n] - logits[0, n]).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------------------------


def document_span(row: int, position: int) -> tuple[int, int]:
    doc = DOCS[row]
    same = (doc == doc[position]).nonzero().flatten()
    return int(same.min()), int(same.max()) + 1


@pytest.mark.parametrize("attn", ATTENTION)
def test_a_packed_block_never_sees_another_documents_context(attn: str) -> None:
    model = make_draft(seed=10, markov_head_type="gated")
    batch = random_batch(2, SEQ, seed=11)
    logits = run(model, batch, PACKED_ANCHORS, PACKED_KEEP, DOCS, attn=attn)[0]
    unseen: list[tuple[int, int, Tensor]] = []
    seen: list[tuple[int, int, Tensor]] = []
    for row in range(2):
        for n in range(PACKED_ANCHORS.shape[1]):
            if not PACKED_KEEP[row, n]:
                continue
            a = int(PACKED_ANCHORS[row, n])
            start, end = document_span(row, a)
            # every other document, before and after this one
            unseen.append((row, n, torch.cat([torch.arange(0, start), torch.arange(end, SEQ)])))
            if a > start:  # its own document's context before the anchor is seen
                seen.append((row, n, torch.arange(start, a)))
    assert len(unseen) == 9 and len(seen) == 6
    variants = unseen + seen
    changed = run_variants(
        model, batch, PACKED_ANCHORS, PACKED_KEEP, DOCS, [(r, p) for r, _, p in variants], attn=attn
    )
    for i, (row, n, positions) in enumerate(variants):
        difference = (changed[i, n] - logits[row, n]).abs().max()
        if i < len(unseen):
            assert difference <= 1e-6, (row, n, positions)
        else:
            assert difference > 1e-3, (row, n, positions)


def test_a_packed_block_equals_its_document_run_alone() -> None:
    """Positions restart per document, so a packed block is exactly the block of the document alone."""
    model = make_draft(seed=12, markov_head_type="rnn")
    batch = random_batch(2, SEQ, seed=13)
    packed, packed_conf, _ = run(model, batch, PACKED_ANCHORS, PACKED_KEEP, DOCS)
    block_size = model.config.block_size
    compared = 0
    for row in range(2):
        for n in range(PACKED_ANCHORS.shape[1]):
            if not PACKED_KEEP[row, n]:
                continue
            a = int(PACKED_ANCHORS[row, n])
            start, end = document_span(row, a)
            alone = DraftBatch(*(t[row : row + 1, start:end] for t in batch.args()))
            anchor = torch.tensor([[a - start]])
            logits, conf, _ = run(model, alone, anchor, torch.ones(1, 1, dtype=torch.bool))
            # Slot k's Markov input is input_ids[a + k]: past the document's end it is the next
            # document's token when packed (a slot that is never supervised), so compare the slots
            # whose previous token lies in the document.
            slots = min(block_size, end - a)
            torch.testing.assert_close(packed[row, n, :slots], logits[0, 0, :slots], atol=2e-5, rtol=2e-5)
            torch.testing.assert_close(packed_conf[row, n, :slots], conf[0, 0, :slots], atol=2e-5, rtol=2e-5)
            compared += slots
    assert compared == 34  # of 36: two blocks run past their document
    # sanity: without document_ids the blocks after the first document differ
    unpacked = run(model, batch, PACKED_ANCHORS, PACKED_KEEP)[0]
    assert (unpacked[0, 1:] - packed[0, 1:]).abs().max() > 1e-2


def test_packed_supervision_stops_at_the_document_end() -> None:
    model = make_draft(seed=14)
    batch = random_batch(2, SEQ, seed=15)
    with torch.no_grad():
        out = model(*batch.args(), anchors=PACKED_ANCHORS, keep=PACKED_KEEP, document_ids=DOCS)
    block_size = model.config.block_size
    for row in range(2):
        for n in range(PACKED_ANCHORS.shape[1]):
            a = int(PACKED_ANCHORS[row, n])
            _, end = document_span(row, a)
            expected = [bool(PACKED_KEEP[row, n]) and a + k + 1 < end for k in range(block_size)]
            assert out.eval_mask[row, n].tolist() == expected, (row, n)
    # block (0, 3) at 25 has one slot left in document 1; (1, 1) at 18 would have one, but is not kept
    assert out.eval_mask[0, 3].sum() == 1 and out.eval_mask[1, 1].sum() == 0


def test_set_attn_implementation_switches_the_path() -> None:
    """``set_attn_implementation`` takes effect: the flex path (no CPU backward) is really used."""
    model = make_draft(seed=1)
    batch = random_batch(2, SEQ, seed=2)
    model.set_attn_implementation("flex_attention")
    assert model.config._attn_implementation == "flex_attention"
    with torch.no_grad():
        flex_loss = DSparkObjective()(model, model(*batch.args(), anchors=ANCHORS, keep=KEEP)).loss
    with pytest.raises(NotImplementedError, match="backward on CPU"):
        model(*batch.args(), anchors=ANCHORS, keep=KEEP)
    model.set_attn_implementation("sdpa")
    sdpa_loss = DSparkObjective()(model, model(*batch.args(), anchors=ANCHORS, keep=KEEP)).loss
    sdpa_loss.backward()
    torch.testing.assert_close(flex_loss, sdpa_loss.detach(), atol=2e-5, rtol=2e-5)
