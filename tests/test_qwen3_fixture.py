"""Drafts saved by the pre-backbone Qwen3 code load with identical keys, configs and outputs.

The fixtures (``tests/fixtures/qwen3_draft_*``, written by ``tests/qwen3_fixture.py`` before the
family's layers moved into core's standard backbone) pin checkpoints and numbers. Keys, configs, files
and token outputs compare exactly. Float outputs compare within ``FLOAT_TOLERANCE``: the same weights
and inputs give last-bit differences across CPUs, since torch picks AVX2 or AVX-512 kernels that sum in
another order (1.3e-6 at most, measured on two machines), while any change to the backbone's arithmetic
moves them by orders of magnitude more (``test_a_changed_weight_fails_the_comparison``).
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

#: Absolute and relative bound on float outputs: about 10x the cross-CPU rounding measured.
FLOAT_TOLERANCE = 1e-5


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
        assert matches_recorded(outputs[key], value), key


def matches_recorded(output: torch.Tensor, recorded: torch.Tensor) -> bool:
    """Same dtype and shape; integers equal, floats within ``FLOAT_TOLERANCE``."""
    if output.dtype != recorded.dtype or output.shape != recorded.shape:
        return False
    if not recorded.is_floating_point():
        return torch.equal(output, recorded)
    return torch.allclose(output, recorded, rtol=FLOAT_TOLERANCE, atol=FLOAT_TOLERANCE)


def test_a_changed_weight_fails_the_comparison() -> None:
    """One norm scale changed by 1% moves the recorded outputs well past the tolerance."""
    folder, inputs, expected = fixture("qwen3_draft_default")
    model = load(folder)
    with torch.no_grad():
        model.layers[0].self_attn.k_norm.weight[0] *= 1.01
    outputs = record_outputs(model, inputs)
    assert not matches_recorded(outputs["train.logits"], expected["train.logits"])
