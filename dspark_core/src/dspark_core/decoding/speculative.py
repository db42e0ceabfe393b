"""Speculative generation of one prompt with a DSpark draft (method reference, section 6), and the
plain baseline: a batch of one of :mod:`dspark_core.decoding.batched`, whose loop this is. Each round:

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

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from dspark_core.decoding.batched import (
    check_budget_and_sampling,
    plain_generate_batch,
    speculative_generate_batch,
)
from dspark_core.decoding.metrics import GenerationResult, RoundRecord
from dspark_core.decoding.schedule import ConfidenceSchedule

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
    prompt = _prompt_row(input_ids)
    check_budget_and_sampling(max_new_tokens, temperature, top_k, top_p)
    report = None if on_round is None else (lambda _row, record: on_round(record))
    (result,) = speculative_generate_batch(
        target,
        draft,
        [prompt[0]],
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        eos_token_id=eos_token_id,
        seed=seed,
        generator=generator,
        schedule=schedule,
        proposal_length=proposal_length,
        on_round=report,
        check_fit=check_fit,
    )
    return result


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
    prompt = _prompt_row(input_ids)
    check_budget_and_sampling(max_new_tokens, temperature, top_k, top_p)
    (result,) = plain_generate_batch(
        target,
        [prompt[0]],
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        eos_token_id=eos_token_id,
        seed=seed,
        generator=generator,
    )
    return result
