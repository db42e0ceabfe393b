"""Which target layers a draft reads its context features from."""

from __future__ import annotations

import operator


def _as_int(name: str, value: object) -> int:
    # bool is an int subclass, but a True here is always a caller bug.
    if not isinstance(value, bool):
        try:
            return operator.index(value)  # type: ignore[arg-type]
        except TypeError:
            pass
    raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")


def build_target_layer_ids(num_target_layers: int, num_feature_layers: int) -> list[int]:
    """Spread ``num_feature_layers`` feature layers evenly over a target of ``num_target_layers``.

    The ids follow HF's ``output_hidden_states`` convention (id i is the output of decoder layer i)
    and are strictly increasing in ``[1, n-1]``. Published drafts were trained with exactly these
    values, so the rounding is part of the checkpoint format: ``(28, 5) -> [1, 8, 14, 20, 27]``.
    """
    n = _as_int("num_target_layers", num_target_layers)
    f = _as_int("num_feature_layers", num_feature_layers)
    if n < 2:
        raise ValueError(f"num_target_layers must be at least 2, got {n}")
    if f < 1:
        raise ValueError(f"num_feature_layers must be at least 1, got {f}")
    f = min(f, n - 1)
    if f == 1:
        return [n - 1]
    step = (n - 2) / (f - 1)
    return sorted({round(1 + i * step) for i in range(f)})
