"""The Gemma pieces of the draft layer compute exactly what the target's own modules compute.

Compared with transformers' Gemma 4 modules in bfloat16 (where rounding order shows): the scaled
word embedding against the target's input embeddings, Gemma RMSNorm (with and without a scale)
against ``Gemma4RMSNorm``, and the draft's rope against the target's full-attention rope.
"""

from __future__ import annotations

import pytest
import torch
from transformers import Gemma4ForConditionalGeneration
from transformers.models.gemma4.modeling_gemma4 import Gemma4RMSNorm as TargetRMSNorm
from transformers.models.gemma4.modeling_gemma4 import Gemma4TextRotaryEmbedding

from dspark_core.targets.builders import TinyTargetShape
from dspark_gemma4.modeling import Gemma4DSparkModel, Gemma4RMSNorm
from dspark_gemma4.testing import tiny_target_config


@pytest.fixture(scope="module")
def pair() -> tuple[Gemma4ForConditionalGeneration, Gemma4DSparkModel]:
    torch.manual_seed(0)
    target = Gemma4ForConditionalGeneration(tiny_target_config(TinyTargetShape(vocab_size=300))).eval()
    draft = Gemma4DSparkModel.from_target(
        target, mask_token_id=4, num_draft_layers=1, block_size=4, target_layer_ids=[0, 2]
    )
    return target.to(torch.bfloat16), draft.to(torch.bfloat16).eval()


def test_scaled_embedding_equals_the_targets(
    pair: tuple[Gemma4ForConditionalGeneration, Gemma4DSparkModel],
) -> None:
    target, draft = pair
    ids = torch.arange(300).reshape(3, 100)
    mine, theirs = draft.embed_tokens(ids), target.get_input_embeddings()(ids)
    assert mine.dtype == torch.bfloat16 and torch.equal(mine, theirs)
    assert not torch.equal(mine, draft.embed_tokens.weight[ids])  # the scale is applied


@pytest.mark.parametrize("with_scale", [True, False])
def test_rms_norm_equals_gemma4_rms_norm(with_scale: bool) -> None:
    mine, theirs = (
        Gemma4RMSNorm(64, 1e-6, with_scale=with_scale),
        TargetRMSNorm(64, 1e-6, with_scale=with_scale),
    )
    if with_scale:
        with torch.no_grad():
            mine.weight.uniform_(0.5, 1.5)
            theirs.weight.copy_(mine.weight)
    x = (torch.randn(4, 7, 64) * 3).to(torch.bfloat16)
    assert torch.equal(mine.to(torch.bfloat16)(x), theirs.to(torch.bfloat16)(x))
    assert dict(mine.named_parameters()).keys() == dict(theirs.named_parameters()).keys()


def test_rope_equals_the_targets_full_attention_rope(
    pair: tuple[Gemma4ForConditionalGeneration, Gemma4DSparkModel],
) -> None:
    target, draft = pair
    rotary = Gemma4TextRotaryEmbedding(target.config.text_config)
    positions = torch.arange(0, 4000, 37).unsqueeze(0)
    x = torch.zeros(1, 1, dtype=torch.float32)
    cos, sin = rotary(x, positions, "full_attention")
    my_cos, my_sin = draft.rotary_emb(positions, torch.float32)
    assert torch.equal(my_cos, cos) and torch.equal(my_sin, sin)
    sliding_head_dim = target.config.text_config.per_layer_config[0].head_dim
    assert my_cos.shape[-1] == 2 * sliding_head_dim  # the tiny target's global_head_dim
