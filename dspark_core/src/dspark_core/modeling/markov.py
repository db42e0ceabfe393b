"""The DSpark Markov heads: a low-rank logit correction conditioned on the previous token.

Every head maps ``(h_k, prev_k)`` (and, for ``rnn``, a running state) to a rank-r latent ``m_k``;
the slot's logits are ``lm_head(h_k) + markov_w2(m_k)``. Keeping the correction in this factored
form lets the objective fuse ``[h ; m] @ [W_lm | W2]^T`` without materialising ``[tokens, V]``.

- ``vanilla``: ``m = W1[prev]``.
- ``gated``: ``m = sigmoid(gate_proj([h ; W1[prev]])) * W1[prev]``.
- ``rnn``: ``[g, c, o] = joint_proj([s ; W1[prev] ; h])``,
  ``s = sigmoid(g) * s + (1 - sigmoid(g)) * tanh(c)``, ``m = tanh(o)``; ``s`` starts at zero per block.

Heads compute in their own parameter dtype: ``hidden`` is cast to it on entry.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar, Final

import torch
from torch import Tensor, nn

from dspark_core.errors import DraftConfigError
from dspark_core.modeling.sampling import filtered_probs
from dspark_core.options import MARKOV_HEAD_TYPES
from dspark_core.validation import is_int

__all__ = [
    "MARKOV_HEAD_TYPES",
    "GatedMarkovHead",
    "MarkovHead",
    "RnnMarkovHead",
    "VanillaMarkovHead",
    "build_markov_head",
]


def _require_positive(field: str, value: int, hint: str) -> None:
    if not is_int(value) or value < 1:
        raise DraftConfigError(f"{field} must be a positive integer, got {value!r}. {hint}")


class MarkovHead(nn.Module):
    """Base class: the shared ``markov_w1`` embedding, ``markov_w2`` projection and serial sampling.

    Subclasses implement :meth:`latent_block` (teacher forced) and :meth:`latent_step` (serial), which
    must agree: stepping through a block with the true previous tokens reproduces ``latent_block``.
    """

    head_type: ClassVar[str]

    def __init__(
        self, vocab_size: int, hidden_size: int, rank: int, *, draft_vocab_size: int | None = None
    ) -> None:
        super().__init__()
        _require_positive(
            "markov_rank",
            rank,
            "A Markov head needs rank >= 1 (the paper uses 256); markov_rank=0 means no Markov head at all.",
        )
        _require_positive("vocab_size", vocab_size, "It is the target's vocabulary size.")
        _require_positive("hidden_size", hidden_size, "It is the draft's hidden size.")
        # markov_w1 reads the previous token (a target id); markov_w2 writes the draft's own vocabulary,
        # which is the target's unless the draft has a reduced vocabulary (vLLM's layout).
        output_size = vocab_size if draft_vocab_size is None else draft_vocab_size
        _require_positive("draft_vocab_size", output_size, "It is the draft's lm_head size.")
        self.vocab_size = vocab_size
        self.draft_vocab_size = output_size
        self.hidden_size = hidden_size
        self.rank = rank
        self.markov_w1 = nn.Embedding(vocab_size, rank)
        self.markov_w2 = nn.Linear(rank, output_size, bias=False)

    @property
    def param_dtype(self) -> torch.dtype:
        """The dtype the head computes in (that of ``markov_w1``)."""
        return self.markov_w1.weight.dtype

    def embed_previous(self, prev_tokens: Tensor) -> Tensor:
        """``markov_w1(prev_tokens)``: ``[...] -> [..., r]``; also the confidence head's Markov features."""
        return self.markov_w1(prev_tokens)  # type: ignore[no-any-return]

    def correction(self, m: Tensor) -> Tensor:
        """The logit correction ``markov_w2(m)``: ``[..., r] -> [..., V]``."""
        return self.markov_w2(m)  # type: ignore[no-any-return]

    def initial_state(
        self,
        batch_shape: Sequence[int] | torch.Size,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Tensor | None:
        """The state at slot 0 of a block: ``None`` for stateless heads."""
        del batch_shape, device, dtype
        return None

    def latent_block(self, hidden: Tensor, prev_tokens: Tensor) -> Tensor:
        """Teacher-forced latents: ``hidden [..., B, H]``, ``prev_tokens [..., B]`` -> ``[..., B, r]``."""
        raise NotImplementedError

    def latent_step(
        self, hidden_k: Tensor, prev_k: Tensor, state: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        """One serial slot: ``hidden_k [..., H]``, ``prev_k [...]`` -> ``(m_k [..., r], next state)``."""
        raise NotImplementedError

    def forward(self, hidden: Tensor, prev_tokens: Tensor) -> Tensor:
        """Alias of :meth:`latent_block`."""
        return self.latent_block(hidden, prev_tokens)

    def sample_block(
        self,
        hidden: Tensor,
        first_token: Tensor,
        lm_head: Callable[[Tensor], Tensor],
        *,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        draft_to_target: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Decode a block serially: ``prev_0 = first_token`` and ``prev_k`` is the token drawn at ``k - 1``.

        With a reduced draft vocabulary, ``draft_to_target [K]`` holds each draft id's target id: tokens,
        probabilities and logits stay in draft ids, and ``prev_k`` (a ``markov_w1`` row) is the target id.

        Args:
            hidden: ``[..., B, H]`` draft hidden states of the block's slots.
            first_token: ``[...]`` the anchor token (the block's slot-0 input).
            lm_head: maps ``[..., H]`` to ``[..., V]`` base logits (``V`` the draft vocabulary; the draft's
                ``base_logits``, which soft-caps them when the config has ``final_logit_softcapping``).
            temperature, top_k, top_p: the filter of :func:`~dspark_core.modeling.sampling.filtered_probs`;
                temperature 0 is greedy.
            generator: the RNG for sampling (unused when greedy).

        Returns:
            ``tokens [..., B]`` (long), ``probs [..., B, V]`` (float32, the filtered distribution each
            token was drawn from; one-hot when greedy) and ``logits [..., B, V]`` (float32, unfiltered
            ``lm_head(h) + markov_w2(m)``).
        """
        if hidden.dim() < 2 or hidden.shape[:-2] != first_token.shape:
            raise ValueError(
                f"hidden must be [..., B, H] with first_token [...]; got hidden {tuple(hidden.shape)} "
                f"and first_token {tuple(first_token.shape)}"
            )
        base_logits = lm_head(hidden).float()
        if base_logits.shape[-1] != self.draft_vocab_size:
            raise ValueError(
                f"lm_head gives {base_logits.shape[-1]} logits but the Markov head writes "
                f"{self.draft_vocab_size}"
            )
        state = self.initial_state(first_token.shape, hidden.device)
        prev = first_token
        tokens: list[Tensor] = []
        probs: list[Tensor] = []
        logits: list[Tensor] = []
        for k in range(hidden.shape[-2]):
            m_k, state = self.latent_step(hidden[..., k, :], prev, state)
            logits_k = base_logits[..., k, :] + self.correction(m_k).float()
            probs_k = filtered_probs(logits_k, temperature, top_k, top_p)
            if temperature == 0:
                token_k = logits_k.argmax(dim=-1)
            else:
                flat = probs_k.reshape(-1, probs_k.shape[-1])
                token_k = torch.multinomial(flat, 1, generator=generator).reshape(prev.shape)
            tokens.append(token_k)
            probs.append(probs_k)
            logits.append(logits_k)
            prev = token_k if draft_to_target is None else draft_to_target[token_k]
        return torch.stack(tokens, dim=-1), torch.stack(probs, dim=-2), torch.stack(logits, dim=-2)

    def _check_block(self, hidden: Tensor, expected_prev_shape: torch.Size, prev_name: str) -> None:
        if hidden.dim() < 2 or hidden.shape[-1] != self.hidden_size:
            raise ValueError(f"hidden must be [..., B, {self.hidden_size}], got {tuple(hidden.shape)}")
        if hidden.shape[:-1] != expected_prev_shape:
            raise ValueError(
                f"{prev_name} has shape {tuple(expected_prev_shape)}, which does not match hidden "
                f"{tuple(hidden.shape)}"
            )

    def _check_step(self, hidden_k: Tensor, prev_k: Tensor) -> None:
        if hidden_k.shape != (*prev_k.shape, self.hidden_size):
            raise ValueError(
                f"hidden_k must be prev_k's shape + [{self.hidden_size}], got hidden_k "
                f"{tuple(hidden_k.shape)} and prev_k {tuple(prev_k.shape)}"
            )

    def extra_repr(self) -> str:
        reduced = (
            "" if self.draft_vocab_size == self.vocab_size else f", draft_vocab_size={self.draft_vocab_size}"
        )
        return f"type={self.head_type}, vocab_size={self.vocab_size}{reduced}, rank={self.rank}"


class _StatelessMarkovHead(MarkovHead):
    """A head whose slot latent depends only on ``(h_k, prev_k)``, so a block is one batched call."""

    def _latent(self, hidden: Tensor, prev: Tensor) -> Tensor:
        raise NotImplementedError

    def latent_block(self, hidden: Tensor, prev_tokens: Tensor) -> Tensor:
        self._check_block(hidden, prev_tokens.shape, "prev_tokens")
        return self._latent(hidden, prev_tokens)

    def latent_step(
        self, hidden_k: Tensor, prev_k: Tensor, state: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        self._check_step(hidden_k, prev_k)
        return self._latent(hidden_k, prev_k), state


class VanillaMarkovHead(_StatelessMarkovHead):
    """``m = W1[prev]``: a low-rank bigram correction."""

    head_type: ClassVar[str] = "vanilla"

    def _latent(self, hidden: Tensor, prev: Tensor) -> Tensor:
        return self.embed_previous(prev)


class GatedMarkovHead(_StatelessMarkovHead):
    """``m = sigmoid(gate_proj([h ; W1[prev]])) * W1[prev]``: the bigram correction gated by context."""

    head_type: ClassVar[str] = "gated"

    def __init__(
        self, vocab_size: int, hidden_size: int, rank: int, *, draft_vocab_size: int | None = None
    ) -> None:
        super().__init__(vocab_size, hidden_size, rank, draft_vocab_size=draft_vocab_size)
        self.gate_proj = nn.Linear(hidden_size + rank, rank)

    def _latent(self, hidden: Tensor, prev: Tensor) -> Tensor:
        embedded = self.embed_previous(prev)
        gate = torch.sigmoid(self.gate_proj(torch.cat([hidden.to(embedded.dtype), embedded], dim=-1)))
        return gate * embedded


class RnnMarkovHead(MarkovHead):
    """A gated recurrence over the block's slots; the state ``s [..., r]`` starts at zero per block."""

    head_type: ClassVar[str] = "rnn"

    def __init__(
        self, vocab_size: int, hidden_size: int, rank: int, *, draft_vocab_size: int | None = None
    ) -> None:
        super().__init__(vocab_size, hidden_size, rank, draft_vocab_size=draft_vocab_size)
        self.joint_proj = nn.Linear(2 * rank + hidden_size, 3 * rank)

    def initial_state(
        self,
        batch_shape: Sequence[int] | torch.Size,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Tensor:
        """Zeros ``[*batch_shape, r]``, on the head's device and in its dtype unless given."""
        return torch.zeros(
            (*batch_shape, self.rank),
            device=self.markov_w1.weight.device if device is None else device,
            dtype=self.param_dtype if dtype is None else dtype,
        )

    def _cell(self, state: Tensor, embedded: Tensor, hidden: Tensor) -> tuple[Tensor, Tensor]:
        state = state.to(embedded.dtype)
        joint = self.joint_proj(torch.cat([state, embedded, hidden.to(embedded.dtype)], dim=-1))
        g, c, o = joint.chunk(3, dim=-1)
        keep = torch.sigmoid(g)
        new_state = keep * state + (1 - keep) * torch.tanh(c)
        return torch.tanh(o), new_state

    def latent_block(self, hidden: Tensor, prev_tokens: Tensor) -> Tensor:
        self._check_block(hidden, prev_tokens.shape, "prev_tokens")
        embedded = self.embed_previous(prev_tokens)
        state = self.initial_state(prev_tokens.shape[:-1], hidden.device)
        latents: list[Tensor] = []
        for k in range(hidden.shape[-2]):
            m_k, state = self._cell(state, embedded[..., k, :], hidden[..., k, :])
            latents.append(m_k)
        return torch.stack(latents, dim=-2)

    def latent_step(self, hidden_k: Tensor, prev_k: Tensor, state: Tensor | None) -> tuple[Tensor, Tensor]:
        """One slot; ``state=None`` means the block's first slot. Feed the returned state to the next slot."""
        self._check_step(hidden_k, prev_k)
        if state is None:
            state = self.initial_state(prev_k.shape, hidden_k.device)
        elif state.shape != (*prev_k.shape, self.rank):
            raise ValueError(
                f"state must be prev_k's shape + [{self.rank}], got {tuple(state.shape)} for prev_k "
                f"{tuple(prev_k.shape)}"
            )
        return self._cell(state, self.embed_previous(prev_k), hidden_k)


_HEAD_CLASSES: Final[dict[str, type[MarkovHead]]] = {
    VanillaMarkovHead.head_type: VanillaMarkovHead,
    GatedMarkovHead.head_type: GatedMarkovHead,
    RnnMarkovHead.head_type: RnnMarkovHead,
}


def build_markov_head(
    head_type: str, vocab_size: int, hidden_size: int, rank: int, *, draft_vocab_size: int | None = None
) -> MarkovHead:
    """Build the Markov head named by the config field ``markov_head_type``; ``draft_vocab_size`` is the
    size of ``markov_w2``'s output (the draft's ``lm_head`` rows), the target's ``vocab_size`` by default.

    Raises:
        DraftConfigError: on an unknown ``head_type`` or a ``rank`` below 1.
    """
    head_class = _HEAD_CLASSES.get(head_type)
    if head_class is None:
        allowed = ", ".join(repr(name) for name in MARKOV_HEAD_TYPES)
        raise DraftConfigError(
            f"markov_head_type={head_type!r} is not a Markov head type; use one of {allowed}, "
            "or set markov_rank=0 for a draft without a Markov head."
        )
    return head_class(vocab_size, hidden_size, rank, draft_vocab_size=draft_vocab_size)
