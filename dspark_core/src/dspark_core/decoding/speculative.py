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

import functools
import inspect
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from dspark_core.errors import DraftConfigError
from dspark_core.modeling.features import LayerCapture, capture_layer_outputs, find_target_decoder
from dspark_core.modeling.sampling import check_sampling_options, filtered_probs

__all__ = [
    "ConfidenceSchedule",
    "GenerationResult",
    "RoundRecord",
    "SpeculativeMetrics",
    "check_draft_fits_target",
    "combine_metrics",
    "plain_generate",
    "speculative_generate",
]

ScheduleMode = Literal["off", "position", "product"]
StopReason = Literal["eos", "max_new_tokens"]


# -- confidence schedule ----------------------------------------------------------------------


@dataclass(frozen=True)
class ConfidenceSchedule:
    """How many of a proposal's tokens to verify, from the draft's confidence logits.

    - ``off``: verify every proposed token.
    - ``position``: stop at the first slot k with ``sigmoid(conf_k) < threshold``.
    - ``product``: stop at the first slot k where the running product
      ``prod_{j <= k} sigmoid(conf_j)`` falls under ``threshold``.

    A length of 0 verifies the anchor alone, so a threshold of 1.0 degenerates to plain decoding
    (with the draft's cost). Comparisons are done in log space in float64, so that
    ``sigmoid(conf) == 1.0`` after float32 rounding does not count as reaching a threshold of 1.
    """

    mode: ScheduleMode = "off"
    threshold: float = 0.0

    def __post_init__(self) -> None:
        if self.mode not in ("off", "position", "product"):
            raise ValueError(f"schedule mode must be 'off', 'position' or 'product', got {self.mode!r}")
        if not 0.0 <= self.threshold <= 1.0 or math.isnan(self.threshold):
            raise ValueError(f"schedule threshold must lie in [0, 1], got {self.threshold}")

    @classmethod
    def parse(cls, text: str) -> ConfidenceSchedule:
        """Parse ``off``, ``position:T`` or ``product:T`` (the CLI's ``--schedule``)."""
        mode, _, value = text.strip().partition(":")
        mode = mode.strip().lower()
        if mode == "off" and not value:
            return cls()
        if mode in ("position", "product") and value:
            try:
                threshold = float(value)
            except ValueError:
                raise ValueError(f"schedule {text!r}: {value!r} is not a number") from None
            return cls(mode, threshold)  # type: ignore[arg-type]
        raise ValueError(f"schedule {text!r} is not one of 'off', 'position:T' or 'product:T' (T in [0, 1])")

    @property
    def enabled(self) -> bool:
        """Whether the schedule reads the confidences at all."""
        return self.mode != "off"

    def proposal_length(self, confidence: Tensor | None, num_slots: int) -> int:
        """How many of ``num_slots`` proposed tokens to verify, given ``[num_slots]`` confidence logits."""
        if not self.enabled:
            return num_slots
        if confidence is None:
            raise DraftConfigError(
                f"schedule {self.describe()!r} needs the draft's confidence head, but the draft has none "
                "(enable_confidence_head=False); use schedule 'off'"
            )
        log_conf = torch.nn.functional.logsigmoid(confidence[:num_slots].double())
        if self.mode == "product":
            log_conf = log_conf.cumsum(0)
        log_threshold = math.log(self.threshold) if self.threshold > 0 else -math.inf
        below = (log_conf < log_threshold).tolist()
        if self.threshold >= 1.0:
            # log sigmoid(c) is < 0 for every finite c, but may round to 0 in float64 for huge c.
            below = [True] * len(below)
        return next((k for k, is_below in enumerate(below) if is_below), num_slots)

    def describe(self) -> str:
        """The ``--schedule`` spelling of this schedule."""
        return "off" if self.mode == "off" else f"{self.mode}:{self.threshold:g}"


# -- results ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RoundRecord:
    """What one verify round did; passed to ``on_round`` right after the round is committed.

    Attributes:
        index: 0-based round number.
        anchor_position: ``s``, the position of the anchor ``x_s`` fed first to the target.
        drafted: slots the draft produced (0 when the budget left no room and the draft was not called).
        proposed: ``l``, the tokens sent to verification after the schedule.
        accepted: ``a``, the leading proposed tokens the target accepted.
        committed: the tokens appended to the output this round (``a + 1``, fewer when EOS stopped it).
        target_tokens_fed: tokens fed to the target's verify forward (``l + 1``).
        target_cache_length: the target cache's length after the crop (``s + a + 1``).
        draft_cache_length: the draft cache's length after the proposal (``s`` when it drafted).
        draft_context_rows: context rows fed to the draft this round.
    """

    index: int
    anchor_position: int
    drafted: int
    proposed: int
    accepted: int
    committed: tuple[int, ...]
    target_tokens_fed: int
    target_cache_length: int
    draft_cache_length: int
    draft_context_rows: int


@dataclass(frozen=True)
class SpeculativeMetrics:
    """Counts and timings of one generation (or, through :func:`combine_metrics`, of several).

    Plain decoding reports through the same type: each decode step is a round that proposed nothing.
    """

    prompt_tokens: int
    new_tokens: int
    committed_per_round: tuple[int, ...]
    accepted_per_round: tuple[int, ...]
    proposed_per_round: tuple[int, ...]
    draft_time_s: float
    target_time_s: float
    total_time_s: float
    target_forwards: int
    draft_forwards: int
    stop_reason: StopReason
    generations: int = 1

    @property
    def rounds(self) -> int:
        """Verify rounds (target forwards after the prefill)."""
        return len(self.committed_per_round)

    @property
    def tau(self) -> float:
        """Mean tokens committed per verify round, the bonus (or corrected) token included."""
        return sum(self.committed_per_round) / self.rounds if self.rounds else float("nan")

    @property
    def mean_proposal_length(self) -> float:
        """Mean ``l`` over rounds: the tokens sent to verification after the schedule."""
        return sum(self.proposed_per_round) / self.rounds if self.rounds else float("nan")

    @property
    def mean_accepted(self) -> float:
        """Mean ``a`` over rounds."""
        return sum(self.accepted_per_round) / self.rounds if self.rounds else float("nan")

    def accept_rates(self) -> list[float | None]:
        """``accept_rate@i`` for ``i = 0 .. max l - 1``: rounds with more than ``i`` accepted over rounds
        that proposed more than ``i`` (``None`` when no round proposed more than ``i``)."""
        longest = max(self.proposed_per_round, default=0)
        rates: list[float | None] = []
        for i in range(longest):
            eligible = sum(1 for p in self.proposed_per_round if p > i)
            passed = sum(1 for a in self.accepted_per_round if a > i)
            rates.append(passed / eligible if eligible else None)
        return rates

    @property
    def tokens_per_s(self) -> float:
        """New tokens over the whole wall time (prefill included)."""
        return self.new_tokens / self.total_time_s if self.total_time_s > 0 else float("nan")

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (derived figures included, per-round lists left out)."""
        return {
            "generations": self.generations,
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": self.new_tokens,
            "rounds": self.rounds,
            "tau": _finite_or_none(self.tau),
            "accept_rate": self.accept_rates(),
            "mean_proposal_length": _finite_or_none(self.mean_proposal_length),
            "mean_accepted": _finite_or_none(self.mean_accepted),
            "draft_time_s": self.draft_time_s,
            "target_time_s": self.target_time_s,
            "total_time_s": self.total_time_s,
            "tokens_per_s": _finite_or_none(self.tokens_per_s),
            "target_forwards": self.target_forwards,
            "draft_forwards": self.draft_forwards,
            "stop_reason": self.stop_reason,
        }


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def combine_metrics(metrics: Sequence[SpeculativeMetrics]) -> SpeculativeMetrics:
    """Pool several generations' metrics: rounds are concatenated, counts and times summed.

    ``stop_reason`` is ``eos`` only if every generation stopped at EOS.
    """
    if not metrics:
        raise ValueError("combine_metrics needs at least one SpeculativeMetrics")
    return SpeculativeMetrics(
        prompt_tokens=sum(m.prompt_tokens for m in metrics),
        new_tokens=sum(m.new_tokens for m in metrics),
        committed_per_round=tuple(c for m in metrics for c in m.committed_per_round),
        accepted_per_round=tuple(a for m in metrics for a in m.accepted_per_round),
        proposed_per_round=tuple(p for m in metrics for p in m.proposed_per_round),
        draft_time_s=sum(m.draft_time_s for m in metrics),
        target_time_s=sum(m.target_time_s for m in metrics),
        total_time_s=sum(m.total_time_s for m in metrics),
        target_forwards=sum(m.target_forwards for m in metrics),
        draft_forwards=sum(m.draft_forwards for m in metrics),
        stop_reason="eos" if all(m.stop_reason == "eos" for m in metrics) else "max_new_tokens",
        generations=sum(m.generations for m in metrics),
    )


@dataclass(frozen=True)
class GenerationResult:
    """``sequences`` is ``[1, P + new]``: the prompt followed by the generated tokens."""

    sequences: Tensor
    metrics: SpeculativeMetrics
    rounds: tuple[RoundRecord, ...] = field(default=(), repr=False)

    @property
    def new_tokens(self) -> list[int]:
        """The generated token ids."""
        return [int(t) for t in self.sequences[0, self.metrics.prompt_tokens :].tolist()]


# -- validation -------------------------------------------------------------------------------


def _text_config(target: nn.Module) -> Any:
    config = getattr(target, "config", None)
    if config is None:
        raise TypeError(
            f"the target must be an HF PreTrainedModel with a config, got {type(target).__name__}"
        )
    get_text_config = getattr(config, "get_text_config", None)
    return get_text_config() if callable(get_text_config) else config


def _weight_of(model: nn.Module, attribute: str, getter: str) -> Tensor | None:
    module = getattr(model, attribute, None)
    if not isinstance(module, nn.Module):
        get = getattr(model, getter, None)
        module = get() if callable(get) else None
    weight = getattr(module, "weight", None)
    return weight if isinstance(weight, Tensor) else None


def _same_weights(a: Tensor, b: Tensor) -> bool:
    # Compare in the coarser of the two dtypes: a bf16 draft holds exact bf16 roundings of fp32 weights.
    coarse = a.dtype if torch.finfo(a.dtype).eps >= torch.finfo(b.dtype).eps else b.dtype
    rows = a.shape[0]
    step = max(1, (1 << 24) // max(1, a.shape[-1]))  # bounded memory for 150k-row vocabularies
    for start in range(0, rows, step):
        left = a[start : start + step].to(dtype=coarse)
        right = b[start : start + step].to(device=left.device, dtype=coarse)
        if not torch.equal(left, right):
            return False
    return True


def check_draft_fits_target(draft: nn.Module, target: nn.Module) -> None:
    """Raise :class:`~dspark_core.errors.DraftConfigError` if ``draft`` cannot draft for ``target``.

    Checks the draft's ``block_size``, ``mask_token_id``, ``target_layer_ids`` and ``num_target_layers``
    against the target's depth, the vocabulary and hidden sizes, and that the draft's ``embed_tokens``
    and ``lm_head`` are the target's (a draft loaded without them has zeros or fresh random values).
    """
    for method in ("propose", "new_cache"):
        if not callable(getattr(draft, method, None)):
            raise TypeError(
                f"{type(draft).__name__} has no {method}(): the draft must be a DSparkDraftModel "
                "(e.g. dspark_qwen3.Qwen3DSparkModel)"
            )
    draft_config = getattr(draft, "config", None)
    if draft_config is None:
        raise TypeError(f"the draft {type(draft).__name__} has no config")
    target_config = _text_config(target)
    _, layers = find_target_decoder(target)
    num_layers = len(layers)
    target_name = type(target).__name__

    block_size = getattr(draft_config, "block_size", None)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise DraftConfigError(f"draft config block_size must be a positive int, got {block_size!r}")
    max_positions = getattr(target_config, "max_position_embeddings", None)
    if isinstance(max_positions, int) and block_size >= max_positions:
        raise DraftConfigError(
            f"draft block_size={block_size} does not fit the target's max_position_embeddings={max_positions}"
        )

    ids = list(getattr(draft_config, "target_layer_ids", None) or [])
    if not ids or any(isinstance(i, bool) or not isinstance(i, int) for i in ids):
        raise DraftConfigError(f"draft config target_layer_ids must be a non-empty list of ints, got {ids!r}")
    if min(ids) < -1 or max(ids) > num_layers - 1:
        raise DraftConfigError(
            f"draft target_layer_ids={ids} do not fit {target_name}, which has {num_layers} decoder layers: "
            f"each id must be -1 (the embeddings) or in [0, {num_layers - 1}]. The draft was built for a "
            "different target."
        )
    declared_layers = getattr(draft_config, "num_target_layers", None)
    if declared_layers is not None and int(declared_layers) != num_layers:
        raise DraftConfigError(
            f"the draft was built for a {declared_layers}-layer target (num_target_layers), but "
            f"{target_name} has {num_layers} decoder layers"
        )

    target_vocab = int(target_config.vocab_size)
    draft_vocab = int(getattr(draft_config, "vocab_size", -1))
    if draft_vocab != target_vocab:
        raise DraftConfigError(
            f"draft vocab_size={draft_vocab} does not match the target's vocab_size={target_vocab}: "
            "the draft was built for a different tokenizer"
        )
    mask_token_id = getattr(draft_config, "mask_token_id", None)
    if (
        isinstance(mask_token_id, bool)
        or not isinstance(mask_token_id, int)
        or not 0 <= mask_token_id < draft_vocab
    ):
        raise DraftConfigError(
            f"draft mask_token_id={mask_token_id!r} is not a token id in [0, vocab_size={draft_vocab})"
        )
    draft_hidden = getattr(draft_config, "hidden_size", None)
    if draft_hidden != target_config.hidden_size:
        raise DraftConfigError(
            f"draft hidden_size={draft_hidden} does not match the target's hidden_size="
            f"{target_config.hidden_size}: its context projection expects another target's features"
        )

    for attribute, getter, what in (
        ("embed_tokens", "get_input_embeddings", "input embeddings"),
        ("lm_head", "get_output_embeddings", "lm_head"),
    ):
        mine = _weight_of(draft, attribute, getter)
        theirs = _weight_of(target, "", getter)
        if mine is None or theirs is None:
            raise DraftConfigError(
                f"cannot compare the draft's {attribute} with the target's {what}: one is missing"
            )
        if tuple(mine.shape) != tuple(theirs.shape):
            raise DraftConfigError(
                f"the draft's {attribute} has shape {tuple(mine.shape)} but the target's {what} has "
                f"{tuple(theirs.shape)}: the draft was built for a different target"
            )
        if not bool(mine.detach().any()):
            raise DraftConfigError(
                f"the draft's {attribute} is all zeros: it was loaded without its target's weights. Load it "
                "with `from_pretrained(path, target=target)` or call `draft.attach_target_weights(target)`."
            )
        if not _same_weights(mine.detach(), theirs.detach()):
            raise DraftConfigError(
                f"the draft's {attribute} differs from the target's {what}: the draft was loaded without "
                "its target's weights or was built for another target. Load it with "
                "`from_pretrained(path, target=target)` or call `draft.attach_target_weights(target)`."
            )


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
            eos_token_id = getattr(_text_config(target), "eos_token_id", None)
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


# -- the target and its cache -----------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _forward_kwargs(forward: Callable[..., Any]) -> tuple[str, bool]:
    """The name of the cache kwarg (``cache`` from transformers 5.24, ``past_key_values`` before) and
    whether ``logits_to_keep`` is accepted, read once per forward function."""
    parameters = inspect.signature(forward).parameters
    if "cache" in parameters:
        name = "cache"
    elif "past_key_values" in parameters:
        name = "past_key_values"
    else:
        raise TypeError(
            f"{getattr(forward, '__qualname__', forward)} takes neither `cache` nor `past_key_values`: "
            "speculative decoding needs an HF causal LM with a KV cache"
        )
    return name, "logits_to_keep" in parameters


def _synchronize(device: torch.device) -> None:
    # Wall times are only meaningful once queued kernels have finished.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _CachedTarget:
    """The target with an HF ``DynamicCache``: feeds token chunks at the cache's end and crops it."""

    def __init__(self, target: nn.Module, capture: LayerCapture | None) -> None:
        from transformers import DynamicCache

        self.target = target
        self.capture = capture
        self.device = next(target.parameters()).device
        self.cache = DynamicCache(config=getattr(target, "config", None))
        self.cache_kwarg, self.has_logits_to_keep = _forward_kwargs(type(target).forward)
        self.forwards = 0
        self.seconds = 0.0

    @property
    def length(self) -> int:
        return int(self.cache.get_seq_length())

    def feed(self, tokens: Tensor, *, last_logits_only: bool = False) -> tuple[Tensor, Tensor | None]:
        """Run ``tokens`` ``[1, T]`` at positions ``length .. length + T - 1``.

        Returns float logits ``[T, V]`` (``[1, V]`` with ``last_logits_only``) and, with a capture,
        the features ``[1, T, L*H]``.
        """
        start = self.length
        positions = torch.arange(start, start + tokens.shape[1], device=self.device).unsqueeze(0)
        kwargs: dict[str, Any] = {self.cache_kwarg: self.cache, "use_cache": True, "position_ids": positions}
        if last_logits_only and self.has_logits_to_keep:
            kwargs["logits_to_keep"] = 1
        if self.capture is not None:
            self.capture.clear()
        _synchronize(self.device)
        began = time.perf_counter()
        with torch.no_grad():
            outputs = self.target(input_ids=tokens.to(self.device), **kwargs)
        logits: Tensor = outputs.logits[0]
        if last_logits_only:
            logits = logits[-1:]
        features = self.capture.features() if self.capture is not None else None
        _synchronize(self.device)
        self.seconds += time.perf_counter() - began
        self.forwards += 1
        return logits, features

    def crop(self, length: int) -> None:
        """Keep the first ``length`` positions."""
        excess = self.length - length
        if excess < 0:
            raise RuntimeError(f"cannot crop a target cache of length {self.length} to {length}")
        if excess:
            # A negative argument removes that many tokens on every supported transformers version.
            self.cache.crop(-excess)


def _sample(probs: Tensor, generator: torch.Generator | None, greedy: bool) -> int:
    if greedy:
        return int(probs.argmax())
    return int(torch.multinomial(probs, 1, generator=generator))


def _verify(
    target_probs: Tensor,
    draft_tokens: Tensor,
    draft_probs: Tensor,
    generator: torch.Generator | None,
    greedy: bool,
) -> tuple[int, int]:
    """Speculative verification of ``l`` proposals against ``l + 1`` target distributions.

    Returns ``(accepted, next_token)``: the number of leading accepted proposals, and the corrected
    token (at the first rejection) or the bonus token (when all were accepted).
    """
    proposed = draft_tokens.shape[0]
    if proposed == 0:
        return 0, _sample(target_probs[0], generator, greedy)
    if greedy:
        # filtered_probs at temperature 0 is a one-hot at the (first) argmax.
        choices = target_probs.argmax(dim=-1)
        matches = draft_tokens == choices[:proposed]
        accepted = int(matches.int().cumprod(0).sum())
        return accepted, int(choices[accepted])
    rows = torch.arange(proposed, device=target_probs.device)
    p_of_d = target_probs[rows, draft_tokens]
    q_of_d = draft_probs[rows, draft_tokens]
    uniform = torch.rand(proposed, generator=generator, device=target_probs.device)
    # u < p/q without dividing; q > 0 since d was drawn from q.
    keep = uniform * q_of_d < p_of_d
    accepted = int(keep.int().cumprod(0).sum())
    if accepted == proposed:
        return accepted, _sample(target_probs[proposed], generator, greedy)
    residual = (target_probs[accepted] - draft_probs[accepted]).clamp_min(0.0)
    if not bool(residual.sum() > 0):
        # Only reachable through rounding (a rejection implies p != q); p itself is then exact.
        residual = target_probs[accepted]
    return accepted, _sample(residual / residual.sum(), generator, greedy)


# -- generation -------------------------------------------------------------------------------


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
    prompt = _prompt_row(input_ids)
    check_sampling_options(temperature, top_k, top_p)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if check_fit:
        check_draft_fits_target(draft, target)
    draft_config: Any = draft.config
    block_size = int(draft_config.block_size)
    if proposal_length is None:
        proposal_length = block_size
    if (
        isinstance(proposal_length, bool)
        or not isinstance(proposal_length, int)
        or not 1 <= proposal_length <= block_size
    ):
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

    greedy = temperature == 0
    eos = _eos_ids(eos_token_id, target)
    draft_device = next(draft.parameters()).device
    propose: Callable[..., Any] = draft.propose  # type: ignore[assignment]
    new_cache: Callable[[], Any] = draft.new_cache  # type: ignore[assignment]
    sample_kwargs: dict[str, Any] = {"temperature": temperature, "top_k": top_k, "top_p": top_p}

    with capture_layer_outputs(target, list(draft_config.target_layer_ids)) as capture:
        runner = _CachedTarget(target, capture)
        rng = _make_generator(seed, generator, runner.device)
        draft_cache = new_cache()
        draft_seconds = 0.0
        draft_forwards = 0

        logits, features = runner.feed(prompt.to(runner.device), last_logits_only=True)
        first = _sample(filtered_probs(logits[-1], **sample_kwargs), rng, greedy)
        generated = [first]
        assert features is not None
        pending: Tensor = features  # context rows the draft has not seen yet
        stop_reason: StopReason = "eos" if first in eos else "max_new_tokens"
        records: list[RoundRecord] = []

        while stop_reason != "eos" and len(generated) < max_new_tokens:
            remaining = max_new_tokens - len(generated)
            anchor = generated[-1]
            anchor_position = prompt.shape[1] + len(generated) - 1
            # A round commits at most l + 1 tokens, so never draft past the budget.
            slots = min(proposal_length, remaining - 1)
            context_rows = 0
            draft_tokens = torch.empty(0, dtype=torch.long, device=runner.device)
            draft_probs = torch.empty(0, device=runner.device)
            if slots > 0:
                _synchronize(draft_device)
                began = time.perf_counter()
                proposal = propose(
                    torch.tensor([anchor], device=draft_device),
                    pending.to(draft_device),
                    draft_cache,
                    num_slots=slots,
                    generator=rng,
                    **sample_kwargs,
                )
                confidence = None if proposal.confidence is None else proposal.confidence[0]
                proposed = min(slots, schedule.proposal_length(confidence, slots))
                draft_tokens = proposal.tokens[0, :proposed].to(runner.device)
                draft_probs = proposal.probs[0, :proposed].to(runner.device)
                _synchronize(draft_device)
                draft_seconds += time.perf_counter() - began
                draft_forwards += 1
                # The block's own K/V must not stay; a draft that kept them is cut back to the context.
                if draft_cache.length > anchor_position:
                    draft_cache.crop(anchor_position)
                elif draft_cache.length < anchor_position:
                    raise RuntimeError(
                        f"the draft cache holds {draft_cache.length} context rows after a proposal at "
                        f"anchor position {anchor_position}; propose() must append every new context row"
                    )
                context_rows = pending.shape[1]
                pending = pending[:, :0]
            else:
                proposed = 0
            draft_cache_length = int(draft_cache.length)

            verify_input = torch.cat([torch.tensor([anchor], device=runner.device), draft_tokens]).unsqueeze(
                0
            )
            logits, features = runner.feed(verify_input)
            assert features is not None
            accepted, next_token = _verify(
                filtered_probs(logits, **sample_kwargs), draft_tokens, draft_probs, rng, greedy
            )
            runner.crop(anchor_position + accepted + 1)
            pending = torch.cat([pending, features[:, : accepted + 1]], dim=1)

            committed = [int(t) for t in draft_tokens[:accepted].tolist()] + [next_token]
            for index, token in enumerate(committed):
                if token in eos:
                    committed = committed[: index + 1]
                    stop_reason = "eos"
                    break
            generated.extend(committed)
            record = RoundRecord(
                index=len(records),
                anchor_position=anchor_position,
                drafted=slots,
                proposed=proposed,
                accepted=accepted,
                committed=tuple(committed),
                target_tokens_fed=int(verify_input.shape[1]),
                target_cache_length=runner.length,
                draft_cache_length=draft_cache_length,
                draft_context_rows=context_rows,
            )
            records.append(record)
            if on_round is not None:
                on_round(record)

    sequences = torch.cat([prompt.to(runner.device), torch.tensor([generated], device=runner.device)], dim=1)
    _synchronize(runner.device)
    metrics = SpeculativeMetrics(
        prompt_tokens=int(prompt.shape[1]),
        new_tokens=len(generated),
        committed_per_round=tuple(len(r.committed) for r in records),
        accepted_per_round=tuple(r.accepted for r in records),
        proposed_per_round=tuple(r.proposed for r in records),
        draft_time_s=draft_seconds,
        target_time_s=runner.seconds,
        total_time_s=time.perf_counter() - started,
        target_forwards=runner.forwards,
        draft_forwards=draft_forwards,
        stop_reason=stop_reason,
    )
    return GenerationResult(sequences=sequences, metrics=metrics, rounds=tuple(records))


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
    prompt = _prompt_row(input_ids)
    check_sampling_options(temperature, top_k, top_p)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    greedy = temperature == 0
    eos = _eos_ids(eos_token_id, target)
    runner = _CachedTarget(target, capture=None)
    rng = _make_generator(seed, generator, runner.device)
    sample_kwargs: dict[str, Any] = {"temperature": temperature, "top_k": top_k, "top_p": top_p}

    logits, _ = runner.feed(prompt.to(runner.device), last_logits_only=True)
    generated = [_sample(filtered_probs(logits[-1], **sample_kwargs), rng, greedy)]
    while generated[-1] not in eos and len(generated) < max_new_tokens:
        logits, _ = runner.feed(torch.tensor([[generated[-1]]], device=runner.device))
        generated.append(_sample(filtered_probs(logits[-1], **sample_kwargs), rng, greedy))

    sequences = torch.cat([prompt.to(runner.device), torch.tensor([generated], device=runner.device)], dim=1)
    steps = len(generated) - 1
    metrics = SpeculativeMetrics(
        prompt_tokens=int(prompt.shape[1]),
        new_tokens=len(generated),
        committed_per_round=(1,) * steps,
        accepted_per_round=(0,) * steps,
        proposed_per_round=(0,) * steps,
        draft_time_s=0.0,
        target_time_s=runner.seconds,
        total_time_s=time.perf_counter() - started,
        target_forwards=runner.forwards,
        draft_forwards=0,
        stop_reason="eos" if generated[-1] in eos else "max_new_tokens",
    )
    return GenerationResult(sequences=sequences, metrics=metrics)
