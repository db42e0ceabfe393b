"""Verification of a proposal against the target's distributions: greedy and rejection sampling."""

from __future__ import annotations

import torch
from torch import Tensor


def sample_token(probs: Tensor, generator: torch.Generator | None, greedy: bool) -> int:
    if greedy:
        return int(probs.argmax())
    return int(torch.multinomial(probs, 1, generator=generator))


def verify_proposal(
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
        return 0, sample_token(target_probs[0], generator, greedy)
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
        return accepted, sample_token(target_probs[proposed], generator, greedy)
    residual = (target_probs[accepted] - draft_probs[accepted]).clamp_min(0.0)
    if not bool(residual.sum() > 0):
        # Only reachable through rounding (a rejection implies p != q); p itself is then exact.
        residual = target_probs[accepted]
    return accepted, sample_token(residual / residual.sum(), generator, greedy)
