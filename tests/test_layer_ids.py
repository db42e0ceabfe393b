"""build_target_layer_ids: golden values that published drafts depend on, and its invariants."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dspark_core import build_target_layer_ids


@pytest.mark.parametrize(
    ("n", "f", "expected"),
    [
        (28, 5, [1, 8, 14, 20, 27]),
        (28, 1, [27]),
        (36, 5, [1, 10, 18, 26, 35]),
        (2, 7, [1]),
        (36, 3, [1, 18, 35]),
        (4, 3, [1, 2, 3]),
    ],
)
def test_golden_values(n, f, expected):
    assert build_target_layer_ids(n, f) == expected


@given(n=st.integers(2, 200), f=st.integers(1, 300))
def test_invariants(n, f):
    ids = build_target_layer_ids(n, f)
    assert all(1 <= i <= n - 1 for i in ids)
    assert all(a < b for a, b in itertools.pairwise(ids))
    assert 1 <= len(ids) <= min(f, n - 1)
    assert ids[-1] == n - 1
    if f >= 2:
        assert ids[0] == 1


@given(n=st.integers(2, 200))
def test_clamped_count_covers_every_layer(n):
    assert build_target_layer_ids(n, n + 5) == list(range(1, n))


@pytest.mark.parametrize(("n", "f"), [(1, 1), (0, 3), (-4, 2), (10, 0), (10, -1)])
def test_out_of_range_is_value_error(n, f):
    with pytest.raises(ValueError):
        build_target_layer_ids(n, f)


@pytest.mark.parametrize(("n", "f"), [(True, 2), (28, False), (28.0, 5), ("28", 5), (28, None)])
def test_bools_and_non_integers_are_type_errors(n, f):
    with pytest.raises(TypeError):
        build_target_layer_ids(n, f)
