"""Batched speculative decoding (dspark_core.decoding.batched) and targets with sliding-window layers.

Every row must get exactly what batch-1 decoding gives it: greedy rows equal their plain greedy output
(ragged prompt lengths, rows stopping at different rounds, EOS inside an accepted block, each Markov
head, with and without a schedule), sampled rows follow the target's distribution, and sliding-window
or hybrid targets decode identically to HF's own generate past the window. The tiny models and the
chi-square helper are those of ``test_speculative``.
"""

from __future__ import annotations

import warnings
from collections import Counter
from typing import Any

import pytest
import torch
from test_speculative import (
    ALPHA,
    HEAD_TYPES,
    SAMPLING_VOCAB,
    SCHEDULES,
    chi_square_p_value,
    exact_first_tokens,
    hf_greedy,
    make_draft,
    make_oracle,
    make_target,
    skewed_draft,
    tokens,
)
from torch import Tensor
from transformers import MistralConfig, MistralForCausalLM, Qwen3Config, Qwen3ForCausalLM

from dspark_core.decoding import (
    ConfidenceSchedule,
    RoundRecord,
    plain_generate,
    plain_generate_batch,
    speculative_generate,
    speculative_generate_batch,
)
from dspark_core.decoding.ragged_cache import target_layer_types
from dspark_core.errors import DraftConfigError
from dspark_qwen3.modeling import Qwen3DSparkModel


def ragged_prompts(lengths: list[int], vocab: int, seed: int) -> list[Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab - 1, (length,), generator=generator) for length in lengths]


def plain_rows(target: Any, prompts: list[Tensor], max_new: int, **options: Any) -> list[list[int]]:
    return [tokens(plain_generate(target, p, max_new_tokens=max_new, **options)) for p in prompts]


class BatchTrace:
    """The batch size and tokens per row of every target forward."""

    def __init__(self, target: Any) -> None:
        self.shapes: list[tuple[int, int]] = []
        self.handle = target.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.shapes.append(tuple(kwargs["input_ids"].shape))


# -- greedy: every row equals its plain decoding ---------------------------------------------------


@pytest.mark.parametrize("head", [None, *HEAD_TYPES])
@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: s.describe())
@pytest.mark.parametrize("max_batch_size", [None, 2], ids=["all-at-once", "joining"])
def test_batched_greedy_equals_per_row_plain(
    head: str | None, schedule: ConfidenceSchedule, max_batch_size: int | None
) -> None:
    target = make_target(seed=3)
    draft = make_draft(target, head=head, block_size=4, seed=11)
    prompts = ragged_prompts([3, 11, 1, 7, 5], 32, seed=4)
    records: list[tuple[int, RoundRecord]] = []
    trace = BatchTrace(target)
    batch = speculative_generate_batch(
        target,
        draft,
        prompts,
        max_new_tokens=20 if max_batch_size is None else 5 + max_batch_size * 3,
        schedule=schedule,
        eos_token_id=[],
        on_round=lambda row, record: records.append((row, record)),
        max_batch_size=max_batch_size,
    )
    trace.handle.remove()
    budget = batch[0].metrics.new_tokens
    expected = plain_rows(target, prompts, budget, eos_token_id=[])
    assert [tokens(r) for r in batch] == expected
    plain = plain_generate_batch(
        target, prompts, max_new_tokens=budget, eos_token_id=[], max_batch_size=max_batch_size
    )
    assert [tokens(r) for r in plain] == expected
    if max_batch_size is not None:
        # Prompts joined a running batch (a prefill after the first verify round), never past the cap.
        sizes = [shape[0] for shape in trace.shapes]
        assert max(sizes) == max_batch_size
        first_round = next(i for i, shape in enumerate(trace.shapes) if i > 0 and shape[1] <= 5)
        assert any(shape[1] > 5 for shape in trace.shapes[first_round:])
        return
    assert tokens(batch[0]) == hf_greedy(target, prompts[0].unsqueeze(0), 20)
    rejected = sum(r.proposed - r.accepted for _, r in records)
    assert rejected > 0, "an untrained draft should see rejections; this run did not test them"
    # Rows accept different numbers of tokens in the same round, so their caches really are ragged.
    by_round: dict[int, set[int]] = {}
    for _, record in records:
        by_round.setdefault(record.index, set()).add(record.accepted)
    assert any(len(accepted) > 1 for accepted in by_round.values())
    for row, result in enumerate(batch):
        own = [r for i, r in records if i == row]
        assert own == list(result.rounds)
        assert result.metrics.target_forwards == result.metrics.rounds + 1
        assert all(len(r.confidence_logits) == r.drafted for r in own)


@pytest.mark.parametrize("head", HEAD_TYPES)
@pytest.mark.parametrize("max_batch_size", [None, 3], ids=["all-at-once", "joining"])
def test_rows_stop_at_eos_inside_accepted_blocks_and_leave_the_batch(
    head: str, max_batch_size: int | None
) -> None:
    target = make_target(seed=8, bigram=True)
    draft = make_oracle(target, head=head, block_size=5)
    prompts = ragged_prompts([4, 9, 2, 6, 13, 3], 32, seed=5)
    free = speculative_generate_batch(target, draft, prompts, max_new_tokens=30, eos_token_id=[])
    # An EOS that some row first meets inside an accepted run (with more accepted after it).
    candidates: Counter[int] = Counter()
    for result in free:
        position = 1
        generated = result.new_tokens
        for record in result.rounds:
            for offset, token in enumerate(record.committed):
                if offset + 1 < record.accepted and generated.index(token) == position + offset:
                    candidates[token] += 1
            position += len(record.committed)

    def stop_round(result: Any, token: int) -> int | None:
        """The round in which ``token`` first appears (-1: the prefill), ``None`` if never."""
        if token not in result.new_tokens:
            return None
        index, position = result.new_tokens.index(token), 1
        for record in result.rounds:
            if index < position + len(record.committed):
                return int(record.index)
            position += len(record.committed)
        return -1

    # Rows stop in different rounds (or never) with this EOS.
    eos = max(candidates, key=lambda t: (len({stop_round(r, t) for r in free}), t))
    assert len({stop_round(r, eos) for r in free}) >= 2, "rows would all stop together; pick other seeds"

    trace = BatchTrace(target)
    stopped = speculative_generate_batch(
        target, draft, prompts, max_new_tokens=30, eos_token_id=eos, max_batch_size=max_batch_size
    )
    trace.handle.remove()
    assert [tokens(r) for r in stopped] == plain_rows(target, prompts, 30, eos_token_id=eos)
    for result, whole in zip(stopped, free, strict=True):
        cut = whole.new_tokens
        expected = cut[: cut.index(eos) + 1] if eos in cut else cut
        assert result.new_tokens == expected
        assert result.metrics.stop_reason == ("eos" if eos in cut else "max_new_tokens")
    sizes = [shape[0] for shape in trace.shapes]
    if max_batch_size is not None:
        assert max(sizes) == max_batch_size and len(sizes) > len(free[0].rounds) + 1
        return
    # Finished rows leave the batch: the target's batch size only shrinks, and it does shrink.
    assert sizes[0] == len(prompts) and sizes == sorted(sizes, reverse=True) and sizes[-1] < len(prompts)
    assert sum(sizes[1:]) == sum(r.metrics.rounds for r in stopped)


def test_budget_ends_rows_on_their_own_and_single_token_rounds_skip_the_draft() -> None:
    target = make_target(seed=6, bigram=True)
    draft = make_oracle(target, block_size=6)
    prompts = ragged_prompts([3, 8], 32, seed=2)
    results = speculative_generate_batch(target, draft, prompts, max_new_tokens=10)
    for result, prompt in zip(results, prompts, strict=True):
        # 1 from the prefill, then 6 + 1 committed, then only 2 tokens left: draft 1 slot and verify 2.
        assert [r.drafted for r in result.rounds] == [6, 1]
        assert tokens(result) == tokens(plain_generate(target, prompt, max_new_tokens=10))
    single = speculative_generate_batch(target, draft, prompts, max_new_tokens=1)
    assert all(r.metrics.rounds == 0 and r.metrics.target_forwards == 1 for r in single)


def test_batch_of_one_is_speculative_generate() -> None:
    target = make_target(seed=3)
    draft = make_draft(target, head="rnn", block_size=4, seed=11)
    prompt = ragged_prompts([7], 32, seed=1)[0]
    alone = speculative_generate(target, draft, prompt.unsqueeze(0), max_new_tokens=17, eos_token_id=[])
    (batched,) = speculative_generate_batch(
        target, draft, [prompt.tolist()], max_new_tokens=17, eos_token_id=[]
    )
    assert tokens(alone) == tokens(batched)
    assert alone.rounds == batched.rounds
    assert all(len(r.confidence_logits) == r.drafted for r in alone.rounds)
    no_head = make_draft(target, head="vanilla", confidence=False)
    plain_records = speculative_generate(target, no_head, prompt, max_new_tokens=9).rounds
    assert plain_records and all(r.confidence_logits == () for r in plain_records)


def test_bad_batches() -> None:
    target = make_target(seed=3)
    draft = make_draft(target)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        speculative_generate_batch(target, draft, [[1, 2], []], max_new_tokens=3)
    with pytest.raises(ValueError, match="prompts is empty"):
        plain_generate_batch(target, [], max_new_tokens=3)
    with pytest.raises(ValueError, match="prompt 0 must hold integer"):
        plain_generate_batch(target, [torch.ones(3)], max_new_tokens=3)


# -- sampling: every row follows the target's distribution -----------------------------------------


def test_batched_sampling_matches_the_target_distribution_per_row() -> None:
    runs = 1500
    target = make_target(vocab=SAMPLING_VOCAB, seed=21, sharpness=12.0)
    draft = skewed_draft(target, block_size=2)
    prompts = ragged_prompts([4, 1, 6], SAMPLING_VOCAB, seed=9)
    expected = [exact_first_tokens(target, p.unsqueeze(0), 3, temperature=1.0) for p in prompts]
    counts: list[Counter[tuple[int, ...]]] = [Counter() for _ in prompts]
    rejected_first = [0] * len(prompts)
    for seed in range(runs):
        results = speculative_generate_batch(
            target,
            draft,
            prompts,
            max_new_tokens=4,
            temperature=1.0,
            seed=seed,
            eos_token_id=[],
            check_fit=seed == 0,
        )
        for row, result in enumerate(results):
            counts[row][tuple(result.new_tokens[:3])] += 1
            rejected_first[row] += result.metrics.accepted_per_round[0] == 0
    for row in range(len(prompts)):
        p_value = chi_square_p_value(counts[row], expected[row], runs)
        assert p_value > ALPHA, f"row {row}: sampled tokens differ from the target's (p={p_value:.2e})"
        # The residual path was exercised in every row.
        assert 0.2 * runs <= rejected_first[row] < runs


# -- sliding-window and hybrid targets -----------------------------------------------------------

WINDOW = 4


def sliding_qwen3(*, hybrid: bool, seed: int = 13) -> Qwen3ForCausalLM:
    """Qwen3 with use_sliding_window: layer 0 full and layer 1 sliding (hybrid), or both sliding."""
    config = Qwen3Config(
        vocab_size=32,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        use_sliding_window=True,
        sliding_window=WINDOW,
        max_window_layers=1 if hybrid else 0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        target = Qwen3ForCausalLM(config).eval()
    with torch.no_grad():
        target.lm_head.weight.mul_(25.0)
    return target


def sliding_mistral(seed: int = 17) -> MistralForCausalLM:
    config = MistralConfig(
        vocab_size=32,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        sliding_window=WINDOW,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        target = MistralForCausalLM(config).eval()
    with torch.no_grad():
        target.lm_head.weight.mul_(25.0)
    return target


def sliding_draft(target: Any, head: str) -> Qwen3DSparkModel:
    """A Qwen3-backbone draft (the test needs no Mistral family: the backbone config is the same)."""
    options = dict(
        num_draft_layers=1,
        block_size=4,
        mask_token_id=31,
        markov_rank=8,
        markov_head_type=head,
        target_layer_ids=[0, 1],
    )
    backbone = target.config.to_dict()
    backbone.pop("model_type", None)
    backbone.pop("architectures", None)
    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        warnings.simplefilter("ignore")
        torch.manual_seed(5)
        draft = Qwen3DSparkModel(Qwen3DSparkModel.config_from_target(Qwen3Config(**backbone), **options))
    draft.attach_target_weights(target)
    return draft.eval()


SLIDING_TARGETS = {
    "qwen3-sliding": lambda: sliding_qwen3(hybrid=False),
    "qwen3-hybrid": lambda: sliding_qwen3(hybrid=True),
    "mistral": sliding_mistral,
}


def test_the_sliding_targets_are_what_they_claim() -> None:
    assert target_layer_types(sliding_qwen3(hybrid=True)) == (["full_attention", "sliding_attention"], WINDOW)
    assert target_layer_types(sliding_qwen3(hybrid=False))[0] == ["sliding_attention"] * 2
    assert target_layer_types(sliding_mistral()) == (["sliding_attention"] * 2, WINDOW)
    # The window really matters: a full-attention copy of the same weights decodes differently.
    windowed = sliding_mistral()
    full = sliding_mistral()
    full.config.sliding_window = None
    ids = ragged_prompts([6], 32, seed=3)[0].unsqueeze(0)
    assert hf_greedy(windowed, ids, 24) != hf_greedy(full, ids, 24)


@pytest.mark.parametrize("kind", SLIDING_TARGETS)
@pytest.mark.parametrize("head", ["vanilla", "rnn"])
def test_sliding_window_targets_decode_past_the_window(kind: str, head: str) -> None:
    target = SLIDING_TARGETS[kind]()
    draft = sliding_draft(target, head)
    prompts = ragged_prompts([6, 2, 9], 32, seed=7)
    records: list[RoundRecord] = []
    results = speculative_generate_batch(
        target, draft, prompts, max_new_tokens=24, eos_token_id=[], on_round=lambda _, r: records.append(r)
    )
    for prompt, result in zip(prompts, results, strict=True):
        ids = prompt.unsqueeze(0)
        # HF's generate with its own sliding-window cache is the reference, far past the window.
        reference = hf_greedy(target, ids, 24)
        assert tokens(result) == reference
        assert (
            tokens(speculative_generate(target, draft, ids, max_new_tokens=24, eos_token_id=[])) == reference
        )
        assert tokens(plain_generate(target, ids, max_new_tokens=24, eos_token_id=[])) == reference
    assert any(r.accepted < r.proposed for r in records), "no rejection: the cut-back was not exercised"


def test_unsupported_layer_types_are_refused_in_one_line() -> None:
    target = make_target(seed=3)
    draft = make_draft(target)
    target.config.layer_types = ["full_attention", "linear_attention"]
    with pytest.raises(DraftConfigError, match="layer 1 has layer type 'linear_attention'") as info:
        speculative_generate(target, draft, torch.tensor([1, 2, 3]), max_new_tokens=4)
    assert "\n" not in str(info.value)
    target.config.layer_types = ["full_attention", "full_attention"]
    target.config._attn_implementation = "flash_attention_2"
    with pytest.raises(DraftConfigError, match="attn_implementation='flash_attention_2'"):
        plain_generate(target, torch.tensor([1, 2, 3]), max_new_tokens=4)


# -- dspark doctor's tiny decode -----------------------------------------------------------------


def test_doctor_decodes_a_mistral_style_target_and_catches_a_cache_not_cut_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from dspark_core import doctor
    from dspark_core.decoding.target import CachedTarget

    target = sliding_mistral()
    draft = sliding_draft(target, "vanilla")
    assert doctor._speculative_decode(target, draft) == f"sliding window {WINDOW}, every layer"
    # Sanity for the check: a target cache that keeps the rejected tail gives tokens the target
    # would not choose, and the doctor says so.
    commit = CachedTarget.commit

    def keep_everything(self: CachedTarget, lengths: Tensor) -> None:
        commit(self, self.cache._index[:, -1] + 1 if self.cache._index is not None else lengths)

    monkeypatch.setattr(CachedTarget, "commit", keep_everything)
    with pytest.raises(doctor._CheckFailed, match="below the target's argmax"):
        doctor._speculative_decode(target, draft)
