"""The frozen Qwen3 draft fixtures: drafts saved by the pre-backbone code, with a fixed input's outputs.

Not a test module. ``tests/test_qwen3_fixture.py`` loads them with the current code and asserts identical
keys and bit-identical outputs, so any change to the backbone that alters a checkpoint or a number fails.

Regenerate (only when a change of outputs is intended, and say so in the commit) with::

    python tests/qwen3_fixture.py

Each fixture folder holds the draft's ``config.json`` + ``model.safetensors`` (``save_pretrained``) and
``io.safetensors``: the inputs and the recorded outputs of :func:`record_outputs`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).parent))

from qwen3_draft_helpers import draft_options, random_batch, randomize_, target_config

from dspark_qwen3.config import build_draft_config
from dspark_qwen3.modeling import Qwen3DSparkModel

FIXTURES = Path(__file__).parent / "fixtures"
SEQ = 24

#: name -> (target config overrides, draft options). The first is the published layout (no bias,
#: default RoPE); the second covers projection biases, YaRN scaling and a one-layer rnn draft.
VARIANTS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "qwen3_draft_default": ({}, {}),
    "qwen3_draft_bias_yarn": (
        {
            "attention_bias": True,
            "rope_parameters": {
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 128,
            },
        },
        {"num_draft_layers": 1, "markov_head_type": "rnn", "confidence_head_with_markov": False},
    ),
}


def build_variant(name: str, seed: int = 0) -> Qwen3DSparkModel:
    """The fixture's draft rebuilt from its seed (O(1) random weights, eval mode)."""
    target_overrides, options = VARIANTS[name]
    config = build_draft_config(target_config(**target_overrides), **draft_options(**options))
    config._attn_implementation = "sdpa"
    model = Qwen3DSparkModel(config)
    randomize_(model, seed)
    return model.eval()


def fixture_inputs() -> dict[str, Tensor]:
    """Two packed rows (documents of 10 and 14 tokens) with fixed anchors; the second row keeps 3."""
    batch = random_batch(2, SEQ, seed=3)
    return {
        "input_ids": batch.input_ids,
        "target_features": batch.target_features,
        "target_final_hidden": batch.target_final_hidden,
        "loss_mask": batch.loss_mask,
        "document_ids": torch.tensor([[0] * 10 + [1] * 14, [0] * SEQ]),
        "anchors": torch.tensor([[0, 4, 11, 17], [2, 8, 15, 0]]),
        "keep": torch.tensor([[True, True, True, True], [True, True, True, False]]),
    }


@torch.no_grad()
def record_outputs(model: Qwen3DSparkModel, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
    """The training forward's outputs, and a two-round decode (cached context, greedy propose)."""
    out = model(
        inputs["input_ids"],
        inputs["target_features"],
        inputs["target_final_hidden"],
        inputs["loss_mask"],
        document_ids=inputs["document_ids"],
        anchors=inputs["anchors"],
        keep=inputs["keep"],
        return_logits=True,
    )
    assert out.logits is not None and out.markov_latent is not None and out.confidence_logits is not None
    ids, features = inputs["input_ids"], inputs["target_features"]
    cache = model.new_cache()
    first = model.block_hidden(ids[:, 9], features[:, :9], cache)
    proposal = model.propose(ids[:, 16], features[:, 9:16], cache)
    assert proposal.confidence is not None
    return {
        "train.hidden": out.hidden,
        "train.logits": out.logits,
        "train.markov_latent": out.markov_latent,
        "train.confidence": out.confidence_logits,
        "decode.block_hidden": first,
        "decode.tokens": proposal.tokens,
        "decode.logits": proposal.logits,
        "decode.confidence": proposal.confidence,
    }


def write_fixtures() -> None:
    from safetensors.torch import save_file

    for name in VARIANTS:
        folder = FIXTURES / name
        model = build_variant(name)
        model.save_pretrained(folder, safe_serialization=True)
        inputs = fixture_inputs()
        outputs = record_outputs(model, inputs)
        tensors = {f"input.{k}": v.contiguous() for k, v in inputs.items()}
        tensors.update({f"output.{k}": v.contiguous() for k, v in outputs.items()})
        save_file(tensors, str(folder / "io.safetensors"))
        print(f"wrote {folder}")


if __name__ == "__main__":
    write_fixtures()
