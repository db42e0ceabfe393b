"""Batched speculative decoding with a DSpark draft (method reference, section 6), and the plain baseline.

Every row of the batch runs the batch-1 algorithm on its own; only the forwards are shared. Each round:

1. the draft receives, per row, the target features of the context rows that row committed since its
   last call (a padded ``[b, R, L*H]`` with a count per row), appends them to its context-only cache
   at that row's own length and proposes up to ``block_size`` tokens ``d_k`` with their ``q_k``;
2. an optional :class:`ConfidenceSchedule` truncates each row's proposal to its own ``l``;
3. the target verifies ``[x_s, d_0 .. d_{l-1}]`` per row in one forward (rows padded to the longest
   ``l + 1``), each row at its own positions in a :class:`RaggedKVCache`;
4. each row accepts on its own (greedy: while ``d_i == argmax p_i``; sampling: rejection sampling
   with the residual ``norm(max(p - q, 0))`` and a bonus token from ``p_l``);
5. each row's target cache is cut back to its committed length, and its accepted rows' features
   become its next context rows. Rows that reach EOS or their budget leave the batch, so they stop
   costing target and draft compute, and waiting prompts (beyond ``max_batch_size``) join it:
   prefilled together in their own forward, their cache rows appended to the running ones.

A row never drafts past its ``max_new_tokens``; a row with one token of budget left verifies its
anchor alone. ``p`` and ``q`` both come from :func:`~dspark_core.modeling.sampling.filtered_probs`
in float32, which is what makes sampling lossless, row by row.

Per-row metrics: each row counts the forwards it took part in (``target_forwards == rounds + 1``),
and every forward's time is split evenly among the rows it served, so that
:func:`~dspark_core.decoding.metrics.combine_metrics` of a batch's results gives the batch's wall time.
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

__all__ = ["plain_generate_batch", "speculative_generate_batch"]


# -- checks shared with the batch-1 entry points ------------------------------------------------


def checked_prompts(prompts: Sequence[Tensor | Sequence[int]]) -> list[Tensor]:
    """Each prompt as a 1-D long tensor; a bad one raises ``ValueError`` naming its index."""
    if isinstance(prompts, Tensor):
        raise TypeError("prompts must be a sequence of prompts (a list of 1-D tensors or of token lists)")
    checked: list[Tensor] = []
    for index, prompt in enumerate(prompts):
        row = prompt if isinstance(prompt, Tensor) else torch.tensor(list(prompt), dtype=torch.long)
        if row.dim() == 2 and row.shape[0] == 1:
            row = row[0]
        if row.dim() != 1:
            raise ValueError(f"prompt {index} must be [P] (or [1, P]), got shape {tuple(row.shape)}")
        if row.shape[0] == 0:
            raise ValueError(f"prompt {index} is empty: give at least one token")
        if row.dtype.is_floating_point or row.dtype.is_complex or row.dtype == torch.bool:
            raise ValueError(f"prompt {index} must hold integer token ids, got dtype {row.dtype}")
        checked.append(row.long())
    if not checked:
        raise ValueError("prompts is empty: give at least one prompt")
    return checked


def check_budget_and_sampling(
    max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None
) -> None:
    check_sampling_options(temperature, top_k, top_p)
    if not is_int(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")


def eos_ids(eos_token_id: int | Sequence[int] | None, target: nn.Module) -> frozenset[int]:
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


def make_generator(
    seed: int | None, generator: torch.Generator | None, device: torch.device
) -> torch.Generator | None:
    if seed is not None and generator is not None:
        raise ValueError("pass either seed or generator, not both")
    if seed is None:
        return generator
    made = torch.Generator(device=device)
    made.manual_seed(seed)
    return made


def checked_proposal_options(
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


# -- the batch ------------------------------------------------------------------------------------


@dataclass
class _Row:
    """One prompt's decode: what it generated, its rounds and its share of the forwards."""

    index: int
    prompt: Tensor
    generated: list[int] = field(default_factory=list)
    records: list[RoundRecord] = field(default_factory=list)
    stop: StopReason | None = None
    target_s: float = 0.0
    draft_s: float = 0.0
    target_forwards: int = 0
    draft_forwards: int = 0

    @property
    def anchor_position(self) -> int:
        return int(self.prompt.shape[0]) + len(self.generated) - 1


@dataclass
class _Batch:
    """The rows still decoding, the target behind its ragged cache, sampling and stop rules."""

    waiting: list[_Row]
    max_rows: int
    runner: CachedTarget
    greedy: bool
    eos: frozenset[int]
    sampling: dict[str, Any]
    rng: torch.Generator | None
    max_new_tokens: int
    started: float
    rows: list[_Row] = field(default_factory=list)
    finished: list[_Row] = field(default_factory=list)

    def sample(self, logits: Tensor) -> list[int]:
        """One token per row from ``logits [n, V]``."""
        if self.greedy:
            return [int(t) for t in logits.argmax(dim=-1).tolist()]
        probs = filtered_probs(logits, **self.sampling)
        return [sample_token(probs[i], self.rng, False) for i in range(probs.shape[0])]

    def feed(self, tokens: Tensor) -> tuple[Tensor, Tensor | None]:
        logits, features = self.runner.feed(tokens)
        self._share(self.rows, self.runner.last_seconds)
        return logits, features

    @staticmethod
    def _share(rows: list[_Row], seconds: float) -> None:
        for row in rows:
            row.target_s += seconds / len(rows)
            row.target_forwards += 1

    def admit(self) -> tuple[Tensor | None, Tensor] | None:
        """Waiting prompts join while there is room (right-padded, prefilled in one forward), each
        sampling its first token. Returns their features ``[m, max P, L*H]`` and lengths, or
        ``None`` when nobody joined."""
        room = self.max_rows - len(self.rows)
        if room <= 0 or not self.waiting:
            return None
        joining, self.waiting = self.waiting[:room], self.waiting[room:]
        device = self.runner.device
        lengths = torch.tensor([row.prompt.shape[0] for row in joining], device=device)
        padded = torch.zeros(len(joining), int(lengths.max()), dtype=torch.long, device=device)
        for i, row in enumerate(joining):
            padded[i, : row.prompt.shape[0]] = row.prompt.to(device)
        logits, features = self.runner.join(padded, lengths)
        self._share(joining, self.runner.last_seconds)
        self.rows.extend(joining)
        for row, token in zip(joining, self.sample(logits), strict=True):
            row.generated.append(token)
            self.check_stop(row)
        return features, lengths

    def check_stop(self, row: _Row) -> None:
        if row.generated[-1] in self.eos:
            row.stop = "eos"
        elif len(row.generated) >= self.max_new_tokens:
            row.stop = "max_new_tokens"

    def drop_finished(self) -> Tensor | None:
        """Take finished rows out of the batch; returns the kept rows' indices (``None``: all kept)."""
        keep = [i for i, row in enumerate(self.rows) if row.stop is None]
        if len(keep) == len(self.rows):
            return None
        self.finished.extend(row for row in self.rows if row.stop is not None)
        self.rows = [self.rows[i] for i in keep]
        kept = torch.tensor(keep, dtype=torch.long, device=self.runner.device)
        self.runner.select(kept)
        return kept

    def results(self) -> list[GenerationResult]:
        synchronize(self.runner.device)
        wall = time.perf_counter() - self.started
        rows = sorted(self.finished, key=lambda row: row.index)
        busy = sum(row.target_s + row.draft_s for row in rows)
        results = []
        for row in rows:
            assert row.stop is not None
            share = (row.target_s + row.draft_s) / busy if busy > 0 else 1 / len(rows)
            rounds = [(len(r.committed), r.accepted, r.proposed) for r in row.records]
            if not row.records:  # plain decoding: every step a round that proposed nothing
                rounds = [(1, 0, 0)] * (len(row.generated) - 1)
            committed, accepted, proposed = (
                (tuple(column) for column in zip(*rounds, strict=True)) if rounds else ((), (), ())
            )
            metrics = SpeculativeMetrics(
                prompt_tokens=int(row.prompt.shape[0]),
                new_tokens=len(row.generated),
                committed_per_round=committed,
                accepted_per_round=accepted,
                proposed_per_round=proposed,
                draft_time_s=row.draft_s,
                target_time_s=row.target_s,
                total_time_s=wall * share,
                target_forwards=row.target_forwards,
                draft_forwards=row.draft_forwards,
                stop_reason=row.stop,
            )
            sequences = torch.cat([row.prompt, torch.tensor(row.generated, dtype=torch.long)]).unsqueeze(0)
            results.append(
                GenerationResult(
                    sequences=sequences.to(self.runner.device), metrics=metrics, rounds=tuple(row.records)
                )
            )
        return results


def _start(
    target: nn.Module,
    prompts: list[Tensor],
    *,
    max_batch_size: int | None,
    max_new_tokens: int,
    extra_positions: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    eos_token_id: int | Sequence[int] | None,
    seed: int | None,
    generator: torch.Generator | None,
    capture: LayerCapture | None,
    started: float,
) -> _Batch:
    if max_batch_size is not None and (not is_int(max_batch_size) or max_batch_size < 1):
        raise ValueError(f"max_batch_size must be a positive int or None, got {max_batch_size!r}")
    capacity = max(int(p.shape[0]) for p in prompts) + max_new_tokens + extra_positions
    runner = CachedTarget(target, capture, batch=0, capacity=capacity)
    return _Batch(
        waiting=[_Row(index=i, prompt=p) for i, p in enumerate(prompts)],
        max_rows=max_batch_size or len(prompts),
        runner=runner,
        greedy=temperature == 0,
        eos=eos_ids(eos_token_id, target),
        sampling={"temperature": temperature, "top_k": top_k, "top_p": top_p},
        rng=make_generator(seed, generator, runner.device),
        max_new_tokens=max_new_tokens,
        started=started,
    )


# -- the draft side -------------------------------------------------------------------------------


@dataclass
class _Proposal:
    """One row's proposal after the schedule's cut."""

    drafted: int
    tokens: Tensor
    probs: Tensor
    confidence: tuple[float, ...]
    context_rows: int
    draft_cache_length: int


@dataclass
class _Drafter:
    """The draft, its context cache (one length per row) and the context rows each row has not fed it."""

    draft: nn.Module
    schedule: ConfidenceSchedule
    pending: Tensor | None = None  # [n, R, L*H], row i's first pending_rows[i] rows count
    pending_rows: Tensor | None = None  # [n] long
    cache: Any = None

    def __post_init__(self) -> None:
        self.device = next(self.draft.parameters()).device
        self.cache = self.draft.new_cache()  # type: ignore[operator]

    def propose(self, batch: _Batch, slots: list[int]) -> list[_Proposal]:
        """Draft ``slots[i]`` tokens for each row (the draft is skipped when no row has room)."""
        target_device = batch.runner.device
        rows = batch.rows
        empty = torch.empty(0, dtype=torch.long, device=target_device)
        if max(slots) == 0:
            held = self.cache.row_lengths(len(rows), self.device).tolist()
            none = torch.empty(0, device=target_device)
            return [_Proposal(0, empty, none, (), 0, int(length)) for length in held]
        anchors = torch.tensor([row.generated[-1] for row in rows], device=self.device)
        assert self.pending is not None and self.pending_rows is not None
        consumed = [int(c) for c in self.pending_rows.tolist()]
        ragged = any(c != self.pending.shape[1] for c in consumed)
        synchronize(self.device)
        began = time.perf_counter()
        proposal = self.draft.propose(  # type: ignore[operator]
            anchors,
            self.pending.to(self.device),
            self.cache,
            num_slots=max(slots),
            generator=batch.rng,
            **batch.sampling,
            **({"context_rows": self.pending_rows.to(self.device)} if ragged else {}),
        )
        out = []
        for i, row in enumerate(rows):
            raw = None if proposal.confidence is None else proposal.confidence[i, : slots[i]]
            kept = min(slots[i], self.schedule.proposal_length(raw, slots[i])) if slots[i] else 0
            out.append(
                _Proposal(
                    drafted=slots[i],
                    tokens=proposal.tokens[i, :kept].to(target_device),
                    probs=proposal.probs[i, :kept].to(target_device),
                    confidence=() if raw is None else tuple(float(c) for c in raw.tolist()),
                    context_rows=consumed[i],
                    draft_cache_length=row.anchor_position,
                )
            )
        synchronize(self.device)
        share = (time.perf_counter() - began) / len(rows)
        for row, count in zip(rows, slots, strict=True):
            row.draft_s += share
            row.draft_forwards += 1 if count else 0
        anchor_positions = torch.tensor([row.anchor_position for row in rows], device=self.device)
        self.cache.settle_at(anchor_positions if len(rows) > 1 else int(anchor_positions[0]))
        self.pending = self.pending[:, :0]
        self.pending_rows = torch.zeros_like(self.pending_rows)
        return out

    def add_rows(self, features: Tensor, lengths: Tensor) -> None:
        """Rows join the batch: their prompts' features (row ``i``'s first ``lengths[i]``) are pending."""
        existing = 0 if self.pending_rows is None else int(self.pending_rows.shape[0])
        self.cache.add_rows(existing, int(lengths.shape[0]))
        if self.pending is None or self.pending_rows is None or existing == 0:
            self.pending, self.pending_rows = features, lengths.clone()
            return
        width = max(self.pending.shape[1], features.shape[1])
        merged = features.new_zeros(existing + features.shape[0], width, features.shape[2])
        merged[:existing, : self.pending.shape[1]] = self.pending
        merged[existing:, : features.shape[1]] = features
        self.pending = merged
        self.pending_rows = torch.cat([self.pending_rows, lengths.to(self.pending_rows.device)])

    def add_context(self, features: Tensor, rows: Tensor) -> None:
        """Append each row's first ``rows[i]`` feature rows to what it has not fed the draft yet."""
        assert self.pending is not None and self.pending_rows is not None
        if self.pending.shape[1] == 0:
            self.pending, self.pending_rows = features[:, : int(rows.max())], rows.clone()
            return
        total = self.pending_rows + rows
        merged = features.new_zeros(features.shape[0], int(total.max()), features.shape[2])
        for i, (old, new) in enumerate(zip(self.pending_rows.tolist(), rows.tolist(), strict=True)):
            merged[i, :old] = self.pending[i, :old]
            merged[i, old : old + new] = features[i, :new]
        self.pending, self.pending_rows = merged, total

    def select(self, rows: Tensor) -> None:
        assert self.pending is not None and self.pending_rows is not None
        self.cache.select(rows.to(self.device))
        self.pending = self.pending.index_select(0, rows.to(self.pending.device))
        self.pending_rows = self.pending_rows.index_select(0, rows.to(self.pending_rows.device))


def _round(batch: _Batch, drafter: _Drafter, proposal_length: int) -> list[tuple[_Row, RoundRecord]]:
    """Every row drafts after its last token, the target verifies all rows in one forward, each row
    commits what it accepts. Returns each row's record."""
    rows = batch.rows
    runner = batch.runner
    # A round commits at most l + 1 tokens, so no row drafts past its budget.
    slots = [min(proposal_length, batch.max_new_tokens - len(row.generated) - 1) for row in rows]
    proposals = drafter.propose(batch, slots)
    width = 1 + max(int(p.tokens.shape[0]) for p in proposals)
    verify_input = torch.zeros(len(rows), width, dtype=torch.long, device=runner.device)
    for i, (row, proposal) in enumerate(zip(rows, proposals, strict=True)):
        verify_input[i, 0] = row.generated[-1]
        verify_input[i, 1 : 1 + proposal.tokens.shape[0]] = proposal.tokens
        # Padding repeats the anchor: any valid id; its positions are never committed or seen.
        verify_input[i, 1 + proposal.tokens.shape[0] :] = row.generated[-1]
    logits, features = batch.feed(verify_input)
    assert features is not None
    probs = filtered_probs(logits, **batch.sampling)
    accepted_counts: list[int] = []
    out: list[tuple[_Row, RoundRecord]] = []
    for i, (row, proposal) in enumerate(zip(rows, proposals, strict=True)):
        proposed = int(proposal.tokens.shape[0])
        accepted, next_token = verify_proposal(
            probs[i, : proposed + 1], proposal.tokens, proposal.probs, batch.rng, batch.greedy
        )
        accepted_counts.append(accepted)
        anchor_position = row.anchor_position
        committed = [int(t) for t in proposal.tokens[:accepted].tolist()] + [next_token]
        stop = next((k for k, token in enumerate(committed) if token in batch.eos), None)
        if stop is not None:
            committed = committed[: stop + 1]
        row.generated.extend(committed)
        record = RoundRecord(
            index=len(row.records),
            anchor_position=anchor_position,
            drafted=proposal.drafted,
            proposed=proposed,
            accepted=accepted,
            committed=tuple(committed),
            target_tokens_fed=proposed + 1,
            target_cache_length=anchor_position + accepted + 1,
            draft_cache_length=proposal.draft_cache_length,
            draft_context_rows=proposal.context_rows,
            confidence_logits=proposal.confidence,
        )
        row.records.append(record)
        batch.check_stop(row)
        out.append((row, record))
    kept = torch.tensor(accepted_counts, dtype=torch.long, device=runner.device) + 1
    runner.commit(runner.lengths + kept)
    drafter.add_context(features, kept.to(features.device))
    return out


# -- entry points ---------------------------------------------------------------------------------


def speculative_generate_batch(
    target: nn.Module,
    draft: nn.Module,
    prompts: Sequence[Tensor | Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    seed: int | None = None,
    schedule: ConfidenceSchedule | None = None,
    proposal_length: int | None = None,
    on_round: Callable[[int, RoundRecord], None] | None = None,
    check_fit: bool = True,
    generator: torch.Generator | None = None,
    max_batch_size: int | None = None,
) -> list[GenerationResult]:
    """Generate up to ``max_new_tokens`` tokens for each prompt with ``target``, drafted by ``draft``,
    the prompts decoded together in one batch (at most ``max_batch_size`` at a time).

    Each row's output distribution is exactly the target's (greedy: the tokens of that row's plain
    greedy decoding, up to floating-point ties between batched, chunked and token-by-token forwards).

    Args:
        target: an HF causal LM with full and/or sliding-window attention layers (``sdpa`` or
            ``eager`` attention).
        draft: a :class:`~dspark_core.modeling.draft.DSparkDraftModel` built for ``target``.
        prompts: the prompts, each ``[P]`` (or ``[1, P]``) or a list of token ids; lengths may differ.
        max_new_tokens: at least 1, per row.
        temperature, top_k, top_p: as for :func:`~dspark_core.decoding.speculative_generate`.
        eos_token_id: stop a row after any of these; ``None`` uses the target's generation config
            and ``[]`` never stops early.
        seed, generator: the sampling RNG (one of them), shared by the rows.
        schedule: confidence-based truncation of each row's proposal; ``None`` is off.
        proposal_length: slots to draft per round, ``1 .. block_size`` (default ``block_size``).
        on_round: called with ``(row index, RoundRecord)`` after each round, for every row in it.
        check_fit: run :func:`check_draft_fits_target` first.
        generator: a ``torch.Generator`` instead of ``seed``.
        max_batch_size: at most this many rows decode at once (``None``: all prompts); whenever
            rows finish, the next waiting prompts join the running batch (continuous batching), so
            a long row does not leave the batch half empty.

    Returns:
        One :class:`GenerationResult` per prompt, in input order (``sequences`` is that row's
        ``[1, P + new]``, no padding).
    """
    started = time.perf_counter()
    rows = checked_prompts(prompts)
    check_budget_and_sampling(max_new_tokens, temperature, top_k, top_p)
    if check_fit:
        check_draft_fits_target(draft, target)
    proposal_length, schedule = checked_proposal_options(draft, proposal_length, schedule)
    layer_ids = list(draft.config.target_layer_ids)  # type: ignore[union-attr,arg-type]
    with capture_layer_outputs(target, layer_ids) as capture:
        batch = _start(
            target,
            rows,
            max_batch_size=max_batch_size,
            max_new_tokens=max_new_tokens,
            extra_positions=proposal_length + 1,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            eos_token_id=eos_token_id,
            seed=seed,
            generator=generator,
            capture=capture,
            started=started,
        )
        drafter = _Drafter(draft, schedule)
        while True:
            kept = batch.drop_finished()
            if kept is not None:
                drafter.select(kept)
            joined = batch.admit()
            if joined is not None:
                features, lengths = joined
                assert features is not None
                drafter.add_rows(features, lengths.to(features.device))
                continue  # a row that joined may already be done (EOS first, or a budget of 1)
            if not batch.rows:
                break
            for row, record in _round(batch, drafter, proposal_length):
                if on_round is not None:
                    on_round(row.index, record)
    return batch.results()


def plain_generate_batch(
    target: nn.Module,
    prompts: Sequence[Tensor | Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    max_batch_size: int | None = None,
) -> list[GenerationResult]:
    """Token-by-token decoding of a batch with the same target, cache and sampling code: the baseline
    of :func:`speculative_generate_batch` (arguments as there). Finished rows leave the batch and
    waiting prompts join it. Each decode step is reported as a round that proposed nothing (so
    ``tau == 1``)."""
    started = time.perf_counter()
    rows = checked_prompts(prompts)
    check_budget_and_sampling(max_new_tokens, temperature, top_k, top_p)
    batch = _start(
        target,
        rows,
        max_batch_size=max_batch_size,
        max_new_tokens=max_new_tokens,
        extra_positions=1,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        eos_token_id=eos_token_id,
        seed=seed,
        generator=generator,
        capture=None,
        started=started,
    )
    runner = batch.runner
    while True:
        batch.drop_finished()
        if batch.admit() is not None:
            continue
        if not batch.rows:
            break
        last = torch.tensor([[row.generated[-1]] for row in batch.rows], device=runner.device)
        logits, _ = batch.feed(last)
        runner.commit(runner.lengths + 1)
        for row, token in zip(batch.rows, batch.sample(logits[:, -1]), strict=True):
            row.generated.append(token)
            batch.check_stop(row)
    return batch.results()
