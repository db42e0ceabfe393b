"""Capture of the target's hidden states at ``target_layer_ids``, the draft's context features.

Layer ids follow HF ``output_hidden_states`` exactly: id ``-1`` is ``hidden_states[0]`` (the input of
decoder layer 0, i.e. the embedding output) and id ``i`` is ``hidden_states[i + 1]``. For
``i < n - 1`` that is the output of decoder layer ``i``; for ``i = n - 1`` HF's last entry is the
*final-norm* output (``last_hidden_state``), not the raw output of the last layer, and so it is here.

Forward hooks record only the requested layers, so memory holds L layers rather than all n + 1.
:func:`capture_layer_outputs` keeps the hooks in place around any forward, e.g. the cached prefill and
verify passes of speculative decoding; :func:`capture_target_features` runs one uncached forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from dspark_core.errors import DraftConfigError
from dspark_core.validation import is_int

__all__ = [
    "LayerCapture",
    "TargetFeatures",
    "capture_layer_outputs",
    "capture_target_features",
    "find_target_decoder",
]


@dataclass(frozen=True)
class TargetFeatures:
    """What one target forward yields for the draft.

    Attributes:
        features: ``[b, S, L*H]``, the hidden states at ``target_layer_ids`` concatenated in the
            given order.
        final_hidden: ``[b, S, H]``, the post-final-norm hidden states; ``lm_head(final_hidden)`` are
            the target's logits.
    """

    features: Tensor
    final_hidden: Tensor


def find_target_decoder(target: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    """Return ``(base model, its decoder layers)`` of an HF causal LM (or of a base model itself).

    Looks at ``target.get_decoder()``, then ``target.model``, then ``target``, for a module with a
    non-empty ``layers`` ``ModuleList``.

    Raises:
        DraftConfigError: naming the target class, when none is found.
    """
    candidates: list[Any] = []
    get_decoder = getattr(target, "get_decoder", None)
    if callable(get_decoder):
        # HF's get_decoder raises for the few architectures it cannot resolve; fall through to .model.
        with_decoder: Any = None
        with contextlib.suppress(AttributeError, NotImplementedError, ValueError):
            with_decoder = get_decoder()
        candidates.append(with_decoder)
    candidates.extend([getattr(target, "model", None), target])
    for candidate in candidates:
        layers = getattr(candidate, "layers", None)
        if isinstance(candidate, nn.Module) and isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return candidate, layers
    raise DraftConfigError(
        f"cannot capture target features from {type(target).__name__}: found no base model with a "
        "non-empty `layers` ModuleList at get_decoder(), .model or the model itself. dspark supports "
        "HF causal LMs laid out like Qwen3ForCausalLM (model.embed_tokens, model.layers, model.norm)."
    )


def _validate_layer_ids(target_layer_ids: Sequence[int], num_layers: int, target_name: str) -> list[int]:
    ids = list(target_layer_ids)
    if not ids:
        raise DraftConfigError("target_layer_ids is empty; give at least one target layer id.")
    for layer_id in ids:
        if not is_int(layer_id) or not -1 <= layer_id < num_layers:
            raise DraftConfigError(
                f"target_layer_ids={ids} contains {layer_id!r}, but {target_name} has {num_layers} decoder "
                f"layers: each id must be -1 (the embedding output) or in [0, {num_layers - 1}]."
            )
    return ids


def _layer_output(output: Any) -> Tensor:
    # Decoder layers return either the hidden states or a tuple led by them, depending on the model.
    hidden = output[0] if isinstance(output, tuple | list) else output
    if not isinstance(hidden, Tensor):
        raise TypeError(
            f"expected a decoder layer to return a Tensor (or a tuple led by one), got {type(output)}"
        )
    return hidden


class LayerCapture:
    """The hidden states recorded by :func:`capture_layer_outputs` during the latest target forward."""

    def __init__(self, target_layer_ids: Sequence[int], num_layers: int, target_name: str) -> None:
        self.target_layer_ids = list(target_layer_ids)
        self.num_layers = num_layers
        self._target_name = target_name
        self._captured: dict[int, Tensor] = {}
        self._final_hidden: Tensor | None = None

    def clear(self) -> None:
        """Forget what the previous forward recorded."""
        self._captured.clear()
        self._final_hidden = None

    def final_hidden(self) -> Tensor:
        """``[b, T, H]``, the base model's post-final-norm output of the latest forward."""
        if self._final_hidden is None:
            raise RuntimeError(
                f"no {self._target_name} forward has run inside capture_layer_outputs since the last clear()"
            )
        return self._final_hidden

    def features(self) -> Tensor:
        """``[b, T, L*H]``: the hidden states at ``target_layer_ids`` of the latest forward, concatenated."""
        final_hidden = self.final_hidden()
        last = self.num_layers - 1
        missing = sorted({i for i in self.target_layer_ids if i < last} - self._captured.keys())
        if missing:
            raise RuntimeError(
                f"{self._target_name}'s forward did not run the decoder layers for target_layer_ids {missing}"
            )
        parts = [final_hidden if i == last else self._captured[i] for i in self.target_layer_ids]
        return torch.cat(parts, dim=-1)


@contextlib.contextmanager
def capture_layer_outputs(target: nn.Module, target_layer_ids: Sequence[int]) -> Iterator[LayerCapture]:
    """Record the target's features at ``target_layer_ids`` during every forward run inside the block.

    Works around any forward of ``target`` or of its base model, cached or not (prefill, verify),
    since it hooks the decoder layers and the base model. After each forward,
    ``capture.features()`` is ``[b, T, L*H]`` for the ``T`` tokens just fed. The hooks are removed
    on exit.

    Raises:
        DraftConfigError: the decoder layers cannot be found, or an id is out of range.
    """
    target_name = type(target).__name__
    base, layers = find_target_decoder(target)
    num_layers = len(layers)
    ids = _validate_layer_ids(target_layer_ids, num_layers, target_name)
    capture = LayerCapture(ids, num_layers, target_name)

    def record_input(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        # HF's hidden_states[0] is layer 0's input, which is how id -1 is defined.
        hidden = args[0] if args else kwargs.get("hidden_states")
        if not isinstance(hidden, Tensor):
            raise TypeError(
                f"could not find the hidden states among decoder layer 0's inputs in {target_name}"
            )
        capture._captured[-1] = hidden

    def make_output_recorder(layer_id: int) -> Any:
        def record_output(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            capture._captured[layer_id] = _layer_output(output)

        return record_output

    def record_final(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        final_hidden = getattr(output, "last_hidden_state", None)
        if final_hidden is None and isinstance(output, tuple | list) and output:
            final_hidden = output[0]
        if not isinstance(final_hidden, Tensor):
            raise TypeError(f"{target_name}'s base model returned no last_hidden_state tensor")
        capture._final_hidden = final_hidden

    handles: list[RemovableHandle] = []
    try:
        if -1 in ids:
            handles.append(layers[0].register_forward_pre_hook(record_input, with_kwargs=True))
        # id n - 1 is the final-norm output, which the base model returns anyway.
        for layer_id in sorted({i for i in ids if 0 <= i < num_layers - 1}):
            handles.append(layers[layer_id].register_forward_hook(make_output_recorder(layer_id)))
        handles.append(base.register_forward_hook(record_final))
        yield capture
    finally:
        for handle in handles:
            handle.remove()


def capture_target_features(
    target: nn.Module,
    input_ids: Tensor,
    target_layer_ids: Sequence[int],
    attention_mask: Tensor | None = None,
    position_ids: Tensor | None = None,
) -> TargetFeatures:
    """Run the target's base model once, without grad, and return its features and final hidden states.

    Args:
        target: an HF causal LM (``PreTrainedModel``), e.g. ``Qwen3ForCausalLM``; its ``lm_head`` is
            not run. Put it in eval mode first if it has dropout.
        input_ids: ``[b, S]`` token ids.
        target_layer_ids: ids in ``[-1, n - 1]`` (see the module docstring); repeats are allowed.
        attention_mask, position_ids: passed through to the base model (e.g. ``position_ids`` that
            restart per packed document).

    Raises:
        DraftConfigError: the decoder layers cannot be found, or an id is out of range.
    """
    base, _ = find_target_decoder(target)
    with capture_layer_outputs(target, target_layer_ids) as capture:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq_len], got {tuple(input_ids.shape)}")
        with torch.no_grad():
            base(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=False,
                output_hidden_states=False,
            )
        features = capture.features()
        final_hidden = capture.final_hidden()
    return TargetFeatures(features=features, final_hidden=final_hidden)
