"""Target feature capture with forward hooks (features.py) against HF ``output_hidden_states``."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn
from transformers import Qwen3Config, Qwen3ForCausalLM

from dspark_core.errors import DraftConfigError
from dspark_core.modeling.features import TargetFeatures, capture_target_features

HIDDEN, LAYERS, VOCAB = 32, 4, 64
IDS = [-1, 0, 2, 3]


def tiny_target(seed: int = 0) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen3Config(
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        vocab_size=VOCAB,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    return Qwen3ForCausalLM(config).eval()


def input_ids(batch: int = 2, seq: int = 11) -> Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(3))


def hook_counts(model: nn.Module) -> dict[str, int]:
    counts: dict[str, int] = {}
    for name, module in model.named_modules():
        for attr in (
            "_forward_hooks",
            "_forward_pre_hooks",
            "_forward_hooks_with_kwargs",
            "_forward_pre_hooks_with_kwargs",
            "_backward_hooks",
            "_backward_pre_hooks",
        ):
            hooks: Any = getattr(module, attr, {})
            if hooks:
                counts[f"{name}.{attr}"] = len(hooks)
    return counts


def split(features: Tensor) -> list[Tensor]:
    return list(features.split(HIDDEN, dim=-1))


def test_features_equal_hf_hidden_states_at_id_plus_one() -> None:
    target, ids = tiny_target(), input_ids()
    captured = capture_target_features(target, ids, IDS)
    assert isinstance(captured, TargetFeatures)
    assert captured.features.shape == (2, 11, len(IDS) * HIDDEN)
    assert captured.final_hidden.shape == (2, 11, HIDDEN)

    with torch.no_grad():
        reference = target(ids, output_hidden_states=True)
    assert len(reference.hidden_states) == LAYERS + 1
    for layer_id, chunk in zip(IDS, split(captured.features), strict=True):
        torch.testing.assert_close(chunk, reference.hidden_states[layer_id + 1], rtol=0, atol=0)
    torch.testing.assert_close(target.lm_head(captured.final_hidden), reference.logits)
    assert not captured.features.requires_grad


def test_id_minus_one_is_the_embedding_and_last_id_is_post_final_norm() -> None:
    target, ids = tiny_target(), input_ids()
    raw_last: list[Tensor] = []
    handle = target.model.layers[LAYERS - 1].register_forward_hook(lambda m, a, out: raw_last.append(out))
    try:
        captured = capture_target_features(target, ids, [-1, LAYERS - 1])
    finally:
        handle.remove()
    embedding, last = split(captured.features)
    torch.testing.assert_close(embedding, target.model.embed_tokens(ids), rtol=0, atol=0)
    # id n-1 follows HF's hidden_states[n], which is the final-norm output, not the last layer's raw output.
    torch.testing.assert_close(last, captured.final_hidden, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(last, target.model.norm(raw_last[0]), rtol=0, atol=0)
    assert not torch.allclose(last, raw_last[0])


def test_order_follows_target_layer_ids() -> None:
    target, ids = tiny_target(), input_ids()
    forward = split(capture_target_features(target, ids, [0, 2]).features)
    backward = split(capture_target_features(target, ids, [2, 0]).features)
    torch.testing.assert_close(forward[0], backward[1], rtol=0, atol=0)
    torch.testing.assert_close(forward[1], backward[0], rtol=0, atol=0)
    assert not torch.allclose(forward[0], forward[1])


def test_attention_mask_and_position_ids_are_passed_through() -> None:
    target, ids = tiny_target(), input_ids()
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    positions = torch.cat([torch.arange(5), torch.arange(6)]).unsqueeze(0).expand(2, -1)
    captured = capture_target_features(target, ids, IDS, attention_mask=mask, position_ids=positions)
    with torch.no_grad():
        reference = target(ids, attention_mask=mask, position_ids=positions, output_hidden_states=True)
        plain = target(ids, output_hidden_states=True)
    for layer_id, chunk in zip(IDS, split(captured.features), strict=True):
        torch.testing.assert_close(chunk, reference.hidden_states[layer_id + 1], rtol=0, atol=0)
    assert not torch.allclose(captured.final_hidden, plain.hidden_states[-1])


def test_accepts_the_base_model_directly() -> None:
    target, ids = tiny_target(), input_ids()
    from_lm = capture_target_features(target, ids, IDS)
    from_base = capture_target_features(target.model, ids, IDS)
    torch.testing.assert_close(from_lm.features, from_base.features, rtol=0, atol=0)


def test_no_hooks_are_left_behind() -> None:
    target = tiny_target()
    assert hook_counts(target) == {}
    capture_target_features(target, input_ids(), IDS)
    assert hook_counts(target) == {}


def test_hooks_are_removed_when_the_forward_raises() -> None:
    target = tiny_target()
    bad_ids = torch.full((1, 5), VOCAB + 7)
    with pytest.raises(IndexError):
        capture_target_features(target, bad_ids, IDS)
    assert hook_counts(target) == {}


def test_hooks_are_removed_when_a_layer_raises() -> None:
    target = tiny_target()

    def explode(module: nn.Module, args: Any, output: Any) -> None:
        raise RuntimeError("boom")

    handle = target.model.layers[3].register_forward_hook(explode)
    before = hook_counts(target)
    with pytest.raises(RuntimeError, match="boom"):
        capture_target_features(target, input_ids(), IDS)
    assert hook_counts(target) == before
    handle.remove()
    assert hook_counts(target) == {}


@pytest.mark.parametrize("bad", [[4], [-2], [0, 9], []])
def test_out_of_range_layer_ids_are_config_errors(bad: list[int]) -> None:
    with pytest.raises(DraftConfigError, match="target_layer_ids"):
        capture_target_features(tiny_target(), input_ids(), bad)


def test_target_without_decoder_layers_names_its_class() -> None:
    class NotACausalLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Linear(4, 4)

    with pytest.raises(DraftConfigError, match="NotACausalLM"):
        capture_target_features(NotACausalLM(), input_ids(), [0])
