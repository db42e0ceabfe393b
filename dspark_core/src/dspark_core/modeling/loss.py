"""The DSpark training objective: CE + L1 (twice the total variation) + confidence BCE.

The draft's logits are linear in a concatenated feature, ``z = h @ W_lm^T + m @ W_2^T`` (``h`` the
draft's final hidden state, ``m`` the Markov latent, ``W_lm`` the frozen ``lm_head`` weight and
``W_2`` the ``markov_w2`` weight), and the teacher's are ``t @ W_lm^T``. With a soft cap ``c`` (the
config's ``final_logit_softcapping``, Gemma) the ``lm_head`` part of both becomes
``c * tanh(h @ W_lm^T / c)`` and the Markov term is added after it. The objective therefore
takes hidden states and weights, never ``[tokens, V]`` logits: it gathers the supervised tokens,
then builds the logits chunk by chunk and differentiates them analytically in a custom autograd
function, so that neither the forward nor the backward pass holds more than one chunk's
vocabulary-sized buffers.

Term definitions (method reference, section 5), with 0-based slot ``k``:

- ``w_k = eval_mask_k * exp(-k / gamma)`` (``gamma=None``: ``w_k = eval_mask_k``);
- ``d_k = sum_v |softmax(z_k)_v - softmax(z^teacher_k)_v|``, the teacher detached;
- ``alpha_k = clamp(1 - d_k / 2, 0, 1)``;
- ``CE_k = logsumexp(z_k) - z_k[label_k]`` and ``BCE_k = BCEWithLogits(conf_k, alpha_k.detach())``;
- each term is ``sum(w * term) / sum(w)``; ``loss = ce_weight*CE + l1_weight*L1 + confidence_weight*BCE``.

All vocabulary-sized math (the logits projection included) runs in fp32, or fp64 when an input is
fp64.

Reduced vocabulary (a draft with ``lm_head [K, H]`` and ``d2t``): the draft's ``q`` lives on ``K``
target tokens, the teacher's ``p`` stays the target's full distribution ``softmax(t @ W_target^T)``
(restricted, not renormalised), and ``d_k = sum_{v in K} |q_v - p_v| + (1 - sum_{v in K} p_v)``: exactly
the L1 distance between the target's ``p`` and the draft's ``q`` scattered onto the target vocabulary, so
``alpha_k`` is the acceptance probability decoding sees. The missing mass does not depend on the draft,
so the gradient has the full-vocabulary form on the ``K`` tokens. ``CE_k`` is 0 for a slot whose label
is outside the ``K`` tokens (no draft logit can name it); ``w_k`` is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from dspark_core.options import DSparkLossConfig

if TYPE_CHECKING:
    from dspark_core.modeling.draft import DSparkDraftModel, DSparkDraftOutput

__all__ = [
    "ECE_NUM_BINS",
    "DSparkLossConfig",
    "DSparkObjective",
    "DSparkObjectiveOutput",
    "dspark_objective",
    "slot_weights",
]

#: Number of equal-width probability bins of the ``confidence_ece`` diagnostic.
ECE_NUM_BINS = 10


@dataclass(frozen=True)
class DSparkObjectiveOutput:
    """What :func:`dspark_objective` returns.

    - ``loss``: the differentiable scalar to call ``backward()`` on. Under cross-rank reduction it
      is this rank's share times the world size, so that averaging gradients over ranks (DDP, FSDP)
      yields the gradient of the global weighted mean; its value differs between ranks.
    - ``ce``, ``l1``, ``confidence``: the normalised terms, detached, global across ranks
      (``confidence`` is 0 without a confidence head); ``total`` their weighted sum, the loss to report.
    - ``diagnostics``: name -> ``(numerator, denominator)``, 0-d float64 tensors summed across
      ranks; the metric is ``numerator / denominator``. Summing both over steps gives the
      count-weighted metric over those steps.
    """

    loss: Tensor
    ce: Tensor
    l1: Tensor
    confidence: Tensor
    diagnostics: dict[str, tuple[Tensor, Tensor]]
    #: the weighted sum of the global terms, detached: the same on every rank, unlike ``loss``
    total: Tensor


def slot_weights(
    eval_mask: Tensor, decay_gamma: float | None, *, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Return ``eval_mask[..., k] * exp(-k / decay_gamma)`` for the last (slot) dimension of ``eval_mask``."""
    block_size = eval_mask.shape[-1]
    mask = eval_mask.to(dtype)
    if decay_gamma is None:
        return mask
    k = torch.arange(block_size, device=eval_mask.device, dtype=torch.float64)
    decay = torch.exp(-k / decay_gamma).to(dtype)
    return mask * decay


def dspark_objective(
    *,
    draft_hidden: Tensor,
    markov_latent: Tensor | None,
    teacher_hidden: Tensor,
    lm_head_weight: Tensor,
    markov_w2_weight: Tensor | None,
    labels: Tensor,
    eval_mask: Tensor,
    confidence_logits: Tensor | None,
    config: DSparkLossConfig,
    process_group: dist.ProcessGroup | None = None,
    all_reduce: bool | None = None,
    teacher_lm_head_weight: Tensor | None = None,
    draft_token_ids: Tensor | None = None,
    logit_softcap: float | None = None,
) -> DSparkObjectiveOutput:
    """Compute the DSpark objective over ``M`` blocks of ``B`` slots.

    Shapes: ``draft_hidden`` and ``teacher_hidden`` ``[M, B, H]``, ``markov_latent`` ``[M, B, r]``
    (with ``markov_w2_weight`` ``[V, r]``; both ``None`` without a Markov head), ``lm_head_weight``
    ``[V, H]``, ``labels`` ``[M, B]`` integer, ``eval_mask`` ``[M, B]`` bool, ``confidence_logits``
    ``[M, B]`` or ``None``. Labels are read only where ``eval_mask`` is true and must lie in ``[0, V)``
    there. ``teacher_hidden`` is detached. ``logit_softcap`` soft-caps the ``lm_head`` logits of draft
    and teacher alike (``None``: no cap).

    Reduced vocabulary: ``lm_head_weight`` is the draft's ``[K, H]``, ``teacher_lm_head_weight`` the
    target's ``[V, H]`` and ``draft_token_ids`` ``[K]`` the target id of each draft id (both or neither);
    labels are target ids in ``[0, V)``.

    Cross-rank reduction: with ``all_reduce=None`` it happens iff ``process_group`` is given or the
    default ``torch.distributed`` group is initialised; ``True`` requires an initialised group and
    ``False`` disables it (per-rank normalisation). Every rank of the group must call this function
    with the same configuration (Markov head and confidence head present or not, same ``B``).
    """
    _check_inputs(
        draft_hidden=draft_hidden,
        markov_latent=markov_latent,
        teacher_hidden=teacher_hidden,
        lm_head_weight=lm_head_weight,
        markov_w2_weight=markov_w2_weight,
        labels=labels,
        eval_mask=eval_mask,
        confidence_logits=confidence_logits,
    )
    _check_teacher_head(lm_head_weight, teacher_lm_head_weight, draft_token_ids)
    reduce, world_size = _resolve_reduction(all_reduce, process_group)

    num_blocks, block_size, _ = draft_hidden.shape
    compute_dtype = _compute_dtype(
        draft_hidden, teacher_hidden, lm_head_weight, markov_latent, markov_w2_weight, confidence_logits
    )
    device = draft_hidden.device
    teacher_head = lm_head_weight if teacher_lm_head_weight is None else teacher_lm_head_weight.detach()
    slots = _supervised_slots(
        draft_hidden, markov_latent, teacher_hidden, labels, eval_mask, config, compute_dtype,
        vocab_size=teacher_head.shape[0], draft_token_ids=draft_token_ids,
    )  # fmt: skip
    numerators, alpha, conf_prob = _slot_terms(
        slots, lm_head_weight, markov_w2_weight, confidence_logits, config, compute_dtype,
        teacher_head=teacher_head, draft_token_ids=draft_token_ids, logit_softcap=logit_softcap,
    )  # fmt: skip

    # Everything that crosses ranks goes in one float64 vector and one all_reduce.
    stats_device = torch.device("cpu") if device.type == "mps" else device  # MPS has no float64
    stats = _local_statistics(
        weights=slots.weights,
        term_numerators=(numerators[0], numerators[1], numerators[2]),
        alpha=alpha,
        index=slots.index,
        eval_mask=eval_mask,
        conf_prob=conf_prob,
        num_blocks=num_blocks,
        block_size=block_size,
        device=stats_device,
    )
    if reduce:
        dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=process_group)
    parts = _split_statistics(stats, block_size, with_confidence=confidence_logits is not None)
    return _normalised_output(parts, numerators, config, world_size, compute_dtype, device, block_size)


@dataclass(frozen=True)
class _Slots:
    """The supervised slots (``w > 0`` iff ``eval_mask``), flattened: only they enter the vocabulary."""

    index: Tensor
    weights: Tensor
    hidden: Tensor
    teacher: Tensor
    targets: Tensor
    latent: Tensor | None


def _supervised_slots(
    draft_hidden: Tensor,
    markov_latent: Tensor | None,
    teacher_hidden: Tensor,
    labels: Tensor,
    eval_mask: Tensor,
    config: DSparkLossConfig,
    compute_dtype: torch.dtype,
    *,
    vocab_size: int,
    draft_token_ids: Tensor | None = None,
) -> _Slots:
    hidden_size = draft_hidden.shape[-1]
    index = eval_mask.reshape(-1).nonzero().squeeze(1)
    weights = (
        slot_weights(eval_mask, config.decay_gamma, dtype=compute_dtype).reshape(-1).index_select(0, index)
    )
    hidden = draft_hidden.reshape(-1, hidden_size).index_select(0, index)
    teacher = teacher_hidden.detach().reshape(-1, hidden_size).index_select(0, index)
    targets = labels.reshape(-1).index_select(0, index).long()
    latent = None
    if markov_latent is not None:
        latent = markov_latent.reshape(-1, markov_latent.shape[-1]).index_select(0, index)
    if targets.numel() > 0 and bool(((targets < 0) | (targets >= vocab_size)).any()):
        raise ValueError(f"labels must lie in [0, {vocab_size}) wherever eval_mask is true.")
    if draft_token_ids is not None:
        # Target ids -> draft ids; -1 marks a label the reduced vocabulary cannot propose.
        to_draft = torch.full((vocab_size,), -1, dtype=torch.long, device=targets.device)
        ids = draft_token_ids.to(device=targets.device, dtype=torch.long)
        to_draft[ids] = torch.arange(ids.numel(), device=targets.device)
        targets = to_draft[targets]
    return _Slots(index, weights, hidden, teacher, targets, latent)


def _slot_terms(
    slots: _Slots,
    lm_head_weight: Tensor,
    markov_w2_weight: Tensor | None,
    confidence_logits: Tensor | None,
    config: DSparkLossConfig,
    compute_dtype: torch.dtype,
    *,
    teacher_head: Tensor,
    draft_token_ids: Tensor | None,
    logit_softcap: float | None = None,
) -> tuple[list[Tensor], Tensor, Tensor | None]:
    """The weighted CE, L1 and confidence sums over the supervised slots, each slot's acceptance
    ``alpha`` and the confidence head's probabilities (``None`` without the head)."""
    device = slots.hidden.device
    chunk = config.chunk_size if config.chunk_size is not None else max(int(slots.index.numel()), 1)
    # The vocabulary terms are fp32 by design; a caller's bf16 autocast must not downcast the
    # matmuls (it would also mix dtypes inside the in-place addmm). Backward disables it itself.
    with torch.autocast(device_type=device.type, enabled=False):
        # torch types Function.apply as untyped; _VocabTerms.forward documents the signature.
        ce_tok, dist_tok = _VocabTerms.apply(  # type: ignore[no-untyped-call]
            slots.hidden, slots.latent, slots.teacher, slots.targets, lm_head_weight, markov_w2_weight,
            chunk, compute_dtype, teacher_head, draft_token_ids, logit_softcap,
        )  # fmt: skip
    alpha = (1.0 - dist_tok.detach() / 2.0).clamp(0.0, 1.0)

    weights = slots.weights
    numerators = [(weights * ce_tok).sum(), (weights * dist_tok).sum()]
    numerators.append(torch.zeros((), dtype=compute_dtype, device=device))
    conf_prob: Tensor | None = None
    if confidence_logits is not None:
        conf = confidence_logits.reshape(-1).index_select(0, slots.index).to(compute_dtype)
        bce = F.binary_cross_entropy_with_logits(conf, alpha, reduction="none")
        numerators[2] = (weights * bce).sum()
        conf_prob = torch.sigmoid(conf.detach())
    return numerators, alpha, conf_prob


def _normalised_output(
    parts: dict[str, Tensor],
    numerators: list[Tensor],
    config: DSparkLossConfig,
    world_size: int,
    compute_dtype: torch.dtype,
    device: torch.device,
    block_size: int,
) -> DSparkObjectiveOutput:
    """Divide by the global weight: the differentiable loss, the reported terms and diagnostics."""
    denominator = parts["denominator"]
    # A global denominator of 0 means no supervised slot anywhere: every term is 0, not NaN.
    inverse = torch.where(denominator > 0, 1.0 / denominator.clamp_min(1e-300), torch.zeros_like(denominator))
    inverse_c = inverse.to(device=device, dtype=compute_dtype)
    ce_num, l1_num, conf_num = numerators
    loss = (config.ce_weight * ce_num + config.l1_weight * l1_num + config.confidence_weight * conf_num) * (
        inverse_c * world_size
    )
    terms = parts["term_numerators"] * inverse
    ce_value, l1_value, conf_value = (terms[i].to(device=device, dtype=compute_dtype) for i in range(3))
    return DSparkObjectiveOutput(
        loss=loss,
        ce=ce_value,
        l1=l1_value,
        confidence=conf_value,
        diagnostics=_diagnostics(parts, block_size, with_confidence="bin_count" in parts),
        total=(
            config.ce_weight * ce_value + config.l1_weight * l1_value + config.confidence_weight * conf_value
        ),
    )


class DSparkObjective:
    """The objective of a draft's training forward: ``DSparkObjective(config)(draft, output)``.

    It owns the loss weighting and the cross-rank reduction (``process_group``, ``all_reduce``, as in
    :func:`dspark_objective`), so the model's forward knows nothing of either.
    """

    def __init__(
        self,
        config: DSparkLossConfig | None = None,
        *,
        process_group: dist.ProcessGroup | None = None,
        all_reduce: bool | None = None,
        teacher_lm_head: Tensor | None = None,
    ) -> None:
        self.config = config or DSparkLossConfig()
        self.process_group = process_group
        self.all_reduce = all_reduce
        # The target's lm_head weight [V, H]: the teacher of a reduced-vocabulary draft, whose own
        # lm_head covers only its K tokens (unused for a full-vocabulary draft, which holds the target's).
        self.teacher_lm_head = teacher_lm_head

    def __call__(self, draft: DSparkDraftModel, output: DSparkDraftOutput) -> DSparkObjectiveOutput:
        """The objective of ``output``, a forward of ``draft`` (whose ``lm_head`` and ``markov_w2``
        turn the hidden states into logits)."""
        markov = draft.markov_head
        latent = output.markov_latent
        confidence = output.confidence_logits
        draft_ids = draft.draft_token_ids()
        if draft_ids is not None and self.teacher_lm_head is None:
            raise ValueError(
                "a reduced-vocabulary draft needs the target's lm_head as teacher: "
                "DSparkObjective(config, teacher_lm_head=target.get_output_embeddings().weight)"
            )
        return dspark_objective(
            draft_hidden=output.hidden.flatten(0, 1),
            markov_latent=None if latent is None else latent.flatten(0, 1),
            teacher_hidden=output.teacher_hidden.flatten(0, 1),
            lm_head_weight=draft.lm_head.weight,
            markov_w2_weight=None if markov is None else markov.markov_w2.weight,
            labels=output.labels.flatten(0, 1),
            eval_mask=output.eval_mask.flatten(0, 1),
            confidence_logits=None if confidence is None else confidence.flatten(0, 1),
            config=self.config,
            process_group=self.process_group,
            all_reduce=self.all_reduce,
            teacher_lm_head_weight=None if draft_ids is None else self.teacher_lm_head,
            draft_token_ids=draft_ids,
            logit_softcap=draft.logit_softcap,
        )


def _check_teacher_head(
    lm_head_weight: Tensor, teacher_lm_head_weight: Tensor | None, draft_token_ids: Tensor | None
) -> None:
    if (teacher_lm_head_weight is None) != (draft_token_ids is None):
        raise ValueError(
            "teacher_lm_head_weight and draft_token_ids must be given together (or both be None)."
        )
    if teacher_lm_head_weight is None or draft_token_ids is None:
        return
    draft_vocab, hidden_size = lm_head_weight.shape
    if teacher_lm_head_weight.dim() != 2 or teacher_lm_head_weight.shape[1] != hidden_size:
        raise ValueError(
            f"teacher_lm_head_weight must be [V, {hidden_size}], got {tuple(teacher_lm_head_weight.shape)}."
        )
    vocab = teacher_lm_head_weight.shape[0]
    if tuple(draft_token_ids.shape) != (draft_vocab,):
        raise ValueError(
            f"draft_token_ids must be [K] = [{draft_vocab}], got {tuple(draft_token_ids.shape)}."
        )
    if bool(((draft_token_ids < 0) | (draft_token_ids >= vocab)).any()):
        raise ValueError(f"draft_token_ids must lie in [0, {vocab}) (the teacher's vocabulary).")


def _compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    dtype = torch.float32
    for tensor in tensors:
        if tensor is not None and tensor.is_floating_point():
            dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def _resolve_reduction(all_reduce: bool | None, process_group: dist.ProcessGroup | None) -> tuple[bool, int]:
    initialised = dist.is_available() and dist.is_initialized()
    reduce = all_reduce if all_reduce is not None else (process_group is not None or initialised)
    if not reduce:
        return False, 1
    if not initialised:
        raise RuntimeError(
            "dspark_objective was asked to reduce across ranks (all_reduce=True or a process_group), "
            "but torch.distributed is not initialised."
        )
    return True, dist.get_world_size(process_group)


def _check_inputs(
    *,
    draft_hidden: Tensor,
    markov_latent: Tensor | None,
    teacher_hidden: Tensor,
    lm_head_weight: Tensor,
    markov_w2_weight: Tensor | None,
    labels: Tensor,
    eval_mask: Tensor,
    confidence_logits: Tensor | None,
) -> None:
    if draft_hidden.dim() != 3:
        raise ValueError(f"draft_hidden must be [M, B, H], got shape {tuple(draft_hidden.shape)}.")
    num_blocks, block_size, hidden_size = draft_hidden.shape
    block_shape = (num_blocks, block_size)
    if tuple(teacher_hidden.shape) != tuple(draft_hidden.shape):
        raise ValueError(
            f"teacher_hidden shape {tuple(teacher_hidden.shape)} != "
            f"draft_hidden shape {tuple(draft_hidden.shape)}."
        )
    if lm_head_weight.dim() != 2 or lm_head_weight.shape[1] != hidden_size:
        raise ValueError(f"lm_head_weight must be [V, {hidden_size}], got {tuple(lm_head_weight.shape)}.")
    vocab_size = lm_head_weight.shape[0]
    for name, tensor in (
        ("labels", labels),
        ("eval_mask", eval_mask),
        ("confidence_logits", confidence_logits),
    ):
        if tensor is not None and tuple(tensor.shape) != block_shape:
            raise ValueError(f"{name} must be [M, B] = {block_shape}, got {tuple(tensor.shape)}.")
    if eval_mask.dtype != torch.bool:
        raise ValueError(f"eval_mask must be a bool tensor, got {eval_mask.dtype}.")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}.")
    if (markov_latent is None) != (markov_w2_weight is None):
        raise ValueError("markov_latent and markov_w2_weight must be given together (or both be None).")
    if markov_latent is not None and markov_w2_weight is not None:
        if markov_latent.dim() != 3 or tuple(markov_latent.shape[:2]) != block_shape:
            raise ValueError(
                f"markov_latent must be [M, B, r] with [M, B] = {block_shape}, "
                f"got {tuple(markov_latent.shape)}."
            )
        rank = markov_latent.shape[2]
        if tuple(markov_w2_weight.shape) != (vocab_size, rank):
            raise ValueError(
                f"markov_w2_weight must be [V, r] = {(vocab_size, rank)}, "
                f"got {tuple(markov_w2_weight.shape)}."
            )


def _draft_logits(
    hidden: Tensor,
    latent: Tensor | None,
    lm_head: Tensor,
    w2: Tensor | None,
    dtype: torch.dtype,
    cap: float | None = None,
) -> Tensor:
    """``[h ; m] @ [W_lm | W_2]^T`` for one chunk, in ``dtype`` (weights already cast); with ``cap``,
    ``softcap(h @ W_lm^T) + m @ W_2^T``."""
    logits = _softcap_(hidden.to(dtype) @ lm_head.T, cap)
    if latent is not None and w2 is not None:
        logits.addmm_(latent.to(dtype), w2.T)
    return logits


def _softcap_(logits: Tensor, cap: float | None) -> Tensor:
    """``cap * tanh(logits / cap)`` in place; unchanged without a cap."""
    if cap is None:
        return logits
    return logits.div_(cap).tanh_().mul_(cap)


def _softmax_(logits: Tensor) -> Tensor:
    """Softmax over the last dimension, in place."""
    return logits.sub_(torch.logsumexp(logits, dim=-1, keepdim=True)).exp_()


def _teacher_probs(
    teacher: Tensor, head: Tensor, draft_ids: Tensor | None, dtype: torch.dtype, cap: float | None
) -> Tensor:
    """The teacher's probabilities of the draft's tokens: all of them, or (reduced vocabulary) the
    ``K`` columns of the target's full distribution, not renormalised; soft-capped like the target."""
    probs = _softmax_(_softcap_(teacher.to(dtype) @ head.T, cap))
    return probs if draft_ids is None else probs.index_select(1, draft_ids)


class _VocabTerms(torch.autograd.Function):
    """Per-token CE and L1 distance over the vocabulary, chunked in both passes.

    Forward keeps only its inputs; backward rebuilds one chunk's logits at a time and applies the
    closed-form gradient ``dL/dz = gce * (p - onehot(y)) + gd * p * (s - <s, p>)`` with
    ``s = sign(p - q)``, so no ``[tokens, V]`` activation is ever stored.
    """

    @staticmethod
    def forward(
        ctx: Any,
        hidden: Tensor,
        latent: Tensor | None,
        teacher: Tensor,
        targets: Tensor,
        lm_head: Tensor,
        w2: Tensor | None,
        chunk: int,
        dtype: torch.dtype,
        teacher_head: Tensor,
        draft_ids: Tensor | None,
        cap: float | None = None,
    ) -> tuple[Tensor, Tensor]:
        # targets are draft ids; -1 (reduced vocabulary only) marks a label the draft cannot propose.
        ctx.save_for_backward(hidden, latent, teacher, targets, lm_head, w2, teacher_head, draft_ids)
        ctx.chunk = chunk
        ctx.dtype = dtype
        ctx.cap = cap
        num_tokens = hidden.shape[0]
        ce = torch.empty(num_tokens, dtype=dtype, device=hidden.device)
        distance = torch.empty(num_tokens, dtype=dtype, device=hidden.device)
        # One cast per pass: held during the loop only, never saved.
        lm_head_c = lm_head.to(dtype)
        w2_c = w2.to(dtype) if w2 is not None else None
        teacher_head_c = teacher_head.to(dtype)
        for start in range(0, num_tokens, chunk):
            rows = slice(start, start + chunk)
            logits = _draft_logits(
                hidden[rows], latent[rows] if latent is not None else None, lm_head_c, w2_c, dtype, cap
            )
            log_norm = torch.logsumexp(logits, dim=-1, keepdim=True)
            labels = targets[rows]
            label_logits = logits.gather(1, labels.clamp_min(0)[:, None]).squeeze(1)
            ce[rows] = torch.where(labels >= 0, log_norm.squeeze(1) - label_logits, 0.0)
            probs = logits.sub_(log_norm).exp_()
            teacher_probs = _teacher_probs(teacher[rows], teacher_head_c, draft_ids, dtype, cap)
            # The teacher's mass outside the draft's tokens (0 for a full vocabulary) is part of the L1.
            outside = (1.0 - teacher_probs.sum(dim=-1)).clamp_min(0.0) if draft_ids is not None else 0.0
            distance[rows] = probs.sub_(teacher_probs).abs_().sum(dim=-1) + outside
        return ce, distance

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_ce: Tensor, grad_distance: Tensor) -> tuple[Tensor | None, ...]:
        hidden = ctx.saved_tensors[0]
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            return _VocabTerms._backward(ctx, grad_ce, grad_distance)

    @staticmethod
    def _backward(ctx: Any, grad_ce: Tensor, grad_distance: Tensor) -> tuple[Tensor | None, ...]:
        hidden, latent, teacher, targets, lm_head, w2, teacher_head, draft_ids = ctx.saved_tensors
        need_hidden, need_latent, _, _, need_lm_head, need_w2 = ctx.needs_input_grad[:6]
        chunk: int = ctx.chunk
        dtype: torch.dtype = ctx.dtype
        teacher_head_c = teacher_head.to(dtype)
        cap: float | None = ctx.cap
        lm_head_c = lm_head.to(dtype)
        w2_c = w2.to(dtype) if w2 is not None else None
        grad_ce = grad_ce.to(dtype)
        grad_distance = grad_distance.to(dtype)

        grad_hidden = torch.zeros_like(hidden, dtype=dtype) if need_hidden else None
        grad_latent = torch.zeros_like(latent, dtype=dtype) if need_latent else None
        grad_lm_head = torch.zeros_like(lm_head, dtype=dtype) if need_lm_head else None
        grad_w2 = torch.zeros_like(w2, dtype=dtype) if need_w2 else None
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, start + chunk)
            latent_rows = latent[rows].to(dtype) if latent is not None else None
            # With a cap, d(capped)/d(raw) = 1 - (capped / cap)^2 scales the lm_head part's gradient.
            capped = _softcap_(hidden[rows].to(dtype) @ lm_head_c.T, cap) if cap is not None else None
            probs = _softmax_(_draft_logits(hidden[rows], latent_rows, lm_head_c, w2_c, dtype, cap))
            # The teacher buffer becomes s = sign(p - q), then the logits gradient.
            teacher_probs = _teacher_probs(teacher[rows], teacher_head_c, draft_ids, dtype, cap)
            grad_logits = teacher_probs.neg_().add_(probs).sign_()
            s_dot_p = torch.linalg.vecdot(grad_logits, probs)
            labels = targets[rows, None]
            # A label outside a reduced vocabulary has CE 0: no gradient from it.
            gce = grad_ce[rows, None] * (labels >= 0)
            grad_logits.sub_(s_dot_p[:, None]).mul_(grad_distance[rows, None]).add_(gce).mul_(probs)
            grad_logits.scatter_add_(1, labels.clamp_min(0), -gce)
            del probs
            if grad_latent is not None and w2_c is not None:
                grad_latent[rows] = grad_logits @ w2_c
            if grad_w2 is not None and latent_rows is not None:
                grad_w2.addmm_(grad_logits.T, latent_rows)
            if capped is not None and cap is not None:
                # From here on, the gradient of the raw lm_head logits.
                grad_logits.mul_(capped.div_(cap).square_().neg_().add_(1.0))
                del capped
            if grad_hidden is not None:
                grad_hidden[rows] = grad_logits @ lm_head_c
            if grad_lm_head is not None:
                grad_lm_head.addmm_(grad_logits.T, hidden[rows].to(dtype))

        def cast(grad: Tensor | None, like: Tensor | None) -> Tensor | None:
            return grad.to(like.dtype) if grad is not None and like is not None else None

        return (
            cast(grad_hidden, hidden),
            cast(grad_latent, latent),
            None,
            None,
            cast(grad_lm_head, lm_head),
            cast(grad_w2, w2),
            None,
            None,
            None,
            None,
            None,
        )


def _local_statistics(
    *,
    weights: Tensor,
    term_numerators: tuple[Tensor, Tensor, Tensor],
    alpha: Tensor,
    index: Tensor,
    eval_mask: Tensor,
    conf_prob: Tensor | None,
    num_blocks: int,
    block_size: int,
    device: torch.device,
) -> Tensor:
    """This rank's sums, float64, in the order :func:`_split_statistics` reads them."""
    f64 = torch.float64
    mask = eval_mask.to(device=device, dtype=f64)
    index = index.to(device)
    alpha64 = alpha.to(device=device, dtype=f64)
    alpha_full = torch.zeros(num_blocks * block_size, dtype=f64, device=device)
    alpha_full = alpha_full.index_copy(0, index, alpha64).reshape(num_blocks, block_size)
    # alpha_full is 0 off the mask, so the running product is prod_{j<=k} alpha_j * mask_j.
    accepted_run = torch.cumprod(alpha_full, dim=1)
    valid_block = mask[:, 0] if block_size > 0 else torch.zeros(num_blocks, dtype=f64, device=device)
    pieces = [
        weights.detach().sum().to(device=device, dtype=f64).reshape(1),
        torch.stack([t.detach().to(device=device, dtype=f64) for t in term_numerators]),
        alpha_full.sum(dim=0),
        mask.sum(dim=0),
        ((1.0 + accepted_run.sum(dim=1)) * valid_block).sum().reshape(1),
        valid_block.sum().reshape(1),
    ]
    if conf_prob is not None:
        prob = conf_prob.to(device=device, dtype=f64)
        bins = (prob * ECE_NUM_BINS).long().clamp_(0, ECE_NUM_BINS - 1)
        zeros = torch.zeros(ECE_NUM_BINS, dtype=f64, device=device)
        pieces += [
            zeros.index_add(0, bins, torch.ones_like(prob)),
            zeros.index_add(0, bins, prob),
            zeros.index_add(0, bins, alpha64),
            (prob - alpha64).sum().reshape(1),
        ]
    return torch.cat(pieces)


def _split_statistics(stats: Tensor, block_size: int, *, with_confidence: bool) -> dict[str, Tensor]:
    sizes = {
        "denominator": 1,
        "term_numerators": 3,
        "accept_num": block_size,
        "accept_den": block_size,
        "tau_num": 1,
        "tau_den": 1,
    }
    if with_confidence:
        sizes |= {
            "bin_count": ECE_NUM_BINS,
            "bin_conf": ECE_NUM_BINS,
            "bin_alpha": ECE_NUM_BINS,
            "bias_num": 1,
        }
    scalars = ("denominator", "tau_num", "tau_den", "bias_num")
    parts: dict[str, Tensor] = {}
    offset = 0
    for name, size in sizes.items():
        parts[name] = stats[offset] if name in scalars else stats[offset : offset + size]
        offset += size
    return parts


def _diagnostics(
    parts: dict[str, Tensor], block_size: int, *, with_confidence: bool
) -> dict[str, tuple[Tensor, Tensor]]:
    """Metric name -> (numerator, denominator), from globally summed statistics.

    These are teacher-forced proxies on training blocks, not decoding measurements: ``alpha@k`` is
    the mean of ``alpha_k = 1 - TV_k`` over supervised slots ``k`` (each slot on its own, whatever the
    slots before it did), and ``tau_proxy`` is ``1 + sum_k prod_{j<=k} alpha_j`` per block. Decoding's
    ``accept_rate@k`` is another quantity, ``P(accepted > k | proposed > k)``, hence other names.

    ``confidence_ece`` is the expected calibration error of ``sigmoid(conf)`` against the soft
    target ``alpha`` over supervised slots: with ``ECE_NUM_BINS`` equal-width bins of
    ``sigmoid(conf)``, numerator ``sum_bins |sum(sigmoid(conf)) - sum(alpha)|`` and denominator the
    slot count. ``confidence_bias`` is ``sum(sigmoid(conf) - alpha)`` over the same count.
    """
    diagnostics: dict[str, tuple[Tensor, Tensor]] = {}
    for k in range(block_size):
        diagnostics[f"alpha@{k}"] = (parts["accept_num"][k], parts["accept_den"][k])
    diagnostics["tau_proxy"] = (parts["tau_num"], parts["tau_den"])
    if with_confidence:
        count = parts["bin_count"].sum()
        diagnostics["confidence_ece"] = ((parts["bin_conf"] - parts["bin_alpha"]).abs().sum(), count)
        diagnostics["confidence_bias"] = (parts["bias_num"], count)
    return diagnostics
