"""The family guard: a saved draft of one family is refused, in one line naming both families, when it
is loaded for a target (or as the class) of another family; ``allow_family_mismatch`` /
``--allow-family-mismatch`` loads it anyway. The other family is a Llama family declared here, as
``examples/dspark-llama`` declares it, with a Llama target that shares the Qwen3 target's embeddings
and head, so that only the family differs."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from dspark_core.cli import main
from dspark_core.errors import DraftFamilyError
from dspark_core.loading import load_draft
from dspark_core.modeling.backbone import StandardDSparkModel
from dspark_core.modeling.draft_config import STANDARD_BACKBONE_FIELDS, DraftFamily
from dspark_core.testing import isolated_registry
from dspark_qwen3.modeling import Qwen3DSparkModel
from dspark_qwen3.testing import TINY_MASK_TOKEN, make_tiny_target

LLAMA_FAMILY = DraftFamily(
    distribution="test-llama",
    config_class=LlamaConfig,
    target_model_types=("llama",),
    architecture="LlamaDSparkModel",
    fields=(*STANDARD_BACKBONE_FIELDS, "mlp_bias"),
)


class LlamaDSparkModel(StandardDSparkModel):
    family = LLAMA_FAMILY
    qk_norm = False


@pytest.fixture(autouse=True)
def llama_registered() -> Iterator[None]:
    with isolated_registry() as registry:
        registry.register_spec("LlamaForCausalLM", LlamaDSparkModel)
        yield


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny Qwen3 target, a Llama target with the same shape, embeddings and head, and a Qwen3 draft."""
    root = tmp_path_factory.mktemp("families")
    qwen3_dir = make_tiny_target(root / "qwen3", hidden_size=32, num_layers=2)
    qwen3 = AutoModelForCausalLM.from_pretrained(qwen3_dir)
    text = qwen3.config
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=text.vocab_size,
            hidden_size=text.hidden_size,
            intermediate_size=text.intermediate_size,
            num_hidden_layers=text.num_hidden_layers,
            num_attention_heads=text.num_attention_heads,
            num_key_value_heads=text.num_key_value_heads,
            head_dim=text.head_dim,
            max_position_embeddings=text.max_position_embeddings,
            tie_word_embeddings=False,
            pad_token_id=text.pad_token_id,
            eos_token_id=text.eos_token_id,
            bos_token_id=text.bos_token_id,
        )
    )
    with torch.no_grad():
        llama.get_input_embeddings().weight.copy_(qwen3.get_input_embeddings().weight)
        llama.get_output_embeddings().weight.copy_(qwen3.get_output_embeddings().weight)
    llama_dir = root / "llama"
    llama.save_pretrained(llama_dir)
    for name in qwen3_dir.iterdir():
        if "token" in name.name or name.name == "chat_template.jinja":
            shutil.copy(name, llama_dir / name.name)
    mask = AutoTokenizer.from_pretrained(qwen3_dir).convert_tokens_to_ids(TINY_MASK_TOKEN)
    draft = Qwen3DSparkModel.from_target(
        qwen3, num_draft_layers=1, block_size=4, mask_token_id=mask, markov_rank=8, target_layer_ids=[0]
    )
    draft.save_pretrained(root / "qwen3-draft")
    return {"qwen3": qwen3_dir, "llama": llama_dir, "draft": root / "qwen3-draft"}


def test_load_draft_refuses_a_draft_of_another_family_in_one_line(models: dict[str, Path]) -> None:
    llama = AutoModelForCausalLM.from_pretrained(models["llama"])
    with pytest.raises(DraftFamilyError) as caught:
        load_draft(models["draft"], llama)
    message = str(caught.value)
    assert "\n" not in message
    assert "is a Qwen3DSparkModel (model_type 'qwen3') draft" in message
    assert "the target LlamaForCausalLM resolves to LlamaDSparkModel (model_type 'llama')" in message
    assert "allow_family_mismatch=True" in message and "--allow-family-mismatch" in message
    # The override loads it as the Llama family's class, as it would have silently before.
    draft = load_draft(models["draft"], llama, allow_family_mismatch=True)
    assert type(draft) is LlamaDSparkModel
    # Its own family's target loads it without complaint.
    qwen3 = AutoModelForCausalLM.from_pretrained(models["qwen3"])
    assert type(load_draft(models["draft"], qwen3)) is Qwen3DSparkModel


def test_from_pretrained_compares_the_saved_family_with_the_class_and_the_target(
    models: dict[str, Path], tmp_path: Path
) -> None:
    with pytest.raises(
        DraftFamilyError, match=r"it is being loaded as LlamaDSparkModel \(model_type 'llama'\)"
    ):
        LlamaDSparkModel.from_pretrained(models["draft"])
    llama = AutoModelForCausalLM.from_pretrained(models["llama"])
    with pytest.raises(
        DraftFamilyError, match="Qwen3DSparkModel drafts for targets of model_type qwen3 or qwen3_moe"
    ):
        Qwen3DSparkModel.from_pretrained(models["draft"], target=llama)
    # A config naming no class and no model_type has nothing to compare: it loads.
    bare = tmp_path / "bare"
    shutil.copytree(models["draft"], bare)
    config = json.loads((bare / "config.json").read_text())
    del config["architectures"]
    (bare / "config.json").write_text(json.dumps(config))
    assert isinstance(Qwen3DSparkModel.from_pretrained(bare), Qwen3DSparkModel)


def test_generate_refuses_in_one_line_and_the_flag_overrides(
    models: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["generate", "--target", str(models["llama"]), "--draft", str(models["draft"]), "--prompt", "Hi"]
    args += ["--max-new-tokens", "4", "--json"]
    assert main(args) == 1
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if "error" in line]  # the rest is the weights' progress bar
    assert line.startswith("dspark generate: error: draft ") and err.endswith(line + "\n")
    assert "Qwen3DSparkModel" in line and "LlamaDSparkModel" in line
    assert main([*args, "--allow-family-mismatch"]) == 0
    result = json.loads(capsys.readouterr().out)["results"][0]
    assert len(result["token_ids"]) >= 1


def test_check_draft_with_a_target_guards_the_family(
    models: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    draft = str(models["draft"])
    assert main(["check-draft", draft, "--target", str(models["llama"])]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the target LlamaForCausalLM resolves to LlamaDSparkModel" in err
    assert main(["check-draft", draft, "--target", str(models["llama"]), "--allow-family-mismatch"]) == 0
    capsys.readouterr()
    assert main(["check-draft", draft, "--target", str(models["qwen3"]), "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["target"] == str(models["qwen3"])
    assert payload["serving"]["vllm"]["command"].startswith(f"vllm serve {models['qwen3']} ")
