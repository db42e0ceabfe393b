"""The confidence head (confidence.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dspark_core.errors import DraftConfigError
from dspark_core.modeling.confidence import ConfidenceHead

H, R = 16, 8


def make_head(with_markov: bool, rank: int = R) -> ConfidenceHead:
    torch.manual_seed(0)
    return ConfidenceHead(H, rank, with_markov=with_markov)


@pytest.mark.parametrize(("with_markov", "width"), [(True, H + R), (False, H)])
def test_state_dict_keys_and_shapes(with_markov: bool, width: int) -> None:
    holder = nn.Module()
    holder.confidence_head = make_head(with_markov)
    got = {key: tuple(value.shape) for key, value in holder.state_dict().items()}
    assert got == {"confidence_head.proj.weight": (1, width), "confidence_head.proj.bias": (1,)}


def test_with_markov_and_rank_zero_is_a_config_error() -> None:
    with pytest.raises(DraftConfigError) as info:
        ConfidenceHead(H, 0, with_markov=True)
    message = str(info.value)
    assert "confidence_head_with_markov" in message
    assert "markov_rank" in message
    assert "confidence_head_with_markov=False" in message


def test_without_markov_rank_zero_is_fine() -> None:
    assert ConfidenceHead(H, 0, with_markov=False).proj.in_features == H


def test_forward_with_markov_concatenates_h_then_features() -> None:
    head = make_head(True)
    hidden, feats = torch.randn(2, 3, 5, H), torch.randn(2, 3, 5, R)
    out = head(hidden, feats)
    weight, bias = head.proj.weight[0], head.proj.bias[0]
    expected = hidden @ weight[:H] + feats @ weight[H:] + bias
    assert out.shape == (2, 3, 5)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected)


def test_forward_without_markov() -> None:
    head = make_head(False)
    hidden = torch.randn(4, H)
    torch.testing.assert_close(head(hidden), hidden @ head.proj.weight[0] + head.proj.bias[0])


def test_bf16_params_and_inputs_give_fp32_logits_computed_in_fp32() -> None:
    head = make_head(True).to(torch.bfloat16)
    hidden = torch.randn(64, H).to(torch.bfloat16)
    feats = torch.randn(64, R).to(torch.bfloat16)
    out = head(hidden, feats)
    assert out.dtype == torch.float32
    x = torch.cat([hidden.double(), feats.double()], dim=-1)
    expected = x @ head.proj.weight.double()[0] + head.proj.bias.double()[0]
    # fp32 accumulation of bf16 values is far tighter than a bf16 result (~1e-2 relative) could be.
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-6)


def test_autocast_does_not_lower_the_precision() -> None:
    head = make_head(True)
    hidden, feats = torch.randn(64, H), torch.randn(64, R)
    reference = head(hidden, feats)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(hidden, feats)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, reference, rtol=1e-6, atol=1e-6)


def test_markov_features_required_iff_with_markov() -> None:
    hidden, feats = torch.randn(3, H), torch.randn(3, R)
    with pytest.raises(ValueError, match="markov_features"):
        make_head(True)(hidden)
    with pytest.raises(ValueError, match="markov_features"):
        make_head(False)(hidden, feats)
    with pytest.raises(ValueError, match="markov_features"):
        make_head(True)(hidden, feats[:2])
    with pytest.raises(ValueError, match="hidden"):
        make_head(False)(torch.randn(3, H + 1))
