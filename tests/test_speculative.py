"""Speculative generation (dspark_core.decoding): exactness, losslessness, bookkeeping, scheduling, errors.

Everything runs on tiny real models: a ``Qwen3ForCausalLM`` target and a ``Qwen3DSparkModel`` draft.
Two kinds of draft are used:

- an untrained random draft, which gets little acceptance;
- an *oracle* draft, exact for a bigram target. The target's attention ``o_proj`` and MLP
  ``down_proj`` are zeroed, so its logits depend only on the current token. The draft's final norm is
  zeroed (so ``lm_head(h) = 0``) and its Markov head is set so that ``markov_w2(m(prev))`` equals the
  target's logits after ``prev``: the draft's conditional is the target's, and every proposal is
  accepted (greedy and sampled).
"""

from __future__ import annotations

import inspect
import itertools
import math
import subprocess
import sys
import warnings
from collections import Counter
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor
from transformers import Qwen3Config, Qwen3ForCausalLM

from dspark_core.decoding import (
    ConfidenceSchedule,
    GenerationResult,
    RoundRecord,
    SpeculativeMetrics,
    check_draft_fits_target,
    combine_metrics,
    plain_generate,
    speculative_generate,
)
from dspark_core.decoding.target import forward_kwargs as _forward_kwargs
from dspark_core.errors import DraftConfigError
from dspark_core.modeling.features import capture_target_features
from dspark_core.modeling.sampling import filtered_probs
from dspark_qwen3.modeling import Qwen3DSparkModel

HEAD_TYPES = ("vanilla", "gated", "rnn")


# -- models -----------------------------------------------------------------------------------


def make_target(
    *,
    vocab: int = 32,
    layers: int = 2,
    hidden: int = 32,
    seed: int = 0,
    bigram: bool = False,
    sharpness: float = 25.0,
) -> Qwen3ForCausalLM:
    """A tiny random Qwen3 target; ``sharpness`` scales ``lm_head`` so its distributions are peaked."""
    config = Qwen3Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        target = Qwen3ForCausalLM(config).eval()
    with torch.no_grad():
        target.lm_head.weight.mul_(sharpness)
        if bigram:
            for layer in target.model.layers:
                layer.self_attn.o_proj.weight.zero_()
                layer.mlp.down_proj.weight.zero_()
    return target


def make_draft(
    target: Qwen3ForCausalLM,
    *,
    head: str | None = "vanilla",
    rank: int = 8,
    block_size: int = 4,
    confidence: bool = True,
    with_markov: bool = True,
    seed: int = 1,
    layer_ids: list[int] | None = None,
) -> Qwen3DSparkModel:
    """An untrained draft for ``target`` (``head=None``: no Markov head)."""
    vocab = target.config.vocab_size
    options: dict[str, Any] = {
        "num_draft_layers": 1,
        "block_size": block_size,
        "mask_token_id": vocab - 1,
        "markov_rank": rank if head is not None else 0,
        "enable_confidence_head": confidence,
        "target_layer_ids": layer_ids or sorted({0, target.config.num_hidden_layers - 1}),
    }
    if head is not None:
        options["markov_head_type"] = head
    if confidence:
        options["confidence_head_with_markov"] = with_markov and head is not None
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the SGLang layer-id warning is not what these tests are about
        torch.manual_seed(seed)
        draft = Qwen3DSparkModel.from_target(target, **options)
    return draft.eval()


def bigram_logits(target: Qwen3ForCausalLM) -> Tensor:
    """``[V, V]``: row p holds the bigram target's next-token logits after token p."""
    vocab = target.config.vocab_size
    with torch.no_grad():
        return target(torch.arange(vocab).unsqueeze(1)).logits[:, 0, :].float()


def make_oracle(
    target: Qwen3ForCausalLM, *, head: str = "vanilla", block_size: int = 4, confidence: bool = True
) -> Qwen3DSparkModel:
    """A draft whose serial conditional equals the bigram ``target``'s exactly (see the module docstring)."""
    vocab = target.config.vocab_size
    draft = make_draft(target, head=head, rank=vocab, block_size=block_size, confidence=confidence)
    markov = draft.markov_head
    assert markov is not None
    with torch.no_grad():
        draft.norm.weight.zero_()
        markov.markov_w1.weight.copy_(torch.eye(vocab))
        markov.markov_w2.weight.copy_(bigram_logits(target).T)
        if head == "gated":
            # sigmoid(40) rounds to 1.0 in float32: the gate passes W1[prev] unchanged.
            markov.gate_proj.weight.zero_()
            markov.gate_proj.bias.fill_(40.0)
        elif head == "rnn":
            # m = tanh(o) with o = 40 * W1[prev] = 40 * one_hot(prev): tanh gives the one-hot back.
            markov.joint_proj.weight.zero_()
            markov.joint_proj.bias.zero_()
            markov.joint_proj.weight[2 * vocab :, vocab : 2 * vocab] = 40.0 * torch.eye(vocab)
    return draft


def prompt(length: int, vocab: int, seed: int) -> Tensor:
    return torch.randint(0, vocab - 1, (1, length), generator=torch.Generator().manual_seed(seed))


def hf_greedy(target: Qwen3ForCausalLM, ids: Tensor, max_new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = target.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    return [int(t) for t in out[0].tolist()]


def tokens(result: GenerationResult) -> list[int]:
    return [int(t) for t in result.sequences[0].tolist()]


# -- greedy is exact --------------------------------------------------------------------------


#: a cost schedule whose choices vary with the confidences (rounds get dearer with length), with STS
#: temperatures; lengths up to 6 slots are costed
COST_SCHEDULE = ConfidenceSchedule(
    "cost", temperatures=(0.7, 1.3, 1.0, 2.0, 0.5), round_seconds=(1.0, 1.3, 1.6, 1.9, 2.2, 2.5, 2.8)
)

SCHEDULES = (
    ConfidenceSchedule(),
    ConfidenceSchedule("position", 0.5),
    ConfidenceSchedule("product", 0.3),
    COST_SCHEDULE,
)


@pytest.mark.parametrize("head", [None, *HEAD_TYPES])
@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: s.describe())
def test_greedy_random_draft_equals_plain_and_hf_generate(
    head: str | None, schedule: ConfidenceSchedule
) -> None:
    target = make_target(seed=3)
    draft = make_draft(target, head=head, block_size=4, seed=11)
    rejected = 0
    for seed in range(3):
        ids = prompt(3 + 4 * seed, 32, seed)
        spec = speculative_generate(target, draft, ids, max_new_tokens=20, schedule=schedule, eos_token_id=[])
        plain = plain_generate(target, ids, max_new_tokens=20, eos_token_id=[])
        assert tokens(spec) == tokens(plain) == hf_greedy(target, ids, 20)
        assert spec.metrics.new_tokens == 20
        rejected += sum(
            p - a
            for p, a in zip(spec.metrics.proposed_per_round, spec.metrics.accepted_per_round, strict=True)
        )
    assert rejected > 0, "an untrained draft should see rejections; this run did not test them"


@pytest.mark.parametrize("head", HEAD_TYPES)
@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: s.describe())
def test_greedy_oracle_draft_is_exact_with_full_acceptance(head: str, schedule: ConfidenceSchedule) -> None:
    target = make_target(seed=5, bigram=True)
    draft = make_oracle(target, head=head, block_size=5)
    for seed in range(3):
        ids = prompt(2 + 3 * seed, 32, 100 + seed)
        spec = speculative_generate(target, draft, ids, max_new_tokens=23, schedule=schedule, eos_token_id=[])
        assert tokens(spec) == tokens(plain_generate(target, ids, max_new_tokens=23, eos_token_id=[]))
        assert tokens(spec) == hf_greedy(target, ids, 23)
        metrics = spec.metrics
        assert metrics.accepted_per_round == metrics.proposed_per_round
        if not schedule.enabled:
            # 1 prefill token, then rounds of 5 proposals + 1 bonus: 1 + 6 + 6 + 6 + 4.
            assert metrics.committed_per_round == (6, 6, 6, 4)
            assert metrics.tau == pytest.approx(22 / 4)
            assert metrics.accept_rates() == [1.0] * 5


@settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    target_seed=st.integers(0, 10_000),
    draft_seed=st.integers(0, 10_000),
    head=st.sampled_from([None, *HEAD_TYPES]),
    oracle=st.booleans(),
    block_size=st.integers(1, 6),
    data=st.data(),
)
def test_greedy_is_exact_across_random_configs(
    target_seed: int, draft_seed: int, head: str | None, oracle: bool, block_size: int, data: st.DataObject
) -> None:
    oracle = oracle and head is not None
    target = make_target(vocab=24, seed=target_seed, bigram=oracle, layers=data.draw(st.integers(1, 3)))
    if oracle:
        assert head is not None
        draft = make_oracle(target, head=head, block_size=block_size)
    else:
        draft = make_draft(target, head=head, block_size=block_size, seed=draft_seed)
    proposal_length = data.draw(st.one_of(st.none(), st.integers(1, block_size)))
    schedule = data.draw(
        st.one_of(
            st.just(ConfidenceSchedule()),
            st.builds(ConfidenceSchedule, st.sampled_from(["position", "product"]), st.floats(0.0, 1.0)),
            st.just(COST_SCHEDULE),
        )
    )
    ids = torch.tensor([data.draw(st.lists(st.integers(0, 22), min_size=1, max_size=12))])
    max_new = data.draw(st.integers(1, 16))
    spec = speculative_generate(
        target, draft, ids, max_new_tokens=max_new, schedule=schedule, proposal_length=proposal_length
    )
    plain = plain_generate(target, ids, max_new_tokens=max_new)
    assert tokens(spec) == tokens(plain) == hf_greedy(target, ids, max_new)
    assert all(r.drafted <= (proposal_length or block_size) for r in spec.rounds)


# -- sampling is lossless ---------------------------------------------------------------------

# Each chi-square test below fails a correct sampler with probability ALPHA. The seeds are fixed,
# so the outcome is deterministic; ALPHA bounds the chance that a seed choice is unlucky.
ALPHA = 1e-3
SAMPLING_RUNS = 1500
SAMPLING_VOCAB = 8


def exact_first_tokens(
    target: Qwen3ForCausalLM, ids: Tensor, count: int, **sampling: Any
) -> dict[tuple[int, ...], float]:
    """The target's exact distribution of its first ``count`` generated tokens, by enumeration."""
    vocab = target.config.vocab_size
    prefixes = [tuple[int, ...]()]
    probs: dict[tuple[int, ...], float] = {(): 1.0}
    for _ in range(count):
        batch = torch.tensor([ids[0].tolist() + list(prefix) for prefix in prefixes])
        with torch.no_grad():
            step = filtered_probs(target(batch).logits[:, -1, :], **sampling).double()
        extended: dict[tuple[int, ...], float] = {}
        for row, prefix in enumerate(prefixes):
            for token in range(vocab):
                mass = probs[prefix] * float(step[row, token])
                if mass > 0:
                    extended[(*prefix, token)] = mass
        probs = extended
        prefixes = list(probs)
    return probs


def chi_square_p_value(
    counts: Counter[tuple[int, ...]], expected: dict[tuple[int, ...], float], runs: int
) -> float:
    """Pearson's test; cells expecting fewer than 5 hits are pooled into one cell."""
    impossible = [outcome for outcome in counts if outcome not in expected]
    assert not impossible, f"sampled outcomes the target gives probability 0: {impossible[:5]}"
    statistic, cells, pooled_obs, pooled_exp = 0.0, 0, 0, 0.0
    for outcome, prob in expected.items():
        mean = prob * runs
        if mean >= 5:
            statistic += (counts[outcome] - mean) ** 2 / mean
            cells += 1
        else:
            pooled_obs += counts[outcome]
            pooled_exp += mean
    if pooled_exp > 0:
        statistic += (pooled_obs - pooled_exp) ** 2 / pooled_exp
        cells += 1
    dof = cells - 1
    assert dof >= 5, "too few cells for a meaningful test"
    # The chi-square survival function is the regularised upper incomplete gamma function.
    return float(
        torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(statistic / 2))
    )


def skewed_draft(target: Qwen3ForCausalLM, block_size: int) -> Qwen3DSparkModel:
    """A draft far from the target: a strong random Markov correction dominates its logits."""
    draft = make_draft(target, head="vanilla", rank=SAMPLING_VOCAB, block_size=block_size, seed=7)
    assert draft.markov_head is not None
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(8)
        draft.markov_head.markov_w1.weight.copy_(torch.eye(SAMPLING_VOCAB))
        draft.markov_head.markov_w2.weight.normal_(0.0, 2.5)
    return draft


#: a cost schedule for 2-slot drafts whose choice (0, 1 or 2 slots) follows the sharpened confidences
SAMPLING_COST_SCHEDULE = ConfidenceSchedule("cost", temperatures=(0.1, 0.1), round_seconds=(1.0, 1.2, 1.45))


@pytest.mark.parametrize(
    ("case", "sampling", "schedule"),
    [
        ("oracle", {"temperature": 1.0}, None),
        ("skewed", {"temperature": 1.0}, None),
        ("skewed", {"temperature": 0.7, "top_k": 5, "top_p": 0.9}, None),
        ("skewed", {"temperature": 1.0}, SAMPLING_COST_SCHEDULE),
    ],
)
def test_sampling_matches_the_target_distribution(
    case: str, sampling: dict[str, Any], schedule: ConfidenceSchedule | None
) -> None:
    target = make_target(vocab=SAMPLING_VOCAB, seed=21, bigram=case == "oracle", sharpness=12.0)
    draft = make_oracle(target, block_size=2) if case == "oracle" else skewed_draft(target, block_size=2)
    ids = prompt(4, SAMPLING_VOCAB, 9)
    expected = exact_first_tokens(target, ids, 3, **sampling)

    counts: Counter[tuple[int, ...]] = Counter()
    first_round: Counter[int] = Counter()
    lengths: Counter[int] = Counter()
    for seed in range(SAMPLING_RUNS):
        result = speculative_generate(
            target,
            draft,
            ids,
            max_new_tokens=4,
            seed=seed,
            eos_token_id=[],
            check_fit=seed == 0,
            schedule=schedule,
            **sampling,
        )
        # Budget 4 lets round 1 draft 2 slots, so tokens 2 and 3 can both be accepted proposals.
        counts[tuple(result.new_tokens[:3])] += 1
        first_round[result.metrics.accepted_per_round[0]] += 1
        lengths[result.metrics.proposed_per_round[0]] += 1
    if schedule is not None:
        # The schedule cut proposals to different lengths, so the test covers its truncation.
        assert len(lengths) >= 2, f"the cost schedule always chose the same length: {lengths}"

    p_value = chi_square_p_value(counts, expected, SAMPLING_RUNS)
    assert p_value > ALPHA, f"sampled first tokens differ from the target's distribution (p={p_value:.2e})"
    if case == "oracle":
        # Tokens 2 and 3 come from the draft's accepted proposals almost always.
        assert first_round[2] >= 0.99 * SAMPLING_RUNS
    else:
        # Both the residual and the accept paths were exercised, so the test can see a wrong residual.
        assert first_round[0] >= 0.2 * SAMPLING_RUNS and first_round[0] < SAMPLING_RUNS


def test_skewed_draft_alone_would_fail_the_test() -> None:
    """The test above has power: committing the skewed draft's first proposal unverified would be far
    off the target (the TV distance of the first two tokens is large)."""
    target = make_target(vocab=SAMPLING_VOCAB, seed=21, sharpness=12.0)
    draft = skewed_draft(target, block_size=2)
    ids = prompt(4, SAMPLING_VOCAB, 9)
    exact = exact_first_tokens(target, ids, 2, temperature=1.0)
    with torch.no_grad():
        unverified: dict[tuple[int, ...], float] = {}
        # After the prefill the draft holds the prompt's features and drafts after the first token.
        features = capture_target_features(target, ids, list(draft.config.target_layer_ids)).features
        for first in range(SAMPLING_VOCAB):
            proposal = draft.propose(torch.tensor([first]), features, draft.new_cache(), temperature=1.0)
            p_first = exact_first_tokens(target, ids, 1, temperature=1.0).get((first,), 0.0)
            for second in range(SAMPLING_VOCAB):
                unverified[(first, second)] = p_first * float(proposal.probs[0, 0, second])
    tv = 0.5 * sum(abs(exact.get(k, 0.0) - unverified.get(k, 0.0)) for k in set(exact) | set(unverified))
    assert tv > 0.3


# -- bookkeeping ------------------------------------------------------------------------------


class TargetTrace:
    """Observes every target forward: tokens fed, cache length before it, positions."""

    def __init__(self, target: Qwen3ForCausalLM) -> None:
        self.calls: list[tuple[int, int, list[int]]] = []
        self.handle = target.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ids = kwargs["input_ids"]
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        assert cache is not None, "every target forward must use the KV cache"
        self.calls.append(
            (int(ids.shape[1]), int(cache.get_seq_length()), kwargs["position_ids"][0].tolist())
        )


def observe_draft(draft: Qwen3DSparkModel, monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int, int]]:
    """Records ``(cache length before, new context rows, cache length after)`` of each proposal."""
    calls: list[tuple[int, int, int]] = []
    propose = draft.propose

    def recording(anchor: Tensor, features: Tensor, cache: Any, **kwargs: Any) -> Any:
        before = cache.length
        out = propose(anchor, features, cache, **kwargs)
        calls.append((before, int(features.shape[1]), cache.length))
        return out

    monkeypatch.setattr(draft, "propose", recording)
    return calls


@pytest.mark.parametrize("kind", ["random", "oracle"])
def test_forwards_tokens_fed_and_cache_lengths(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    target = make_target(seed=4, bigram=kind == "oracle")
    draft = (
        make_oracle(target, block_size=4) if kind == "oracle" else make_draft(target, block_size=4, seed=2)
    )
    trace = TargetTrace(target)
    draft_calls = observe_draft(draft, monkeypatch)
    records: list[RoundRecord] = []
    ids = prompt(6, 32, 1)
    result = speculative_generate(
        target, draft, ids, max_new_tokens=19, eos_token_id=[], on_round=records.append
    )
    trace.handle.remove()

    metrics = result.metrics
    assert len(trace.calls) == metrics.target_forwards == metrics.rounds + 1 == len(records) + 1
    # The prefill feeds the prompt into an empty cache; each round feeds l + 1 tokens at the committed end.
    assert trace.calls[0] == (6, 0, list(range(6)))
    committed = 6 + 1  # the prompt and the prefill's token
    for record, (fed, cache_before, positions) in zip(records, trace.calls[1:], strict=True):
        s = committed - 1
        assert record.anchor_position == s
        assert fed == record.proposed + 1 == record.target_tokens_fed
        assert cache_before == s and positions == list(range(s, s + fed))
        assert record.target_cache_length == s + record.accepted + 1
        committed += len(record.committed)
    assert committed == result.sequences.shape[1] == 6 + 19

    # The draft sees each context row exactly once and never keeps its block's rows.
    drafting = [r for r in records if r.drafted > 0]
    assert len(draft_calls) == len(drafting) == metrics.draft_forwards
    fed_rows = 0
    for (before, rows, after), record in zip(draft_calls, drafting, strict=True):
        assert (
            before == fed_rows
            and after == before + rows == record.anchor_position == record.draft_cache_length
        )
        fed_rows = after
    assert draft_calls[0][1] == 6

    if kind == "oracle":
        assert all(r.accepted == r.proposed for r in records) and max(r.proposed for r in records) == 4
    else:
        assert any(r.accepted == 0 and r.proposed > 0 for r in records)


def test_rounds_never_exceed_max_new_tokens() -> None:
    target = make_target(seed=6, bigram=True)
    draft = make_oracle(target, block_size=6)
    records: list[RoundRecord] = []
    result = speculative_generate(target, draft, prompt(3, 32, 2), max_new_tokens=10, on_round=records.append)
    # 1 from the prefill, then 6 + 1 committed, then only 2 tokens left: draft 1 slot and verify 2.
    assert [r.drafted for r in records] == [6, 1]
    assert [len(r.committed) for r in records] == [7, 2]
    assert result.metrics.new_tokens == 10


def test_single_token_budget_needs_only_the_prefill() -> None:
    target = make_target(seed=6)
    draft = make_draft(target)
    result = speculative_generate(target, draft, prompt(3, 32, 2), max_new_tokens=1)
    assert result.metrics.rounds == 0 and result.metrics.target_forwards == 1
    assert tokens(result) == tokens(plain_generate(target, prompt(3, 32, 2), max_new_tokens=1))


def test_eos_inside_an_accepted_run_stops_exactly_there() -> None:
    target = make_target(seed=8, bigram=True)
    draft = make_oracle(target, block_size=5)
    ids = prompt(4, 32, 3)
    records: list[RoundRecord] = []
    free = speculative_generate(
        target, draft, ids, max_new_tokens=30, eos_token_id=[], on_round=records.append
    )
    generated = free.new_tokens
    # A token that first appears among a round's accepted tokens with more accepted ones after it.
    choice = None
    position = 1  # generated[0] came from the prefill
    for record in records:
        for offset, token in enumerate(record.committed):
            if (
                choice is None
                and offset + 1 < record.accepted
                and generated.index(token) == position + offset
            ):
                choice = (token, record.index, offset)
        position += len(record.committed)
    assert choice is not None, "no token first appears mid-run; pick another seed"
    eos, round_index, offset = choice

    stopped_records: list[RoundRecord] = []
    stopped = speculative_generate(
        target, draft, ids, max_new_tokens=30, eos_token_id=eos, on_round=stopped_records.append
    )
    expected = generated[: generated.index(eos) + 1]
    assert stopped.new_tokens == expected
    assert stopped.new_tokens == plain_generate(target, ids, max_new_tokens=30, eos_token_id=eos).new_tokens
    assert stopped.metrics.stop_reason == "eos"
    last = stopped_records[-1]
    assert last.index == round_index and last.accepted > offset + 1 and len(last.committed) == offset + 1
    assert stopped.metrics.rounds == round_index + 1


def test_eos_defaults_to_the_target_generation_config() -> None:
    target = make_target(seed=8, bigram=True)
    draft = make_oracle(target, block_size=5)
    ids = prompt(4, 32, 3)
    generated = speculative_generate(target, draft, ids, max_new_tokens=30, eos_token_id=[]).new_tokens
    target.generation_config.eos_token_id = generated[5]
    result = speculative_generate(target, draft, ids, max_new_tokens=30)
    assert result.new_tokens == generated[: generated.index(generated[5]) + 1]
    assert result.new_tokens == hf_greedy_eos(target, ids, 30)


def hf_greedy_eos(target: Qwen3ForCausalLM, ids: Tensor, max_new_tokens: int) -> list[int]:
    """The new tokens of ``target.generate`` (which stops at the config's EOS)."""
    return hf_greedy(target, ids, max_new_tokens)[ids.shape[1] :]


# -- scheduling -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["position", "product"])
@pytest.mark.parametrize("kind", ["random", "oracle"])
def test_threshold_one_verifies_the_anchor_alone_and_stays_exact(mode: str, kind: str) -> None:
    target = make_target(seed=9, bigram=kind == "oracle")
    draft = make_oracle(target, block_size=4) if kind == "oracle" else make_draft(target, block_size=4)
    if kind == "oracle":
        # Confident enough that sigmoid rounds to 1.0 in float32: the threshold must still hold.
        assert draft.confidence_head is not None
        with torch.no_grad():
            draft.confidence_head.proj.bias.fill_(30.0)
    trace = TargetTrace(target)
    records: list[RoundRecord] = []
    ids = prompt(5, 32, 4)
    result = speculative_generate(
        target, draft, ids, max_new_tokens=12, schedule=ConfidenceSchedule(mode, 1.0), on_round=records.append
    )
    trace.handle.remove()
    assert all(r.proposed == 0 for r in records)
    # The last round has a budget of one token, so it verifies the anchor without drafting.
    assert all(r.drafted > 0 for r in records[:-1]) and records[-1].drafted == 0
    assert [fed for fed, _, _ in trace.calls[1:]] == [1] * 11
    assert result.metrics.tau == 1.0 and result.metrics.mean_proposal_length == 0.0
    assert tokens(result) == tokens(plain_generate(target, ids, max_new_tokens=12))


def test_schedule_lengths() -> None:
    conf = torch.logit(torch.tensor([0.9, 0.8, 0.4, 0.95]))
    assert ConfidenceSchedule().proposal_length(conf, 4) == 4
    assert ConfidenceSchedule("position", 0.5).proposal_length(conf, 4) == 2
    assert ConfidenceSchedule("position", 0.85).proposal_length(conf, 4) == 1
    assert ConfidenceSchedule("position", 0.0).proposal_length(conf, 4) == 4
    # Running products: 0.9, 0.72, 0.288, 0.2736.
    assert ConfidenceSchedule("product", 0.7).proposal_length(conf, 4) == 2
    assert ConfidenceSchedule("product", 0.75).proposal_length(conf, 4) == 1
    assert ConfidenceSchedule("product", 0.25).proposal_length(conf, 4) == 4
    assert ConfidenceSchedule("product", 1.0).proposal_length(torch.full((4,), 50.0), 4) == 0
    assert ConfidenceSchedule("position", 0.5).proposal_length(conf, 2) == 2


def test_cost_schedule_lengths() -> None:
    # Survival 0.9, 0.72, 0.288, 0.2736: expected tokens 1, 1.9, 2.62, 2.908, 3.1816 for l = 0..4.
    conf = torch.logit(torch.tensor([0.9, 0.8, 0.4, 0.95]))
    flat = ConfidenceSchedule("cost").with_costs([1.0] * 5)
    assert flat.proposal_length(conf, 4) == 4  # verifying is free: take everything
    steep = ConfidenceSchedule("cost").with_costs([1.0, 1.5, 2.0, 2.5, 3.0])
    # rates 1, 1.267, 1.31, 1.163, 1.061: two slots
    assert steep.proposal_length(conf, 4) == 2
    dear = ConfidenceSchedule("cost").with_costs([1.0, 4.0, 4.0, 4.0, 4.0])
    assert dear.proposal_length(conf, 4) == 0
    # Temperatures reshape the survival: a hot first slot (T=10) gives sigmoid(logit(0.9)/10) ~ 0.55.
    hot = steep.with_calibration([10.0])
    assert hot.proposal_length(conf, 4) == 1
    with pytest.raises(DraftConfigError, match="round costs"):
        ConfidenceSchedule("cost").with_costs([1.0, 1.0]).proposal_length(conf, 4)
    with pytest.raises(ValueError, match="> 0"):
        ConfidenceSchedule("cost", round_seconds=(1.0, 0.0))


def test_cost_schedule_without_costs_is_an_error() -> None:
    target = make_target()
    draft = make_draft(target, block_size=4)
    with pytest.raises(DraftConfigError, match="round at every length"):
        speculative_generate(
            target, draft, prompt(3, 32, 0), max_new_tokens=4, schedule=ConfidenceSchedule.parse("cost")
        )


def test_schedule_parsing() -> None:
    assert ConfidenceSchedule.parse("off") == ConfidenceSchedule()
    assert ConfidenceSchedule.parse("cost") == ConfidenceSchedule("cost")
    assert ConfidenceSchedule.parse("cost").describe() == "cost"
    assert ConfidenceSchedule.parse("position:0.5") == ConfidenceSchedule("position", 0.5)
    assert ConfidenceSchedule.parse(" product:0.3 ") == ConfidenceSchedule("product", 0.3)
    assert ConfidenceSchedule.parse("product:0.3").describe() == "product:0.3"
    for bad in ("on", "position", "position:x", "product:1.5", "off:0.2", "position:-0.1", "cost:0.5"):
        with pytest.raises(ValueError):
            ConfidenceSchedule.parse(bad)


def test_schedule_without_confidence_head_is_an_error() -> None:
    target = make_target()
    draft = make_draft(target, confidence=False)
    with pytest.raises(DraftConfigError, match="confidence head"):
        speculative_generate(
            target, draft, prompt(3, 32, 0), max_new_tokens=4, schedule=ConfidenceSchedule("position", 0.5)
        )


# -- metrics ----------------------------------------------------------------------------------


def metrics(
    proposed: tuple[int, ...], accepted: tuple[int, ...], committed: tuple[int, ...]
) -> SpeculativeMetrics:
    return SpeculativeMetrics(
        prompt_tokens=3,
        new_tokens=1 + sum(committed),
        committed_per_round=committed,
        accepted_per_round=accepted,
        proposed_per_round=proposed,
        draft_time_s=0.5,
        target_time_s=1.0,
        total_time_s=2.0,
        target_forwards=len(committed) + 1,
        draft_forwards=len(committed),
        stop_reason="max_new_tokens",
    )


def test_metrics_definitions() -> None:
    m = metrics(proposed=(4, 4, 2, 0), accepted=(4, 1, 0, 0), committed=(5, 2, 1, 1))
    assert m.rounds == 4
    assert m.tau == pytest.approx(9 / 4)
    assert m.mean_proposal_length == pytest.approx(10 / 4)
    # @0: 2 of 3 rounds proposing >0 accepted >0; @1: 1 of 3; @2: 1 of 2; @3: 1 of 2.
    assert m.accept_rates() == pytest.approx([2 / 3, 1 / 3, 1 / 2, 1 / 2])
    assert m.tokens_per_s == pytest.approx(10 / 2.0)
    both = combine_metrics([m, metrics(proposed=(3,), accepted=(3,), committed=(4,))])
    assert both.rounds == 5 and both.tau == pytest.approx(13 / 5) and both.generations == 2
    assert both.accept_rates() == pytest.approx([3 / 4, 2 / 4, 2 / 3, 1 / 2])
    summary = both.as_dict()
    assert summary["rounds"] == 5 and summary["accept_rate"] == both.accept_rates()


def test_real_run_metrics_are_consistent() -> None:
    target = make_target(seed=12)
    draft = make_draft(target, block_size=3, seed=4)
    result = speculative_generate(target, draft, prompt(5, 32, 5), max_new_tokens=15, eos_token_id=[])
    m = result.metrics
    assert m.new_tokens == 15 == 1 + sum(m.committed_per_round)
    assert all(c == a + 1 for c, a in zip(m.committed_per_round, m.accepted_per_round, strict=True))
    assert m.draft_time_s > 0 and m.target_time_s > 0
    assert m.draft_time_s + m.target_time_s <= m.total_time_s
    assert m.tokens_per_s > 0


# -- bad input --------------------------------------------------------------------------------


def test_target_layer_ids_that_do_not_fit_the_target() -> None:
    deep = make_target(layers=4)
    draft = make_draft(deep, layer_ids=[0, 3])
    shallow = make_target(layers=2)
    draft.attach_target_weights(shallow)
    with pytest.raises(DraftConfigError, match="target_layer_ids"):
        speculative_generate(shallow, draft, prompt(3, 32, 0), max_new_tokens=4)


def test_num_target_layers_that_do_not_fit_the_target() -> None:
    draft = make_draft(make_target(layers=3), layer_ids=[0, 1])
    shallow = make_target(layers=2)
    draft.attach_target_weights(shallow)
    with pytest.raises(DraftConfigError, match="3-layer target"):
        speculative_generate(shallow, draft, prompt(3, 32, 0), max_new_tokens=4)


def test_vocabulary_that_does_not_fit_the_target() -> None:
    draft = make_draft(make_target(vocab=48))
    with pytest.raises(DraftConfigError, match="vocab_size"):
        speculative_generate(make_target(vocab=32), draft, prompt(3, 32, 0), max_new_tokens=4)


def test_block_size_that_does_not_fit_the_target() -> None:
    target = make_target()
    draft = make_draft(target)
    draft.config.block_size = target.config.max_position_embeddings
    with pytest.raises(DraftConfigError, match="block_size"):
        check_draft_fits_target(draft, target)
    draft.config.block_size = 0
    with pytest.raises(DraftConfigError, match="block_size"):
        check_draft_fits_target(draft, target)


def test_the_fit_check_validates_the_whole_draft_config() -> None:
    # A config edited after construction is validated again before decoding, as on load.
    target = make_target()
    draft = make_draft(target)
    draft.check_fits_target(target)
    draft.config.target_layer_ids = [0, 0]
    with pytest.raises(DraftConfigError, match="target_layer_ids"):
        draft.check_fits_target(target)
    draft.config.target_layer_ids = [0]
    draft.config.confidence_head_with_markov = True
    draft.config.enable_confidence_head = True
    draft.config.markov_rank = 0
    with pytest.raises(DraftConfigError, match="confidence_head_with_markov"):
        speculative_generate(target, draft, prompt(3, 32, 0), max_new_tokens=4)


def test_draft_without_the_target_embeddings() -> None:
    target = make_target()
    zeroed = make_draft(target)
    with torch.no_grad():
        zeroed.embed_tokens.weight.zero_()
    with pytest.raises(DraftConfigError, match="all zeros"):
        speculative_generate(target, zeroed, prompt(3, 32, 0), max_new_tokens=4)
    # Same shapes, another target's weights: what a checkpoint saved without them loads with.
    foreign = make_draft(make_target(seed=99))
    with pytest.raises(DraftConfigError, match="differs from the target"):
        speculative_generate(target, foreign, prompt(3, 32, 0), max_new_tokens=4)
    with torch.no_grad():
        own = make_draft(target)
        own.lm_head.weight[0, 0] += 1.0
    with pytest.raises(DraftConfigError, match="lm_head"):
        speculative_generate(target, own, prompt(3, 32, 0), max_new_tokens=4)


def test_a_bf16_draft_of_an_fp32_target_fits_and_runs() -> None:
    target = make_target()
    draft = make_draft(target).to(torch.bfloat16)
    check_draft_fits_target(draft, target)
    result = speculative_generate(target, draft, prompt(3, 32, 0), max_new_tokens=8, temperature=1.0, seed=0)
    assert result.sequences.shape == (1, 11)


@pytest.mark.parametrize("length", [0, 5])
def test_proposal_length_outside_the_block(length: int) -> None:
    target = make_target()
    draft = make_draft(target, block_size=4)
    with pytest.raises(ValueError, match="proposal_length"):
        speculative_generate(target, draft, prompt(3, 32, 0), max_new_tokens=4, proposal_length=length)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"seed": 1, "generator": torch.Generator()}, "seed or generator"),
    ],
)
def test_bad_sampling_arguments(kwargs: dict[str, Any], match: str) -> None:
    target = make_target()
    draft = make_draft(target)
    arguments: dict[str, Any] = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        speculative_generate(target, draft, prompt(3, 32, 0), **arguments)
    if "seed" not in kwargs:
        with pytest.raises(ValueError, match=match):
            plain_generate(target, prompt(3, 32, 0), **arguments)


@pytest.mark.parametrize(
    ("ids", "match"),
    [
        (torch.zeros((1, 0), dtype=torch.long), "empty"),
        (torch.zeros((2, 3), dtype=torch.long), "batch size 1"),
        (torch.zeros((1, 3)), "integer"),
    ],
)
def test_bad_prompts(ids: Tensor, match: str) -> None:
    target = make_target()
    with pytest.raises(ValueError, match=match):
        speculative_generate(target, make_draft(target), ids, max_new_tokens=4)
    with pytest.raises(ValueError, match=match):
        plain_generate(target, ids, max_new_tokens=4)


def test_one_dimensional_prompt_is_accepted() -> None:
    target = make_target()
    draft = make_draft(target)
    flat = speculative_generate(target, draft, prompt(4, 32, 1)[0], max_new_tokens=5)
    assert tokens(flat) == tokens(speculative_generate(target, draft, prompt(4, 32, 1), max_new_tokens=5))


# -- transformers compatibility ---------------------------------------------------------------


def test_cache_kwarg_is_detected_from_the_signature() -> None:
    def new_style(input_ids: Tensor, cache: Any = None, logits_to_keep: int = 0) -> None: ...

    def old_style(input_ids: Tensor, past_key_values: Any = None) -> None: ...

    def neither(input_ids: Tensor) -> None: ...

    assert _forward_kwargs(new_style) == ("cache", True)
    assert _forward_kwargs(old_style) == ("past_key_values", False)
    with pytest.raises(TypeError, match="past_key_values"):
        _forward_kwargs(neither)


def test_no_deprecation_warnings(capfd: pytest.CaptureFixture[str]) -> None:
    target = make_target(seed=13)
    draft = make_draft(target)
    capfd.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        speculative_generate(target, draft, prompt(4, 32, 0), max_new_tokens=10, temperature=0.8, seed=1)
        plain_generate(target, prompt(4, 32, 0), max_new_tokens=10)
    out, err = capfd.readouterr()
    assert "deprecat" not in (out + err).lower()


def test_enumeration_helper_sums_to_one() -> None:
    target = make_target(vocab=SAMPLING_VOCAB, seed=21, sharpness=12.0)
    dist = exact_first_tokens(target, prompt(4, SAMPLING_VOCAB, 9), 2, temperature=0.7, top_k=5, top_p=0.9)
    assert math.isclose(sum(dist.values()), 1.0, rel_tol=1e-6)
    assert all(len(k) == 2 for k in dist) and len(dist) <= 25
    assert set(itertools.chain.from_iterable(dist)) <= set(range(SAMPLING_VOCAB))


# -- feature capture around cached forwards ---------------------------------------------------


def test_cached_capture_equals_uncached_hidden_states() -> None:
    from transformers import DynamicCache

    from dspark_core.modeling.features import capture_layer_outputs

    target = make_target(layers=3, seed=14)
    ids = prompt(9, 32, 6)
    layer_ids = [-1, 0, 2]
    with torch.no_grad():
        reference = target(ids, output_hidden_states=True).hidden_states
        expected = torch.cat([reference[i + 1] for i in layer_ids], dim=-1)
        # transformers renamed past_key_values to cache in 5.24; both ends of the range are tested.
        cache_kwarg = (
            "cache" if "cache" in inspect.signature(target.forward).parameters else "past_key_values"
        )
        cache = {cache_kwarg: DynamicCache(config=target.config)}
        with capture_layer_outputs(target, layer_ids) as capture:
            target(ids[:, :6], **cache, use_cache=True)
            head = capture.features()
            target(ids[:, 6:], **cache, use_cache=True)
            tail = capture.features()
    assert head.shape == (1, 6, 3 * 32) and tail.shape == (1, 3, 3 * 32)
    torch.testing.assert_close(torch.cat([head, tail], dim=1), expected, rtol=1e-5, atol=1e-5)


def forward_hooks(model: torch.nn.Module) -> int:
    return sum(len(module._forward_hooks) + len(module._forward_pre_hooks) for module in model.modules())


def test_generation_leaves_no_hooks_behind() -> None:
    target = make_target(seed=15)
    draft = make_draft(target)
    before = forward_hooks(target)
    speculative_generate(target, draft, prompt(4, 32, 0), max_new_tokens=6)

    def stop(record: RoundRecord) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        speculative_generate(target, draft, prompt(4, 32, 0), max_new_tokens=6, on_round=stop)
    assert forward_hooks(target) == before


def test_a_schedule_registered_by_name_is_listed_parsed_and_used() -> None:
    from dspark_core.decoding import schedule as schedules

    @schedules.register_schedule
    class FirstSlotOnly(schedules.ScheduleRule):
        """Verify one slot when its confidence reaches T, none otherwise."""

        name = "first-slot-test"
        help = "test rule"

        def cut(self, log_confidence: list[float], log_threshold: float) -> int:
            return 1 if log_confidence and log_confidence[0] >= log_threshold else 0

    try:
        assert "first-slot-test" in schedules.schedule_names()
        assert "first-slot-test:T" in schedules.describe_schedules()
        parsed = ConfidenceSchedule.parse("first-slot-test:0")
        assert (
            parsed == ConfidenceSchedule("first-slot-test", 0.0) and parsed.describe() == "first-slot-test:0"
        )
        target = make_target(seed=9)
        draft = make_draft(target, block_size=4)
        records: list[RoundRecord] = []
        ids = prompt(5, 32, 4)
        result = speculative_generate(
            target, draft, ids, max_new_tokens=10, schedule=parsed, on_round=records.append
        )
        assert records and all(r.proposed == min(1, r.drafted) for r in records)
        assert tokens(result) == tokens(plain_generate(target, ids, max_new_tokens=10))
    finally:
        schedules._RULES.pop("first-slot-test", None)


def test_schedule_module_imports_no_torch() -> None:
    code = "import sys, dspark_core.decoding.schedule as s; print(s.schedule_names(), 'torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "('off', 'position', 'product', 'cost') False"
