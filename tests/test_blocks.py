"""Anchors and per-block tensors, checked against brute-force definitions from the method reference."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor

from dspark_core.errors import DraftConfigError
from dspark_core.modeling.blocks import (
    anchor_candidates,
    block_eval_mask,
    block_input_ids,
    block_labels,
    block_position_ids,
    block_previous_tokens,
    block_target_positions,
    context_position_ids,
    gather_blocks,
    sample_anchors,
)

MASK_ID = 99


def _random_docs(rng: random.Random, b: int, s: int) -> Tensor:
    """Contiguous, increasing document ids per row."""
    rows: list[list[int]] = []
    for _ in range(b):
        doc, row = 0, list[int]()
        for _ in range(s):
            if row and rng.random() < 0.15:
                doc += 1
            row.append(doc)
        rows.append(row)
    return torch.tensor(rows, dtype=torch.long).reshape(b, s)


@dataclass
class Case:
    b: int
    s: int
    n: int
    bs: int
    loss_mask: Tensor
    docs: Tensor | None
    input_ids: Tensor


def _random_case(rng: random.Random) -> Case:
    b, s, n, bs = rng.randint(1, 3), rng.randint(1, 40), rng.randint(1, 12), rng.randint(1, 8)
    density = rng.choice([0.0, 0.3, 0.7, 1.0])
    loss_mask = torch.tensor([[int(rng.random() < density) for _ in range(s)] for _ in range(b)])
    docs = _random_docs(rng, b, s) if rng.random() < 0.5 else None
    input_ids = torch.randint(0, 50, (b, s), generator=torch.Generator().manual_seed(rng.randint(0, 10**6)))
    return Case(b, s, n, bs, loss_mask.reshape(b, s), docs, input_ids)


def _brute_candidates(loss_mask: Tensor, docs: Tensor | None, row: int) -> set[int]:
    s = loss_mask.shape[1]
    out = set()
    for a in range(s - 1):
        if not (loss_mask[row, a] and loss_mask[row, a + 1]):
            continue
        if docs is not None and docs[row, a] != docs[row, a + 1]:
            continue
        out.add(a)
    return out


# ---------------------------------------------------------------------------------------------------
# Anchors
# ---------------------------------------------------------------------------------------------------


def test_sample_anchors_properties_over_random_cases() -> None:
    rng = random.Random(0)
    for _ in range(150):
        c = _random_case(rng)
        loss_mask, docs, n = c.loss_mask, c.docs, c.n
        gen = torch.Generator().manual_seed(rng.randint(0, 10**6))
        anchors, keep = sample_anchors(loss_mask, n, document_ids=docs, generator=gen)
        assert anchors.shape == keep.shape == (loss_mask.shape[0], n)
        assert anchors.dtype == torch.long and keep.dtype == torch.bool
        for row in range(loss_mask.shape[0]):
            cands = _brute_candidates(loss_mask, docs, row)
            kept = [int(a) for a, k in zip(anchors[row], keep[row], strict=True) if k]
            n_kept = len(kept)
            assert n_kept == min(n, len(cands))
            # Kept first, then padding; padding sits at position 0.
            assert keep[row, :n_kept].all() and not keep[row, n_kept:].any()
            assert (anchors[row, n_kept:] == 0).all()
            assert kept == sorted(set(kept)), "kept anchors must be unique and ascending"
            assert set(kept) <= cands
            if docs is not None:
                for a in kept:
                    assert docs[row, a] == docs[row, a + 1]
            if len(cands) <= n:
                assert set(kept) == cands


def test_sample_anchors_reproducible_with_seeded_generator() -> None:
    loss_mask = torch.ones(2, 64, dtype=torch.long)
    a1, k1 = sample_anchors(loss_mask, 8, generator=torch.Generator().manual_seed(123))
    a2, k2 = sample_anchors(loss_mask, 8, generator=torch.Generator().manual_seed(123))
    a3, _ = sample_anchors(loss_mask, 8, generator=torch.Generator().manual_seed(124))
    assert torch.equal(a1, a2) and torch.equal(k1, k2)
    assert not torch.equal(a1, a3)


def test_sample_anchors_is_uniform_over_candidates() -> None:
    # 3000 independent rows, 9 candidates (positions 0..8), 3 picks each: each candidate ~1000 times.
    rows, s, n = 3000, 10, 3
    loss_mask = torch.ones(rows, s, dtype=torch.bool)
    anchors, keep = sample_anchors(loss_mask, n, generator=torch.Generator().manual_seed(7))
    assert keep.all()
    counts = torch.bincount(anchors.flatten(), minlength=s)
    assert counts[s - 1] == 0  # the last position has no successor
    expected = rows * n / (s - 1)
    assert ((counts[: s - 1].float() - expected).abs() < 150).all(), counts


def test_sample_anchors_padding_when_few_candidates() -> None:
    loss_mask = torch.tensor([[0, 1, 1, 1, 0, 0, 1, 1], [0, 0, 0, 0, 0, 0, 0, 1]])
    anchors, keep = sample_anchors(loss_mask, 5, generator=torch.Generator().manual_seed(0))
    assert anchors.tolist() == [[1, 2, 6, 0, 0], [0, 0, 0, 0, 0]]
    assert keep.tolist() == [[True, True, True, False, False], [False] * 5]


def test_sample_anchors_never_crosses_document_boundary() -> None:
    loss_mask = torch.ones(1, 6, dtype=torch.long)
    docs = torch.tensor([[0, 0, 1, 1, 1, 2]])
    anchors, keep = sample_anchors(loss_mask, 6, document_ids=docs)
    assert anchors[keep].tolist() == [0, 2, 3]


def test_sample_anchors_handles_length_one_rows() -> None:
    anchors, keep = sample_anchors(torch.ones(2, 1), 3)
    assert anchors.tolist() == [[0] * 3] * 2 and not keep.any()


def test_anchor_candidates_matches_brute_force() -> None:
    rng = random.Random(1)
    for _ in range(50):
        c = _random_case(rng)
        loss_mask, docs = c.loss_mask, c.docs
        cand = anchor_candidates(loss_mask, document_ids=docs)
        for row in range(loss_mask.shape[0]):
            assert set(torch.nonzero(cand[row]).flatten().tolist()) == _brute_candidates(loss_mask, docs, row)


# ---------------------------------------------------------------------------------------------------
# Per-block tensors
# ---------------------------------------------------------------------------------------------------


def _random_anchors(rng: random.Random, b: int, s: int, n: int) -> tuple[Tensor, Tensor]:
    """Arbitrary anchors (not only sampled ones): the block functions must work for any."""
    keep = torch.tensor([[rng.random() < 0.7 for _ in range(n)] for _ in range(b)]).reshape(b, n)
    anchors = torch.tensor([[rng.randrange(s) for _ in range(n)] for _ in range(b)]).reshape(b, n)
    return anchors.masked_fill(~keep, 0), keep


def test_block_tensors_match_brute_force() -> None:
    rng = random.Random(2)
    for _ in range(120):
        c = _random_case(rng)
        b, s, n, bs = c.b, c.s, c.n, c.bs
        loss_mask, docs, ids = c.loss_mask, c.docs, c.input_ids
        anchors, keep = _random_anchors(rng, b, s, n)

        inp = block_input_ids(ids, anchors, keep, bs, MASK_ID)
        labels = block_labels(ids, anchors, bs)
        prev = block_previous_tokens(ids, anchors, bs)
        tpos = block_target_positions(anchors, bs, s)
        ctx = context_position_ids(s, document_ids=docs, batch_size=b)
        pos = block_position_ids(anchors, bs, ctx)
        ev = block_eval_mask(loss_mask, anchors, keep, bs, docs)
        for out in (inp, labels, prev, tpos, pos, ev):
            assert out.shape == (b, n, bs)
        assert ev.dtype == torch.bool

        for i in range(b):
            for j in range(n):
                a, kept = int(anchors[i, j]), bool(keep[i, j])
                running = True
                for k in range(bs):
                    want_in = int(ids[i, a]) if (k == 0 and kept) else MASK_ID
                    assert inp[i, j, k] == want_in
                    assert labels[i, j, k] == ids[i, min(a + k + 1, s - 1)]
                    assert prev[i, j, k] == ids[i, min(a + k, s - 1)]
                    assert tpos[i, j, k] == min(a + k, s - 1)
                    assert pos[i, j, k] == ctx[i, a] + k
                    t = a + k + 1
                    ok = t < s and bool(loss_mask[i, t]) and kept
                    if ok and docs is not None:
                        ok = bool(docs[i, t] == docs[i, a])
                    running = running and ok
                    assert bool(ev[i, j, k]) == running


def test_eval_mask_is_contiguous_prefix_and_respects_documents() -> None:
    loss_mask = torch.tensor([[1, 1, 1, 0, 1, 1, 1, 1, 1, 1]])
    docs = torch.tensor([[0, 0, 0, 0, 0, 0, 0, 1, 1, 1]])
    anchors = torch.tensor([[0, 4, 8, 0]])
    keep = torch.tensor([[True, True, True, False]])
    ev = block_eval_mask(loss_mask, anchors, keep, 4, docs)
    assert ev.int().tolist() == [
        [
            [1, 1, 0, 0],  # loss_mask[3] == 0 stops the block, even though loss_mask[4] is set
            [1, 1, 0, 0],  # position 7 belongs to the next document
            [1, 0, 0, 0],  # position 10 is past the end
            [0, 0, 0, 0],  # not kept
        ]
    ]
    # Prefix property: once False, stays False.
    assert (ev[..., 1:] <= ev[..., :-1]).all()


def test_context_position_ids() -> None:
    assert context_position_ids(4, batch_size=2).tolist() == [[0, 1, 2, 3]] * 2
    docs = torch.tensor([[0, 0, 1, 1, 1, 2], [5, 5, 5, 5, 5, 5]])
    assert context_position_ids(document_ids=docs).tolist() == [[0, 1, 0, 1, 2, 0], [0, 1, 2, 3, 4, 5]]
    with pytest.raises(ValueError, match="seq_len"):
        context_position_ids(5, document_ids=docs)
    with pytest.raises(ValueError):
        context_position_ids()


def test_block_position_ids_default_and_broadcast_context() -> None:
    anchors = torch.tensor([[3, 0], [5, 1]])
    assert block_position_ids(anchors, 3).tolist() == [[[3, 4, 5], [0, 1, 2]], [[5, 6, 7], [1, 2, 3]]]
    ctx = context_position_ids(8)  # [1, S] broadcasts over the batch
    assert torch.equal(block_position_ids(anchors, 3, ctx), block_position_ids(anchors, 3))


def test_gather_blocks_trailing_dims_and_grad() -> None:
    x = torch.randn(2, 6, 3, 4, requires_grad=True)
    index = torch.tensor([[[0, 5], [2, 2]], [[1, 3], [4, 0]]])
    out = gather_blocks(x, index)
    assert out.shape == (2, 2, 2, 3, 4)
    for i in range(2):
        for n in range(2):
            for k in range(2):
                assert torch.equal(out[i, n, k], x[i, index[i, n, k]])
    out.sum().backward()  # type: ignore[no-untyped-call]
    assert x.grad is not None
    # Row 0 position 2 is gathered twice, row 0 position 1 never.
    assert torch.equal(x.grad[0, 2], torch.full((3, 4), 2.0))
    assert torch.equal(x.grad[0, 1], torch.zeros(3, 4))


# ---------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------


def test_validation_errors() -> None:
    ids = torch.zeros(2, 8, dtype=torch.long)
    anchors = torch.zeros(2, 3, dtype=torch.long)
    keep = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(DraftConfigError, match="num_anchors"):
        sample_anchors(ids, 0)
    with pytest.raises(DraftConfigError, match="block_size"):
        block_labels(ids, anchors, 0)
    with pytest.raises(DraftConfigError, match="block_size"):
        block_input_ids(ids, anchors, keep, 0, MASK_ID)
    with pytest.raises(DraftConfigError, match="mask_token_id"):
        block_input_ids(ids, anchors, keep, 3, -1)
    with pytest.raises(ValueError, match="document_ids"):
        sample_anchors(ids, 2, document_ids=torch.zeros(2, 7))
    with pytest.raises(ValueError, match="loss_mask"):
        sample_anchors(torch.ones(8), 2)
    with pytest.raises(ValueError, match="keep"):
        block_eval_mask(ids, anchors, keep[:, :2], 3)
    with pytest.raises(ValueError, match="anchors"):
        block_labels(ids, anchors[:1], 3)
    with pytest.raises(ValueError, match="anchors"):
        block_labels(ids, anchors.float(), 3)
    with pytest.raises(ValueError, match="context_positions"):
        block_position_ids(anchors, 3, torch.zeros(3, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="index"):
        gather_blocks(ids, anchors)
