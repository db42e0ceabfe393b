"""Drafts saved by the pre-backbone Qwen3 code load with identical keys, configs and outputs.

The fixtures (``tests/fixtures/qwen3_draft_*``, written by ``tests/qwen3_fixture.py`` before the
family's layers moved into core's standard backbone) pin checkpoints and numbers: every comparison is
exact (``torch.equal``), so any change to the backbone's arithmetic, key names or config fields fails.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from qwen3_fixture import FIXTURES, VARIANTS, build_variant, record_outputs
from safetensors import safe_open
from safetensors.torch import load_file

from dspark_qwen3.modeling import Qwen3DSparkModel


def fixture(name: str) -> tuple[Path, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    folder = FIXTURES / name
    tensors = load_file(str(folder / "io.safetensors"))
    inputs = {k.removeprefix("input."): v for k, v in tensors.items() if k.startswith("input.")}
    outputs = {k.removeprefix("output."): v for k, v in tensors.items() if k.startswith("output.")}
    return folder, inputs, outputs


def load(folder: Path) -> Qwen3DSparkModel:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # loading a saved draft must not warn (nor re-warn about layers)
        model = Qwen3DSparkModel.from_pretrained(folder, attn_implementation="sdpa")
    return model.eval()


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_saved_draft_loads_with_identical_keys_and_shapes(name: str) -> None:
    folder, _, _ = fixture(name)
    with safe_open(str(folder / "model.safetensors"), "pt") as handle:
        saved = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
    model = load(folder)
    current = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    assert current == saved


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_the_current_code_saves_the_same_files(name: str, tmp_path: Path) -> None:
    """Rebuilt from its seed and saved, the draft gives the fixture's config.json and weights, byte
    for byte (only the transformers version stamp may differ)."""
    folder, _, _ = fixture(name)
    build_variant(name).save_pretrained(tmp_path, safe_serialization=True)

    def config(path: Path) -> dict[str, object]:
        values = json.loads((path / "config.json").read_text())
        values.pop("transformers_version")
        return values

    assert config(tmp_path) == config(folder)
    assert (tmp_path / "model.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_saved_draft_reproduces_its_recorded_outputs_exactly(name: str) -> None:
    folder, inputs, expected = fixture(name)
    outputs = record_outputs(load(folder), inputs)
    assert outputs.keys() == expected.keys()
    for key, value in expected.items():
        assert outputs[key].dtype == value.dtype and torch.equal(outputs[key], value), key


def test_the_exact_comparison_can_fail() -> None:
    """One changed weight (a norm scale nudged by one ulp-sized step) changes the recorded outputs."""
    folder, inputs, expected = fixture("qwen3_draft_default")
    model = load(folder)
    with torch.no_grad():
        weight = model.layers[0].self_attn.k_norm.weight
        weight[0] = torch.nextafter(weight[0], torch.tensor(2.0))
    outputs = record_outputs(model, inputs)
    assert not torch.equal(outputs["train.logits"], expected["train.logits"])
