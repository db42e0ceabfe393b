"""Training and decoding agree: for a given anchor, the training forward's block logits equal the
decode-time block forward (``block_hidden`` over a KV-cached context, then the Markov head), whether
the context reaches the cache in one call or in several, for every head type; and ``propose`` at
temperature 0 returns the argmax tokens that the teacher-forced forward gives on its own output.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from qwen3_draft_helpers import HEAD_TYPES, DraftBatch, make_draft, random_batch
from torch import Tensor

from dspark_core.modeling.draft import DraftKVCache
from dspark_qwen3.modeling import Qwen3DSparkModel

SEQ = 32
BLOCK = 4
# Anchors shared by both rows, so that one batched decode call serves both.
# Anchor 0 has no context at all; the others give chunks of 5, 6, 1, 8 and 7 context rows.
ANCHORS = [0, 5, 11, 12, 20, 27]
HEAD_VARIANTS = [*HEAD_TYPES, None]  # None: no Markov head (markov_rank 0)


def draft(head: str | None, seed: int = 0) -> Qwen3DSparkModel:
    if head is None:
        return make_draft(seed=seed, markov_rank=0, confidence_head_with_markov=False)
    return make_draft(seed=seed, markov_head_type=head)


def training_logits(model: Qwen3DSparkModel, batch: DraftBatch, anchors: list[int]) -> tuple[Tensor, Tensor]:
    """Training-forward logits ``[b, N, B, V]`` and confidence ``[b, N, B]`` at fixed anchors."""
    fixed = torch.tensor([anchors] * batch.input_ids.shape[0])
    with torch.no_grad():
        out = model(*batch.args(), anchors=fixed, return_logits=True)
    assert out.logits is not None and out.confidence_logits is not None
    return out.logits, out.confidence_logits


def teacher_forced_decode_logits(model: Qwen3DSparkModel, hidden: Tensor, previous: Tensor) -> Tensor:
    """Decode-time block logits from ``block_hidden``'s output, the Markov head teacher forced."""
    head = model.markov_head
    latent = None if head is None else head.latent_block(hidden, previous)
    return model.block_logits(hidden, latent)


def serial_decode_logits(model: Qwen3DSparkModel, hidden: Tensor, previous: Tensor) -> Tensor:
    """The same logits, stepping the Markov head slot by slot with the true previous tokens (the rnn
    state carried from step to step), as serial sampling does."""
    head = model.markov_head
    if head is None:
        return model.block_logits(hidden, None)
    state = head.initial_state(previous.shape[:-1], hidden.device)
    latents = []
    for k in range(hidden.shape[-2]):
        m_k, state = head.latent_step(hidden[:, k], previous[:, k], state)
        latents.append(m_k)
    return model.block_logits(hidden, torch.stack(latents, dim=1))


@pytest.mark.parametrize("head", HEAD_VARIANTS)
@pytest.mark.parametrize("chunked", [False, True], ids=["one-call", "chunks"])
def test_training_logits_equal_decode_with_a_cached_context(head: str | None, chunked: bool) -> None:
    model = draft(head, seed=1)
    batch = random_batch(2, SEQ, seed=2)
    logits, _ = training_logits(model, batch, ANCHORS)
    ids, features = batch.input_ids, batch.target_features

    if chunked:
        # One cache for the whole row: each call feeds the context rows since the previous anchor
        # and proposes the block at the new anchor.
        cache = model.new_cache()
        hiddens, start = [], 0
        for a in ANCHORS:
            with torch.no_grad():
                hiddens.append(model.block_hidden(ids[:, a], features[:, start:a], cache))
            assert cache.length == a  # only context rows are kept, never the block's
            start = a
    else:
        hiddens = []
        for a in ANCHORS:
            with torch.no_grad():
                hiddens.append(model.block_hidden(ids[:, a], features[:, :a], model.new_cache()))

    for n, (a, hidden) in enumerate(zip(ANCHORS, hiddens, strict=True)):
        assert hidden.shape == (2, BLOCK, model.config.hidden_size)
        previous = ids[:, a : a + BLOCK]
        with torch.no_grad():
            forced = teacher_forced_decode_logits(model, hidden, previous)
            serial = serial_decode_logits(model, hidden, previous)
        torch.testing.assert_close(forced, logits[:, n], atol=2e-5, rtol=2e-5, msg=f"anchor {a}")
        torch.testing.assert_close(serial, logits[:, n], atol=2e-5, rtol=2e-5, msg=f"anchor {a}")


def test_decode_in_arbitrary_chunks_equals_one_call() -> None:
    model = draft("rnn", seed=3)
    batch = random_batch(1, SEQ, seed=4)
    a = 23
    with torch.no_grad():
        whole = model.block_hidden(batch.input_ids[:, a], batch.target_features[:, :a], model.new_cache())
        cache = model.new_cache()
        bounds = [0, 1, 2, 9, 10, 17, a]
        for lo, hi in itertools.pairwise(bounds):
            # the intermediate blocks use whatever token: they must leave no trace in the cache
            hidden = model.block_hidden(batch.input_ids[:, hi], batch.target_features[:, lo:hi], cache)
    torch.testing.assert_close(hidden, whole, atol=2e-5, rtol=2e-5)
    assert cache.length == a


def test_decode_comparison_can_fail() -> None:
    """Sanity for the comparisons above: an off-by-one context (the anchor's own features fed) or a
    cache that kept a block's keys gives different logits."""
    model = draft("vanilla", seed=5)
    batch = random_batch(1, SEQ, seed=6)
    ids, features = batch.input_ids, batch.target_features
    a = 12
    logits, _ = training_logits(model, batch, [a])
    with torch.no_grad():
        # the anchor's own features in the context (and the block one position later)
        late = model.block_hidden(ids[:, a], features[:, : a + 1], model.new_cache())
        late_logits = teacher_forced_decode_logits(model, late, ids[:, a : a + BLOCK])
        assert (late_logits - logits[:, 0]).abs().max() > 1e-3
        # a stale entry: every layer's cache holds one row twice
        cache = model.new_cache()
        model.block_hidden(ids[:, a - 1], features[:, : a - 1], cache)
        stale = DraftKVCache(len(model.layers))
        for i in range(len(model.layers)):
            keys, values = cache._keys[i], cache._values[i]
            assert keys is not None and values is not None
            stale.extend(i, keys, values)
            stale.extend(i, keys[:, :, -1:], values[:, :, -1:])
        wrong = model.block_hidden(ids[:, a], features[:, a - 1 : a], stale)
        right = model.block_hidden(ids[:, a], features[:, a - 1 : a], cache)
    assert (wrong - right).abs().max() > 1e-3
    forced = teacher_forced_decode_logits(model, right, ids[:, a : a + BLOCK])
    torch.testing.assert_close(forced, logits[:, 0], atol=2e-5, rtol=2e-5)


def test_cache_crop() -> None:
    model = draft("gated", seed=7)
    batch = random_batch(1, SEQ, seed=8)
    ids, features = batch.input_ids, batch.target_features
    with torch.no_grad():
        cache = model.new_cache()
        model.block_hidden(ids[:, 20], features[:, :20], cache)
        cache.crop(9)  # a rejected tail: back to 9 committed rows
        assert cache.length == 9
        hidden = model.block_hidden(ids[:, 14], features[:, 9:14], cache)
        fresh = model.block_hidden(ids[:, 14], features[:, :14], model.new_cache())
    torch.testing.assert_close(hidden, fresh, atol=2e-5, rtol=2e-5)
    with pytest.raises(ValueError, match="crop"):
        cache.crop(15)


# ---------------------------------------------------------------------------------------------------
# propose
# ---------------------------------------------------------------------------------------------------


def with_tokens(batch: DraftBatch, position: int, tokens: Tensor) -> DraftBatch:
    """``batch`` with ``input_ids[:, position : position + len]`` replaced by ``tokens [b, len]``."""
    ids = batch.input_ids.clone()
    length = min(tokens.shape[1], ids.shape[1] - position)
    ids[:, position : position + length] = tokens[:, :length]
    return DraftBatch(ids, batch.target_features, batch.target_final_hidden, batch.loss_mask)


@pytest.mark.parametrize("head", HEAD_VARIANTS)
def test_greedy_propose_is_the_argmax_of_the_teacher_forced_logits_on_its_own_output(
    head: str | None,
) -> None:
    model = draft(head, seed=9)
    batch = random_batch(2, SEQ, seed=10)
    cache = model.new_cache()
    start = 0
    for a in (8, 15):  # two rounds of a decode loop on one cache
        proposal = model.propose(batch.input_ids[:, a], batch.target_features[:, start:a], cache)
        start = a
        assert cache.length == a
        assert proposal.tokens.shape == (2, BLOCK)
        assert torch.equal(proposal.tokens, proposal.logits.argmax(dim=-1))
        assert torch.equal(
            proposal.probs, torch.nn.functional.one_hot(proposal.tokens, proposal.probs.shape[-1]).float()
        )
        # slot k proposes position a + k + 1; feed the proposal back as the true continuation
        forced_batch = with_tokens(batch, a + 1, proposal.tokens)
        logits, confidence = training_logits(model, forced_batch, [a])
        torch.testing.assert_close(proposal.logits, logits[:, 0], atol=2e-5, rtol=2e-5)
        assert torch.equal(logits[:, 0].argmax(dim=-1), proposal.tokens)
        assert proposal.confidence is not None
        torch.testing.assert_close(proposal.confidence, confidence[:, 0], atol=2e-5, rtol=2e-5)


def test_propose_feeds_its_own_tokens_not_the_ground_truth() -> None:
    """With a Markov head the proposal depends on the tokens it drew: teacher forcing on the
    ground truth (when it differs from the proposal) gives other logits."""
    model = draft("rnn", seed=11)
    batch = random_batch(1, SEQ, seed=12)
    a = 10
    proposal = model.propose(batch.input_ids[:, a], batch.target_features[:, :a], model.new_cache())
    truth = batch.input_ids[:, a + 1 : a + BLOCK]
    assert not torch.equal(truth, proposal.tokens[:, :-1])
    logits, _ = training_logits(model, batch, [a])
    assert (logits[:, 0] - proposal.logits).abs().max() > 1e-3


def test_propose_fewer_slots_is_a_prefix() -> None:
    model = draft("rnn", seed=13)
    batch = random_batch(1, SEQ, seed=14)
    a = 9
    full = model.propose(batch.input_ids[:, a], batch.target_features[:, :a], model.new_cache())
    short = model.propose(batch.input_ids[:, a], batch.target_features[:, :a], model.new_cache(), num_slots=2)
    assert torch.equal(short.tokens, full.tokens[:, :2])
    torch.testing.assert_close(short.logits, full.logits[:, :2])
    assert short.confidence is not None and full.confidence is not None
    torch.testing.assert_close(short.confidence, full.confidence[:, :2])
