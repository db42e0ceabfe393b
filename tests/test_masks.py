"""The block attention mask: boolean rule vs a brute-force definition, dense form, flex BlockMask."""

from __future__ import annotations

import random
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import create_mask, flex_attention

from dspark_core.errors import DraftConfigError
from dspark_core.modeling.blocks import sample_anchors
from dspark_core.modeling.masks import (
    block_attention_allowed,
    compiled_create_block_mask,
    dense_block_mask,
    flex_block_mask,
)

TILE = 128


def _brute_allowed(anchors: Tensor, keep: Tensor, s: int, bs: int, docs: Tensor | None) -> Tensor:
    """Written from the method reference, one (query, key) pair at a time."""
    b, n = anchors.shape
    out = torch.zeros(b, n * bs, s + n * bs, dtype=torch.bool)
    for i in range(b):
        for blk in range(n):
            a = int(anchors[i, blk])
            for k in range(bs):
                q = blk * bs + k
                for j in range(s):
                    same_doc = docs is None or bool(docs[i, j] == docs[i, a])
                    out[i, q, j] = bool(keep[i, blk]) and j < a and same_doc
                for other in range(n):
                    for kk in range(bs):
                        out[i, q, s + other * bs + kk] = other == blk
    return out


def _random_docs(rng: random.Random, b: int, s: int) -> Tensor:
    rows: list[list[int]] = []
    for _ in range(b):
        doc, row = rng.randint(0, 3), list[int]()
        for _ in range(s):
            if row and rng.random() < 0.2:
                doc += 1
            row.append(doc)
        rows.append(row)
    return torch.tensor(rows, dtype=torch.long).reshape(b, s)


def _random_mask_case(rng: random.Random) -> tuple[Tensor, Tensor, int, int, Tensor | None]:
    b, s, n, bs = rng.randint(1, 3), rng.randint(1, 30), rng.randint(1, 6), rng.randint(1, 5)
    docs = _random_docs(rng, b, s) if rng.random() < 0.5 else None
    if rng.random() < 0.5:
        # Sampled anchors: realistic, with padding when few candidates.
        loss_mask = torch.tensor([[rng.random() < 0.6 for _ in range(s)] for _ in range(b)]).reshape(b, s)
        gen = torch.Generator().manual_seed(rng.randint(0, 10**6))
        anchors, keep = sample_anchors(loss_mask, n, document_ids=docs, generator=gen)
    else:
        # Arbitrary anchors, including non-kept blocks at non-zero positions.
        anchors = torch.tensor([[rng.randrange(s) for _ in range(n)] for _ in range(b)]).reshape(b, n)
        keep = torch.tensor([[rng.random() < 0.6 for _ in range(n)] for _ in range(b)]).reshape(b, n)
    return anchors, keep, s, bs, docs


def test_allowed_matches_brute_force_random_cases() -> None:
    rng = random.Random(0)
    saw_unkept = saw_docs = False
    for _ in range(150):
        anchors, keep, s, bs, docs = _random_mask_case(rng)
        saw_unkept |= bool((~keep).any())
        saw_docs |= docs is not None
        allowed = block_attention_allowed(anchors, keep, s, bs, docs)
        assert allowed.dtype == torch.bool
        assert torch.equal(allowed, _brute_allowed(anchors, keep, s, bs, docs))
        assert allowed.any(dim=-1).all(), "a fully masked row gives NaN in SDPA"
    assert saw_unkept and saw_docs


def test_allowed_small_example() -> None:
    # S=5, B=2, blocks at anchors 2 (kept) and 0 (not kept).
    allowed = block_attention_allowed(torch.tensor([[2, 0]]), torch.tensor([[True, False]]), 5, 2)
    assert allowed[0].int().tolist() == [
        [1, 1, 0, 0, 0, 1, 1, 0, 0],
        [1, 1, 0, 0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 1, 1],
        [0, 0, 0, 0, 0, 0, 0, 1, 1],
    ]


def test_dense_mask_is_additive_form_of_rule() -> None:
    rng = random.Random(1)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        anchors, keep, s, bs, docs = _random_mask_case(rng)
        dense = dense_block_mask(anchors, keep, s, bs, docs, dtype=dtype)
        allowed = block_attention_allowed(anchors, keep, s, bs, docs)
        assert dense.dtype == dtype
        assert dense.shape == (anchors.shape[0], 1, *allowed.shape[1:])
        assert torch.equal(dense[:, 0] == 0, allowed)
        assert (dense[:, 0][~allowed] == torch.finfo(dtype).min).all()


def _tile_any(allowed: Tensor) -> Tensor:
    """Which 128x128 tiles of ``allowed`` contain at least one allowed pair."""
    b, q, kv = allowed.shape
    qp, kvp = -(-q // TILE) * TILE, -(-kv // TILE) * TILE
    padded = torch.zeros(b, qp, kvp, dtype=torch.bool)
    padded[:, :q, :kv] = allowed
    return padded.view(b, qp // TILE, TILE, kvp // TILE, TILE).any(dim=4).any(dim=2)


# (batch, S, N, B, packed): S + N*B is 42, 135, 312, 128 (a tile multiple), 275.
FLEX_SHAPES = [
    (2, 30, 3, 4, False),
    (1, 100, 5, 7, True),
    (2, 200, 16, 7, False),
    (1, 100, 4, 7, True),
    (3, 150, 25, 5, True),
]


@pytest.mark.parametrize(("b", "s", "n", "bs", "packed"), FLEX_SHAPES)
def test_flex_block_mask_matches_dense_sdpa(b: int, s: int, n: int, bs: int, packed: bool) -> None:
    gen = torch.Generator().manual_seed(s * 31 + n)
    loss_mask = torch.rand(b, s, generator=gen) < 0.5
    # Row 0 has at most 2 candidates, fewer than N: it gets padding (not-kept) blocks.
    loss_mask[0] = False
    loss_mask[0, s // 2 : s // 2 + 3] = True
    docs = torch.cumsum(torch.rand(b, s, generator=gen) < 0.05, dim=1) if packed else None
    anchors, keep = sample_anchors(loss_mask, n, document_ids=docs, generator=gen)
    assert (~keep).any() and keep.any()

    allowed = block_attention_allowed(anchors, keep, s, bs, docs)
    block_mask = flex_block_mask(anchors, keep, s, bs, docs)
    q_len, kv_len = n * bs, s + n * bs
    assert block_mask.BLOCK_SIZE == (TILE, TILE)
    assert block_mask.shape == (b, 1, q_len, kv_len)

    # Element-wise: the BlockMask's own mask_mod reproduces the rule.
    from_mod = create_mask(block_mask.mask_mod, b, 1, q_len, kv_len, device="cpu")
    assert torch.equal(from_mod[:, 0], allowed)
    # Tile-wise: exactly the tiles with some allowed pair are listed.
    assert torch.equal(block_mask.to_dense()[:, 0].bool(), _tile_any(allowed))

    heads, dim = 2, 16
    query = torch.randn(b, heads, q_len, dim, generator=gen)
    key = torch.randn(b, heads, kv_len, dim, generator=gen)
    value = torch.randn(b, heads, kv_len, dim, generator=gen)
    with warnings.catch_warnings():
        # The eager (unfused) CPU path warns that it is not compiled; that is what we want here.
        warnings.simplefilter("ignore", UserWarning)
        out_flex = flex_attention(query, key, value, block_mask=block_mask)
    dense = dense_block_mask(anchors, keep, s, bs, docs, dtype=torch.float32)
    out_sdpa = F.scaled_dot_product_attention(query, key, value, attn_mask=dense)
    assert isinstance(out_flex, Tensor)
    assert not out_sdpa.isnan().any()
    torch.testing.assert_close(out_flex, out_sdpa, rtol=1e-5, atol=1e-5)


def test_flex_block_mask_per_head() -> None:
    anchors, keep = torch.tensor([[3, 9]]), torch.tensor([[True, True]])
    block_mask = flex_block_mask(anchors, keep, 20, 3, num_heads=4)
    assert block_mask.shape == (1, 4, 6, 26)
    assert block_mask.to_dense().shape[1] == 4


def test_compiled_builder_is_cached() -> None:
    first = compiled_create_block_mask()
    assert first is compiled_create_block_mask()
    assert callable(first)


@pytest.mark.slow
def test_compiled_builder_matches_eager_on_cpu() -> None:
    gen = torch.Generator().manual_seed(3)
    s, n, bs = 90, 6, 7
    docs = torch.cumsum(torch.rand(2, s, generator=gen) < 0.05, dim=1)
    anchors, keep = sample_anchors(torch.rand(2, s, generator=gen) < 0.7, n, document_ids=docs, generator=gen)
    eager = flex_block_mask(anchors, keep, s, bs, docs, compile=False)
    compiled = flex_block_mask(anchors, keep, s, bs, docs, compile=True)
    assert torch.equal(compiled.to_dense(), eager.to_dense())
    assert torch.equal(compiled.kv_num_blocks, eager.kv_num_blocks)
    assert torch.equal(compiled.kv_indices, eager.kv_indices)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_flex_block_mask_cuda_compiled_matches_dense() -> None:
    device = torch.device("cuda")
    gen = torch.Generator().manual_seed(4)
    b, s, n, bs = 2, 300, 40, 7
    docs = torch.cumsum(torch.rand(b, s, generator=gen) < 0.02, dim=1).to(device)
    loss_mask = (torch.rand(b, s, generator=gen) < 0.7).to(device)
    anchors, keep = sample_anchors(loss_mask, n, document_ids=docs, generator=gen)
    block_mask = flex_block_mask(anchors, keep, s, bs, docs)  # compiled by default on CUDA
    q_len, kv_len = n * bs, s + n * bs
    allowed = block_attention_allowed(anchors, keep, s, bs, docs)
    assert torch.equal(create_mask(block_mask.mask_mod, b, 1, q_len, kv_len, device=device)[:, 0], allowed)
    query = torch.randn(b, 4, q_len, 64, device=device, dtype=torch.bfloat16)
    key = torch.randn(b, 4, kv_len, 64, device=device, dtype=torch.bfloat16)
    value = torch.randn(b, 4, kv_len, 64, device=device, dtype=torch.bfloat16)
    out_flex = torch.compile(flex_attention)(query, key, value, block_mask=block_mask)
    dense = dense_block_mask(anchors, keep, s, bs, docs, dtype=torch.float32)
    out_ref = F.scaled_dot_product_attention(query.float(), key.float(), value.float(), attn_mask=dense)
    assert isinstance(out_flex, Tensor)
    torch.testing.assert_close(out_flex.float(), out_ref, rtol=2e-2, atol=2e-2)


def test_mask_validation_errors() -> None:
    anchors = torch.zeros(2, 3, dtype=torch.long)
    keep = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(DraftConfigError, match="block_size"):
        block_attention_allowed(anchors, keep, 10, 0)
    with pytest.raises(ValueError, match="seq_len"):
        block_attention_allowed(anchors, keep, 0, 3)
    with pytest.raises(ValueError, match="keep"):
        block_attention_allowed(anchors, keep[:, :2], 10, 3)
    with pytest.raises(ValueError, match="document_ids"):
        block_attention_allowed(anchors, keep, 10, 3, torch.zeros(2, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="dtype"):
        dense_block_mask(anchors, keep, 10, 3, dtype=torch.int32)
    with pytest.raises(DraftConfigError, match="num_heads"):
        flex_block_mask(anchors, keep, 10, 3, num_heads=0)
