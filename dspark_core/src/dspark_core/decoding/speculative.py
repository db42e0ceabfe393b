"""Speculative generation with a DSpark draft (method reference, section 6), and the plain baseline.

Batch size 1. Each round:

1. the draft receives only the target features of the context rows committed since its last call,
   appends them to its context-only cache and proposes up to ``block_size`` tokens ``d_k`` with
   their distributions ``q_k`` (serially through the Markov head);
2. an optional :class:`ConfidenceSchedule` truncates the proposal to ``l`` tokens;
3. the target verifies ``[x_s, d_0 .. d_{l-1}]`` (exactly ``l + 1`` tokens) against its cache;
4. greedy: accept while ``d_i == argmax p_i``; sampling: accept ``d_i`` with probability
   ``min(1, p_i[d_i] / q_i[d_i])``, at the first rejection draw from ``norm(max(p_i - q_i, 0))``,
   and if all are accepted draw the bonus token from ``p_l``;
5. the target cache is cropped to the committed length and the accepted rows' features become the
   draft's next context rows.

A round commits at most ``l + 1`` tokens, so the draft never proposes past ``max_new_tokens``; when a
single token of budget is left, the round verifies the anchor alone without calling the draft.

``p`` and ``q`` both come from :func:`~dspark_core.modeling.sampling.filtered_probs` in float32, so
scoring and sampling share one precision and one filter, which is what makes sampling lossless.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from dspark_core.decoding.fit import check_draft_fits_target
from dspark_core.decoding.metrics import GenerationResult, RoundRecord, SpeculativeMetrics, StopReason
from dspark_core.decoding.schedule import ConfidenceSchedule
from dspark_core.decoding.target import CachedTarget, synchronize
from dspark_core.decoding.verify import sample_token, verify_proposal
from dspark_core.errors import DraftConfigError
from dspark_core.modeling.features import LayerCapture, capture_layer_outputs
from dspark_core.modeling.fit import target_text_config
from dspark_core.modeling.sampling import check_sampling_options, filtered_probs
from dspark_core.validation import is_int

__all__ = ["plain_generate", "speculative_generate"]


def _prompt_row(input_ids: Tensor) -> Tensor:
    if not isinstance(input_ids, Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [1, P] (or [P]), got shape {tuple(input_ids.shape)}")
    if input_ids.shape[0] != 1:
        raise ValueError(
            f"speculative generation supports batch size 1, got a batch of {input_ids.shape[0]}; "
            "call it once per prompt"
        )
    if input_ids.shape[1] == 0:
        raise ValueError("the prompt is empty: give at least one token")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    return input_ids.long()


def _eos_ids(eos_token_id: int | Sequence[int] | None, target: nn.Module) -> frozenset[int]:
    if eos_token_id is None:
        generation_config = getattr(target, "generation_config", None)
        eos_token_id = getattr(generation_config, "eos_token_id", None)
        if eos_token_id is None:
            eos_token_id = getattr(target_text_config(target), "eos_token_id", None)
    if eos_token_id is None:
        return frozenset()
    if isinstance(eos_token_id, int):
        return frozenset({eos_token_id})
    return frozenset(int(t) for t in eos_token_id)


def _make_generator(
    seed: int | None, generator: torch.Generator | None, device: torch.device
) -> torch.Generator | None:
    if seed is not None and generator is not None:
        raise ValueError("pass either seed or generator, not both")
    if seed is None:
        return generator
    made = torch.Generator(device=device)
    made.manual_seed(seed)
    return made


@dataclass
class _Decode:
    """What both loops share: the checked prompt, sampling, stop tokens, the cached target, the RNG."""

    prompt: Tensor
    greedy: bool
    eos: frozenset[int]
    sampling: dict[str, Any]
    runner: CachedTarget
    rng: torch.Generator | None
    started: float
    generated: list[int] = field(default_factory=list)

    def sample(self, logits_row: Tensor) -> int:
        return sample_token(filtered_probs(logits_row, **self.sampling), self.rng, self.greedy)

    def first_token(self) -> Tensor | None:
        """Prefill the prompt, sample the first token; returns the prompt's captured features."""
        logits, features = self.runner.feed(self.prompt.to(self.runner.device), last_logits_only=True)
        self.generated.append(self.sample(logits[-1]))
        return features

    def sequences(self) -> Tensor:
        device = self.runner.device
        return torch.cat([self.prompt.to(device), torch.tensor([self.generated], device=device)], dim=1)

    def metrics(
        self, rounds: tuple[tuple[int, int, int], ...], stop: StopReason, draft_s: float, drafts: int
    ) -> SpeculativeMetrics:
        """``rounds`` holds (committed, accepted, proposed) per round."""
        synchronize(self.runner.device)
        committed, accepted, proposed = (
            (tuple(column) for column in zip(*rounds, strict=True)) if rounds else ((), (), ())
        )
        return SpeculativeMetrics(
            prompt_tokens=int(self.prompt.shape[1]),
            new_tokens=len(self.generated),
            committed_per_round=committed,
            accepted_per_round=accepted,
            proposed_per_round=proposed,
            draft_time_s=draft_s,
            target_time_s=self.runner.seconds,
            total_time_s=time.perf_counter() - self.started,
            target_forwards=self.runner.forwards,
            draft_forwards=drafts,
            stop_reason=stop,
        )


def _checked_prompt(
    input_ids: Tensor, max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None
) -> Tensor:
    prompt = _prompt_row(input_ids)
    check_sampling_options(temperature, top_k, top_p)
    if not is_int(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    return prompt


def _start(
    target: nn.Module,
    prompt: Tensor,
    *,
    started: float,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    eos_token_id: int | Sequence[int] | None,
    seed: int | None,
    generator: torch.Generator | None,
    capture: LayerCapture | None,
) -> _Decode:
    runner = CachedTarget(target, capture)
    return _Decode(
        prompt=prompt,
        greedy=temperature == 0,
        eos=_eos_ids(eos_token_id, target),
        sampling={"temperature": temperature, "top_k": top_k, "top_p": top_p},
        runner=runner,
        rng=_make_generator(seed, generator, runner.device),
        started=started,
    )


def _checked_proposal_options(
    draft: nn.Module, proposal_length: int | None, schedule: ConfidenceSchedule | None
) -> tuple[int, ConfidenceSchedule]:
    block_size = int(draft.config.block_size)  # type: ignore[union-attr,arg-type]
    if proposal_length is None:
        proposal_length = block_size
    if not is_int(proposal_length) or proposal_length < 1:
        raise ValueError(
            f"proposal_length must be an int of at least 1, got {proposal_length!r}: every round drafts at "
            "least one slot"
        )
    if proposal_length > block_size:
        raise ValueError(
            f"proposal_length must lie in [1, block_size={block_size}], got {proposal_length!r}: slots past "
            "the trained block size garble the proposal (vLLM saw this)"
        )
    schedule = schedule or ConfidenceSchedule()
    if schedule.enabled and getattr(draft, "confidence_head", None) is None:
        raise DraftConfigError(
            f"schedule {schedule.describe()!r} needs a confidence head, but the draft has none "
            "(enable_confidence_head=False); use schedule 'off'"
        )
    if schedule.needs_costs and len(schedule.round_seconds) <= proposal_length:
        raise DraftConfigError(
            f"schedule {schedule.describe()!r} needs the seconds of a round at every length "
            f"0..{proposal_length}, got {len(schedule.round_seconds)}: build it with "
            "dspark_core.decoding.costs.prepare_cost_schedule (or ConfidenceSchedule.with_costs)"
        )
    return proposal_length, schedule


@dataclass
class _Drafter:
    """The draft side of the loop: its cache, the context rows it has not seen, its time."""

    draft: nn.Module
    schedule: ConfidenceSchedule
    pending: Tensor
    cache: Any = None
    seconds: float = 0.0
    forwards: int = 0

    def __post_init__(self) -> None:
        self.device = next(self.draft.parameters()).device
        self.cache = self.draft.new_cache()  # type: ignore[operator]

    def propose(
        self, decode: _Decode, anchor: int, anchor_position: int, slots: int
    ) -> tuple[Tensor, Tensor, int, tuple[float, ...]]:
        """(tokens, their q rows, context rows consumed) after the schedule's cut, and the raw confidence
        logits of every drafted slot (empty without a confidence head)."""
        device = decode.runner.device
        if slots == 0:
            empty = torch.empty(0, dtype=torch.long, device=device)
            return empty, torch.empty(0, device=device), 0, ()
        synchronize(self.device)
        began = time.perf_counter()
        proposal = self.draft.propose(  # type: ignore[operator]
            torch.tensor([anchor], device=self.device),
            self.pending.to(self.device),
            self.cache,
            num_slots=slots,
            generator=decode.rng,
            **decode.sampling,
        )
        confidence = None if proposal.confidence is None else proposal.confidence[0]
        proposed = min(slots, self.schedule.proposal_length(confidence, slots))
        tokens = proposal.tokens[0, :proposed].to(device)
        probs = proposal.probs[0, :proposed].to(device)
        synchronize(self.device)
        self.seconds += time.perf_counter() - began
        self.forwards += 1
        self.cache.settle_at(anchor_position)
        consumed = int(self.pending.shape[1])
        self.pending = self.pending[:, :0]
        raw = () if confidence is None else tuple(float(c) for c in confidence[:slots].tolist())
        return tokens, probs, consumed, raw


def _round(decode: _Decode, drafter: _Drafter, slots: int, index: int) -> RoundRecord:
    """Draft ``slots`` tokens after the last one, verify them, commit what the target accepts."""
    anchor = decode.generated[-1]
    anchor_position = decode.prompt.shape[1] + len(decode.generated) - 1
    runner = decode.runner
    draft_tokens, draft_probs, context_rows, confidence = drafter.propose(
        decode, anchor, anchor_position, slots
    )
    draft_cache_length = int(drafter.cache.length)
    verify_input = torch.cat([torch.tensor([anchor], device=runner.device), draft_tokens]).unsqueeze(0)
    logits, features = runner.feed(verify_input)
    assert features is not None
    probs = filtered_probs(logits, **decode.sampling)
    accepted, next_token = verify_proposal(probs, draft_tokens, draft_probs, decode.rng, decode.greedy)
    runner.crop(anchor_position + accepted + 1)
    drafter.pending = torch.cat([drafter.pending, features[:, : accepted + 1]], dim=1)
    committed = [int(t) for t in draft_tokens[:accepted].tolist()] + [next_token]
    stop = next((i for i, token in enumerate(committed) if token in decode.eos), None)
    if stop is not None:
        committed = committed[: stop + 1]
    decode.generated.extend(committed)
    return RoundRecord(
        index=index,
        anchor_position=anchor_position,
        drafted=slots,
        proposed=int(draft_tokens.shape[0]),
        accepted=accepted,
        committed=tuple(committed),
        target_tokens_fed=int(verify_input.shape[1]),
        target_cache_length=runner.length,
        draft_cache_length=draft_cache_length,
        draft_context_rows=context_rows,
        confidence_logits=confidence,
    )


def speculative_generate(
    target: nn.Module,
    draft: nn.Module,
    input_ids: Tensor,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    schedule: ConfidenceSchedule | None = None,
    proposal_length: int | None = None,
    on_round: Callable[[RoundRecord], None] | None = None,
    check_fit: bool = True,
) -> GenerationResult:
    """Generate up to ``max_new_tokens`` tokens with ``target``, drafted by the DSpark ``draft``.

    The output distribution is exactly the target's (greedy: the same tokens as plain greedy
    decoding, up to floating-point ties between chunked and token-by-token target forwards).

    Args:
        target: an HF causal LM (e.g. ``Qwen3ForCausalLM``) with a KV cache.
        draft: a :class:`~dspark_core.modeling.draft.DSparkDraftModel` built for ``target``.
        input_ids: the prompt, ``[1, P]`` or ``[P]``; batch size 1 only.
        max_new_tokens: at least 1.
        temperature: 0 is greedy; ``top_k`` / ``top_p`` filter both the draft's ``q`` and the target's ``p``.
        eos_token_id: stop after any of these; ``None`` uses the target's generation config (as
            ``target.generate`` does) and ``[]`` never stops early.
        seed, generator: the sampling RNG (one of them; neither uses torch's global RNG).
        schedule: confidence-based truncation of each proposal; ``None`` is off.
        proposal_length: slots to draft per round, ``1 .. block_size`` (default ``block_size``).
        on_round: called with a :class:`RoundRecord` after each round (tracing, tests).
        check_fit: run :func:`check_draft_fits_target` first (it compares the embedding matrices).

    Returns:
        A :class:`GenerationResult`; ``metrics.target_forwards == metrics.rounds + 1``.

    Raises:
        ValueError: bad sampling arguments, an empty prompt, a batch > 1, ``max_new_tokens < 1``, or
            ``proposal_length`` outside ``[1, block_size]``.
        DraftConfigError: the draft does not fit the target, or a schedule needs a missing confidence head.
    """
    started = time.perf_counter()
    prompt = _checked_prompt(input_ids, max_new_tokens, temperature, top_k, top_p)
    options: dict[str, Any] = {
        "temperature": temperature,
        "top_k": top_k,
        "top_p": top_p,
        "eos_token_id": eos_token_id,
    }
    if check_fit:
        check_draft_fits_target(draft, target)
    proposal_length, schedule = _checked_proposal_options(draft, proposal_length, schedule)
    layer_ids = list(draft.config.target_layer_ids)  # type: ignore[union-attr,arg-type]
    with capture_layer_outputs(target, layer_ids) as capture:
        decode = _start(
            target, prompt, started=started, seed=seed, generator=generator, capture=capture, **options
        )
        features = decode.first_token()
        assert features is not None
        drafter = _Drafter(draft, schedule, pending=features)
        stop: StopReason = "eos" if decode.generated[0] in decode.eos else "max_new_tokens"
        records: list[RoundRecord] = []
        while stop != "eos" and len(decode.generated) < max_new_tokens:
            # A round commits at most l + 1 tokens, so never draft past the budget.
            slots = min(proposal_length, max_new_tokens - len(decode.generated) - 1)
            record = _round(decode, drafter, slots, len(records))
            if record.committed[-1] in decode.eos:
                stop = "eos"
            records.append(record)
            if on_round is not None:
                on_round(record)
    rounds = tuple((len(r.committed), r.accepted, r.proposed) for r in records)
    metrics = decode.metrics(rounds, stop, drafter.seconds, drafter.forwards)
    return GenerationResult(sequences=decode.sequences(), metrics=metrics, rounds=tuple(records))


def plain_generate(
    target: nn.Module,
    input_ids: Tensor,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
) -> GenerationResult:
    """Token-by-token decoding with the same target, cache and sampling code: the speedup baseline.

    Arguments as for :func:`speculative_generate`. Each decode step is reported as a round that
    proposed nothing (so ``tau == 1``).
    """
    started = time.perf_counter()
    prompt = _checked_prompt(input_ids, max_new_tokens, temperature, top_k, top_p)
    decode = _start(
        target,
        prompt,
        started=started,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        eos_token_id=eos_token_id,
        seed=seed,
        generator=generator,
        capture=None,
    )
    decode.first_token()
    generated = decode.generated
    while generated[-1] not in decode.eos and len(generated) < max_new_tokens:
        logits, _ = decode.runner.feed(torch.tensor([[generated[-1]]], device=decode.runner.device))
        generated.append(decode.sample(logits[-1]))
    # Each decode step is a round that proposed nothing and committed one token.
    steps = ((1, 0, 0),) * (len(generated) - 1)
    stop: StopReason = "eos" if generated[-1] in decode.eos else "max_new_tokens"
    return GenerationResult(sequences=decode.sequences(), metrics=decode.metrics(steps, stop, 0.0, 0))
