"""``Qwen3DSparkModel`` and its config: the method's state-dict table, config building from Qwen3 and
Qwen3-MoE targets, every bad input of the issue, checkpoints, bf16 and the registry spec."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from qwen3_draft_helpers import (
    EOS,
    HEAD_DIM,
    HEAD_TYPES,
    HIDDEN,
    KV_HEADS,
    LAYER_IDS,
    MASK,
    PAD,
    TARGET_LAYERS,
    VOCAB,
    draft_options,
    make_draft,
    random_batch,
    randomize_,
    target_config,
)
from safetensors import safe_open
from transformers import LlamaConfig, Qwen3Config, Qwen3ForCausalLM, Qwen3MoeForCausalLM

from dspark_core import resolve_dspark_draft_spec
from dspark_core.errors import DraftConfigError
from dspark_core.layer_ids import build_target_layer_ids
from dspark_core.modeling.draft_config import TargetLayerWarning
from dspark_core.modeling.loss import DSparkObjective
from dspark_core.serving import check_draft, read_draft_dir
from dspark_qwen3.config import build_draft_config
from dspark_qwen3.modeling import Qwen3DSparkModel

ANCHORS = torch.tensor([[0, 4, 9, 13], [2, 3, 10, 0]])
KEEP = torch.tensor([[True, True, True, True], [True, True, True, False]])


def build(**overrides: Any) -> Qwen3Config:
    return build_draft_config(target_config(), **draft_options(**overrides))


# ---------------------------------------------------------------------------------------------------
# State-dict keys and shapes (method reference, section 2)
# ---------------------------------------------------------------------------------------------------


def expected_state_dict_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    """The method doc's key/shape table, written out from the config."""
    h, v, d = config.hidden_size, config.vocab_size, config.head_dim
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    inter = config.intermediate_size
    num_features = len(config.target_layer_ids)
    r = config.markov_rank
    shapes: dict[str, tuple[int, ...]] = {
        "embed_tokens.weight": (v, h),
        "norm.weight": (h,),
        "fc.weight": (h, num_features * h),
        "hidden_norm.weight": (h,),
        "lm_head.weight": (v, h),
    }
    for i in range(config.num_hidden_layers):
        p = f"layers.{i}."
        attn = {
            "q_proj": (heads * d, h),
            "k_proj": (kv * d, h),
            "v_proj": (kv * d, h),
            "o_proj": (h, heads * d),
        }
        for name, shape in attn.items():
            shapes[f"{p}self_attn.{name}.weight"] = shape
            if config.attention_bias:
                shapes[f"{p}self_attn.{name}.bias"] = (shape[0],)
        shapes[f"{p}self_attn.q_norm.weight"] = (d,)
        shapes[f"{p}self_attn.k_norm.weight"] = (d,)
        shapes[f"{p}mlp.gate_proj.weight"] = (inter, h)
        shapes[f"{p}mlp.up_proj.weight"] = (inter, h)
        shapes[f"{p}mlp.down_proj.weight"] = (h, inter)
        shapes[f"{p}input_layernorm.weight"] = (h,)
        shapes[f"{p}post_attention_layernorm.weight"] = (h,)
    if r > 0:
        shapes["markov_head.markov_w1.weight"] = (v, r)
        shapes["markov_head.markov_w2.weight"] = (v, r)
        if config.markov_head_type == "gated":
            shapes["markov_head.gate_proj.weight"] = (r, h + r)
            shapes["markov_head.gate_proj.bias"] = (r,)
        if config.markov_head_type == "rnn":
            shapes["markov_head.joint_proj.weight"] = (3 * r, 2 * r + h)
            shapes["markov_head.joint_proj.bias"] = (3 * r,)
    if config.enable_confidence_head:
        width = h + (r if config.confidence_head_with_markov else 0)
        shapes["confidence_head.proj.weight"] = (1, width)
        shapes["confidence_head.proj.bias"] = (1,)
    return shapes


HEAD_VARIANTS = [
    pytest.param(rank, head, conf, with_markov, id=f"r{rank}-{head}-conf{int(conf)}-mk{int(with_markov)}")
    for rank, head in [(8, h) for h in HEAD_TYPES] + [(0, None)]
    for conf, with_markov in [(False, False), (True, False), (True, True)]
    if not (rank == 0 and with_markov)
]


@pytest.mark.parametrize(("rank", "head", "confidence", "with_markov"), HEAD_VARIANTS)
def test_state_dict_keys_and_shapes_match_the_method_table(
    rank: int, head: str | None, confidence: bool, with_markov: bool
) -> None:
    config = build(
        markov_rank=rank,
        markov_head_type=head or "vanilla",
        enable_confidence_head=confidence,
        confidence_head_with_markov=with_markov,
    )
    # The config's own layout: head type only with a Markov head, the Markov flag only with the head.
    assert hasattr(config, "markov_head_type") == (rank > 0)
    assert hasattr(config, "confidence_head_with_markov") == confidence
    model = Qwen3DSparkModel(config)
    got = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    assert got == expected_state_dict_shapes(config)
    assert not any("rotary" in key or "inv_freq" in key for key in got)  # rotary buffers are not saved


def test_attention_bias_adds_projection_biases() -> None:
    config = build_draft_config(target_config(attention_bias=True), **draft_options())
    got = {key: tuple(value.shape) for key, value in Qwen3DSparkModel(config).state_dict().items()}
    assert got == expected_state_dict_shapes(config)
    assert got["layers.0.self_attn.k_proj.bias"] == (KV_HEADS * HEAD_DIM,)


def test_state_dict_table_uses_a_head_dim_that_is_not_hidden_over_heads() -> None:
    config = build_draft_config(target_config(head_dim=16), **draft_options())
    got = {key: tuple(value.shape) for key, value in Qwen3DSparkModel(config).state_dict().items()}
    assert got == expected_state_dict_shapes(config)
    assert got["layers.0.self_attn.q_proj.weight"] == (4 * 16, HIDDEN)


# ---------------------------------------------------------------------------------------------------
# Config building
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("moe", [False, True], ids=["qwen3", "qwen3_moe"])
def test_config_from_target_keeps_the_backbone_and_sets_the_dspark_fields(moe: bool) -> None:
    target = target_config(
        moe=moe, rope_parameters={"rope_type": "default", "rope_theta": 5e5}, rms_norm_eps=1e-5
    )
    config = build_draft_config(target, **draft_options(num_draft_layers=3, block_size=5, num_anchors=6))
    assert isinstance(config, Qwen3Config)
    assert config.model_type == "qwen3"
    assert config.architectures == ["Qwen3DSparkModel"]
    for name in ("vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim"):
        assert getattr(config, name) == getattr(target, name), name
    assert config.intermediate_size == target.intermediate_size
    assert config.rope_parameters["rope_theta"] == 5e5
    assert config.rms_norm_eps == 1e-5
    assert config.attention_bias is False
    assert config.num_hidden_layers == 3
    assert config.num_target_layers == TARGET_LAYERS
    assert config.layer_types == ["full_attention"] * 3
    assert config.tie_word_embeddings is False
    assert (config.block_size, config.mask_token_id, config.num_anchors) == (5, MASK, 6)
    assert config.target_layer_ids == LAYER_IDS
    assert (config.markov_rank, config.markov_head_type) == (8, "vanilla")
    assert config.enable_confidence_head is True and config.confidence_head_with_markov is True
    # The target's own config is not modified.
    assert target.num_hidden_layers == TARGET_LAYERS and not hasattr(target, "block_size")


def test_moe_target_gives_a_dense_draft() -> None:
    target = target_config(moe=True, intermediate_size=48)
    config = build_draft_config(target, **draft_options())
    assert config.model_type == "qwen3" and type(config) is Qwen3Config
    for moe_field in ("num_experts", "num_experts_per_tok", "moe_intermediate_size"):
        assert not hasattr(config, moe_field), moe_field
    keys = Qwen3DSparkModel(config).state_dict()
    assert not any("expert" in key or key.endswith("mlp.gate.weight") for key in keys)
    assert tuple(keys["layers.0.mlp.up_proj.weight"].shape) == (48, HIDDEN)


def test_default_target_layer_ids_come_from_build_target_layer_ids() -> None:
    target = target_config(num_hidden_layers=12)
    options = draft_options(num_draft_layers=3)
    del options["target_layer_ids"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TargetLayerWarning)
        config = build_draft_config(target, **options)
        assert config.target_layer_ids == build_target_layer_ids(12, 3)
        wider = build_draft_config(target, **options, num_feature_layers=5)
    assert wider.target_layer_ids == build_target_layer_ids(12, 5)
    assert Qwen3DSparkModel(wider).fc.weight.shape == (HIDDEN, 5 * HIDDEN)


def test_config_round_trips_through_json(tmp_path: Path) -> None:
    config = build(markov_head_type="rnn")
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["architectures"] == ["Qwen3DSparkModel"] and saved["model_type"] == "qwen3"
    assert saved["target_layer_ids"] == LAYER_IDS and saved["markov_head_type"] == "rnn"
    loaded = Qwen3Config.from_pretrained(tmp_path)
    assert Qwen3DSparkModel(loaded).state_dict().keys() == Qwen3DSparkModel(config).state_dict().keys()


#: What DeepSpec's Qwen3DSparkModel asserts present in config.json (deepspec/modeling/dspark/qwen3/
#: modeling.py:207-224 at afdfa7c9), the conditional two only with a Markov head / a confidence head.
DEEPSPEC_KEYS = ("num_anchors", "target_layer_ids", "mask_token_id", "markov_rank", "enable_confidence_head")


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"markov_rank": 0, "enable_confidence_head": False, "confidence_head_with_markov": False},
        {"enable_confidence_head": False},
        {"markov_rank": 0, "confidence_head_with_markov": False},
        {"markov_head_type": "gated", "confidence_head_with_markov": False},
    ],
    ids=["r8-head-mk", "r0-nohead", "r8-nohead", "r0-head", "gated-head"],
)
def test_an_export_holds_every_key_deepspecs_evaluator_reads(tmp_path: Path, options: dict[str, Any]) -> None:
    draft = make_draft(**options)
    draft.save_pretrained(tmp_path / "export")
    saved = json.loads((tmp_path / "export" / "config.json").read_text())
    rank, head = saved["markov_rank"], saved["enable_confidence_head"]
    required = {
        *DEEPSPEC_KEYS,
        *(["markov_head_type"] if rank else []),
        *(["confidence_head_with_markov"] if head else []),
    }
    assert required <= saved.keys()
    assert ("markov_head_type" in saved) == (rank > 0)  # the published layout: only where it applies
    assert ("confidence_head_with_markov" in saved) == head
    assert list(saved) == sorted(saved)  # save_pretrained's sorted keys, the order DeepSpec's exports have

    # A config.json without the keys this library defaults (an older export, or a hand-written one):
    # DeepSpec refuses it, it loads here, and its re-export carries every key, the others unchanged.
    defaults = {"num_anchors": 512, "markov_rank": 0, "enable_confidence_head": False}
    defaults |= {"markov_head_type": "vanilla", "confidence_head_with_markov": False}
    older = tmp_path / "older"
    draft.save_pretrained(older)
    stripped = {k: v for k, v in saved.items() if not (k in defaults and v == defaults[k])}
    stripped.pop("num_anchors")  # training-only: re-exported as the method's N
    (older / "config.json").write_text(json.dumps(stripped))
    deepspec = next(v for v in check_draft(read_draft_dir(older)) if v.engine == "DeepSpec")
    assert not deepspec.ok and deepspec.reasons[0].startswith("config.json lacks num_anchors")
    Qwen3DSparkModel.from_pretrained(older).save_pretrained(tmp_path / "again")
    again = json.loads((tmp_path / "again" / "config.json").read_text())
    assert required <= again.keys() and again["num_anchors"] == 512
    assert {k: v for k, v in again.items() if k in stripped and k != "transformers_version"} == {
        k: v for k, v in stripped.items() if k != "transformers_version"
    }
    assert {k: again[k] for k in defaults if k in saved and k != "num_anchors"} == {
        k: saved[k] for k in defaults if k in saved and k != "num_anchors"
    }
    assert next(v for v in check_draft(read_draft_dir(tmp_path / "again")) if v.engine == "DeepSpec").ok


# ---------------------------------------------------------------------------------------------------
# Bad input: a clear error that names the field
# ---------------------------------------------------------------------------------------------------


BAD_OPTIONS = [
    pytest.param({"mask_token_id": VOCAB}, "mask_token_id", id="mask-eq-vocab"),
    pytest.param({"mask_token_id": VOCAB + 50}, "mask_token_id", id="mask-above-vocab"),
    pytest.param({"mask_token_id": -1}, "mask_token_id", id="mask-negative"),
    pytest.param({"mask_token_id": PAD}, "pad_token_id", id="mask-is-pad"),
    pytest.param({"mask_token_id": EOS}, "eos_token_id", id="mask-is-eos"),
    pytest.param({"target_layer_ids": []}, "target_layer_ids", id="layers-empty"),
    pytest.param({"target_layer_ids": [2, 0]}, "target_layer_ids", id="layers-unsorted"),
    pytest.param({"target_layer_ids": [0, 0]}, "target_layer_ids", id="layers-repeated"),
    pytest.param({"target_layer_ids": [0, TARGET_LAYERS]}, "target_layer_ids", id="layers-above"),
    pytest.param({"target_layer_ids": [-2, 0]}, "target_layer_ids", id="layers-below"),
    pytest.param({"block_size": 0}, "block_size", id="block-size-0"),
    pytest.param({"block_size": -3}, "block_size", id="block-size-negative"),
    pytest.param({"markov_head_type": "lstm"}, "markov_head_type", id="head-unknown"),
    pytest.param(
        {"markov_rank": 0, "confidence_head_with_markov": True},
        "confidence_head_with_markov",
        id="conf-mk-r0",
    ),
]


@pytest.mark.parametrize(("overrides", "field"), BAD_OPTIONS)
def test_bad_options_name_the_field(overrides: dict[str, Any], field: str) -> None:
    with pytest.raises(DraftConfigError, match=field):
        build(**overrides)


def test_mask_token_equal_to_any_of_several_eos_ids_is_rejected() -> None:
    target = target_config(eos_token_id=[EOS, 7], pad_token_id=None)
    with pytest.raises(DraftConfigError, match="eos_token_id"):
        build_draft_config(target, **draft_options(mask_token_id=7))
    build_draft_config(target, **draft_options(mask_token_id=8))  # a neighbour is fine


def test_unknown_head_type_is_irrelevant_without_a_markov_head() -> None:
    config = build(markov_rank=0, markov_head_type="lstm", confidence_head_with_markov=False)
    assert not hasattr(config, "markov_head_type")


def test_missing_mask_token_and_unknown_options_are_errors() -> None:
    options = draft_options()
    del options["mask_token_id"]
    with pytest.raises(DraftConfigError, match="mask_token_id"):
        build_draft_config(target_config(), **options)
    with pytest.raises(DraftConfigError, match="num_anchor"):
        build(num_anchor=4)


def test_a_hand_edited_config_is_validated_when_the_model_is_built() -> None:
    for field, value in (("mask_token_id", VOCAB), ("block_size", 0), ("target_layer_ids", [3, 1])):
        config = build()
        setattr(config, field, value)
        with pytest.raises(DraftConfigError, match=field):
            Qwen3DSparkModel(config)
    config = build()
    config.markov_head_type = "lstm"
    with pytest.raises(DraftConfigError, match="markov_head_type"):
        Qwen3DSparkModel(config)


def test_a_plain_target_config_is_not_a_draft_config() -> None:
    with pytest.raises(DraftConfigError, match=r"block_size|mask_token_id|target_layer_ids"):
        Qwen3DSparkModel(target_config())


def test_a_target_config_of_another_family_is_rejected() -> None:
    llama = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=4, num_attention_heads=4)
    with pytest.raises(DraftConfigError, match=r"model_type.*llama"):
        build_draft_config(llama, **draft_options())
    with pytest.raises(DraftConfigError, match="llama"):
        resolve_dspark_draft_spec(["Qwen3ForCausalLM"]).build_draft_config(llama, **draft_options())


@pytest.mark.parametrize("layer_ids", [[-1, 1], [0, TARGET_LAYERS - 1], [-1, TARGET_LAYERS - 1]])
def test_sglang_unservable_layers_warn(layer_ids: list[int]) -> None:
    with pytest.warns(TargetLayerWarning, match="SGLang") as record:
        config = build(target_layer_ids=layer_ids)
    assert config.target_layer_ids == layer_ids  # a warning, not a failure
    unservable = [i for i in layer_ids if i in (-1, TARGET_LAYERS - 1)]
    assert str(unservable) in str(record[0].message)


@pytest.mark.parametrize("path", ["family builder", "spec", "draft class"])
def test_target_layer_warning_points_at_the_callers_line(path: str) -> None:
    """Reached through apply_dspark_fields at different depths, the warning names this file."""
    options = draft_options(target_layer_ids=[0, TARGET_LAYERS - 1])
    builders = {
        "family builder": build_draft_config,
        "spec": resolve_dspark_draft_spec(["Qwen3ForCausalLM"]).build_draft_config,
        "draft class": Qwen3DSparkModel.config_from_target,
    }
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        builders[path](target_config(), **options)
    (warning,) = [w for w in record if issubclass(w.category, TargetLayerWarning)]
    assert warning.filename == __file__


def test_servable_layers_do_not_warn_and_loading_does_not_warn_again(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", TargetLayerWarning)
        build(target_layer_ids=[0, 1, 2])
    with pytest.warns(TargetLayerWarning):
        config = build(target_layer_ids=[-1, 2])
    with warnings.catch_warnings():
        warnings.simplefilter("error", TargetLayerWarning)
        model = Qwen3DSparkModel(config)
        model.save_pretrained(tmp_path)
        Qwen3DSparkModel.from_pretrained(tmp_path)


def test_wrong_tensor_shapes_to_forward_name_the_tensor() -> None:
    model = make_draft()
    good = random_batch(2, 16)
    ids, features, final, loss_mask = good.args()
    cases: list[tuple[dict[str, Any], str]] = [
        ({"input_ids": ids[0]}, "input_ids"),
        ({"target_features": torch.randn(2, 16, 3 * HIDDEN)}, "target_features"),
        ({"target_features": features[:, :-1]}, "target_features"),
        ({"target_features": features[:1]}, "target_features"),
        ({"target_final_hidden": final[..., :-1]}, "target_final_hidden"),
        ({"target_final_hidden": final[:, :-2]}, "target_final_hidden"),
        ({"loss_mask": loss_mask[:, :-1]}, "loss_mask"),
        ({"document_ids": torch.zeros(2, 15, dtype=torch.long)}, "document_ids"),
        ({"anchors": torch.zeros(3, 4, dtype=torch.long)}, "anchors"),
        (
            {"anchors": torch.zeros(2, 4, dtype=torch.long), "keep": torch.ones(2, 3, dtype=torch.bool)},
            "keep",
        ),
    ]
    for change, name in cases:
        kwargs: dict[str, Any] = {
            "input_ids": ids,
            "target_features": features,
            "target_final_hidden": final,
            "loss_mask": loss_mask,
            **change,
        }
        with pytest.raises(ValueError, match=name):
            model(**kwargs)
    with pytest.raises(ValueError, match="seq_len"):
        model(ids[:, :1], features[:, :1], final[:, :1], loss_mask[:, :1])
    with pytest.raises(ValueError, match="len\\(target_layer_ids\\)=2"):
        model(ids, features[..., :HIDDEN], final, loss_mask)
    # and the decode path
    cache = model.new_cache()
    with pytest.raises(ValueError, match="anchor_tokens"):
        model.block_hidden(ids[:, :2], features[:, :4], cache)
    with pytest.raises(ValueError, match="context_features"):
        model.block_hidden(ids[:, 0], features[:, :4, :HIDDEN], cache)
    with pytest.raises(ValueError, match="context_features"):
        model.block_hidden(ids[:1, 0], features[:, :4], cache)
    with pytest.raises(ValueError, match="num_slots"):
        model.propose(ids[:, 0], features[:, :4], cache, num_slots=5)


def test_unknown_attention_implementation_is_rejected() -> None:
    model = make_draft()
    model.config._attn_implementation = "paged_attention"
    with pytest.raises(DraftConfigError, match="paged_attention"):
        model(*random_batch(1, 8).args())


# ---------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------


def _outputs(model: Qwen3DSparkModel) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch = random_batch(2, 16, seed=5)
    with torch.no_grad():
        out = model(*batch.args(), anchors=ANCHORS, keep=KEEP, return_logits=True)
        proposal = model.propose(batch.input_ids[:, 6], batch.target_features[:, :6], model.new_cache())
    assert out.logits is not None and out.confidence_logits is not None
    return out.logits, out.confidence_logits, proposal.logits


@pytest.mark.parametrize("head", HEAD_TYPES)
def test_save_and_load_round_trip_gives_identical_outputs(tmp_path: Path, head: str) -> None:
    model = make_draft(seed=1, markov_head_type=head)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["Qwen3DSparkModel"]
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(model.state_dict())
    loaded = Qwen3DSparkModel.from_pretrained(tmp_path).eval()
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    for before, after in zip(_outputs(model), _outputs(loaded), strict=True):
        assert torch.equal(before, after)
    assert not loaded.embed_tokens.weight.requires_grad and not loaded.lm_head.weight.requires_grad
    # sanity: a model with other weights does not give the same outputs
    assert not torch.allclose(_outputs(make_draft(seed=2, markov_head_type=head))[0], _outputs(model)[0])


def _target_and_draft(seed: int = 0) -> tuple[Qwen3ForCausalLM, Qwen3DSparkModel]:
    torch.manual_seed(seed)
    target = Qwen3ForCausalLM(target_config()).eval()
    randomize_(target, seed + 100)
    draft = Qwen3DSparkModel.from_target(target, **draft_options(markov_head_type="gated"))
    embed, head = draft.embed_tokens.weight.clone(), draft.lm_head.weight.clone()
    randomize_(draft, seed + 200)
    with torch.no_grad():  # keep the target's weights, randomise the rest
        draft.embed_tokens.weight.copy_(embed)
        draft.lm_head.weight.copy_(head)
    return target, draft.eval()


def test_trimmed_checkpoint_loads_with_the_target(tmp_path: Path) -> None:
    target, draft = _target_and_draft()
    draft.save_pretrained(tmp_path, include_target_weights=False)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "embed_tokens.weight" not in keys and "lm_head.weight" not in keys
    assert keys == set(draft.state_dict()) - {"embed_tokens.weight", "lm_head.weight"}

    loaded = Qwen3DSparkModel.from_pretrained(tmp_path, target=target).eval()
    assert torch.equal(loaded.embed_tokens.weight, target.get_input_embeddings().weight)
    assert torch.equal(loaded.lm_head.weight, target.get_output_embeddings().weight)
    assert not loaded.embed_tokens.weight.requires_grad and not loaded.lm_head.weight.requires_grad
    for before, after in zip(_outputs(draft), _outputs(loaded), strict=True):
        assert torch.equal(before, after)


def test_trimmed_checkpoint_without_a_target_is_a_clear_error(tmp_path: Path) -> None:
    _, draft = _target_and_draft()
    draft.save_pretrained(tmp_path, include_target_weights=False)
    with pytest.raises(DraftConfigError, match=r"embed_tokens.*lm_head.*target="):
        Qwen3DSparkModel.from_pretrained(tmp_path)


def test_trimmed_checkpoint_with_a_mismatched_target_is_a_clear_error(tmp_path: Path) -> None:
    _, draft = _target_and_draft()
    draft.save_pretrained(tmp_path, include_target_weights=False)
    other = Qwen3ForCausalLM(target_config(vocab_size=VOCAB + 32))
    with pytest.raises(DraftConfigError, match="vocab_size"):
        Qwen3DSparkModel.from_pretrained(tmp_path, target=other)


def test_full_checkpoint_keeps_its_own_weights_when_given_a_target(tmp_path: Path) -> None:
    _, draft = _target_and_draft()
    draft.save_pretrained(tmp_path)
    other_target, _ = _target_and_draft(seed=7)
    loaded = Qwen3DSparkModel.from_pretrained(tmp_path, target=other_target)
    assert torch.equal(loaded.lm_head.weight, draft.lm_head.weight)


# ---------------------------------------------------------------------------------------------------
# dtype, freezing
# ---------------------------------------------------------------------------------------------------


def test_bf16_cast_keeps_inv_freq_fp32_and_gives_finite_outputs(tmp_path: Path) -> None:
    model = make_draft(markov_head_type="rnn")
    reference = model.rotary_emb.inv_freq.clone()
    assert reference.dtype == torch.float32
    for cast in (
        lambda m: m.to(torch.bfloat16),
        lambda m: m.half().bfloat16(),
        lambda m: m.to("cpu", torch.bfloat16),
    ):
        model = cast(model)
        assert model.fc.weight.dtype == torch.bfloat16
        assert model.rotary_emb.inv_freq.dtype == torch.float32
        # recomputed, not a bf16 round trip (which would lose mantissa bits)
        assert torch.equal(model.rotary_emb.inv_freq, reference)
    assert not torch.equal(reference.bfloat16().float(), reference)

    batch = random_batch(2, 16, seed=3, dtype=torch.bfloat16)
    with torch.no_grad():
        out = model(*batch.args(), anchors=ANCHORS, keep=KEEP, return_logits=True)
        proposal = model.propose(batch.input_ids[:, 6], batch.target_features[:, :6], model.new_cache())
    assert out.logits is not None and out.confidence_logits is not None
    loss = DSparkObjective()(model, out).loss
    for tensor in (loss, out.logits, out.confidence_logits, proposal.logits, proposal.probs):
        assert torch.isfinite(tensor).all()
    assert out.confidence_logits.dtype == torch.float32

    model.save_pretrained(tmp_path)
    loaded = Qwen3DSparkModel.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert loaded.fc.weight.dtype == torch.bfloat16
    assert loaded.rotary_emb.inv_freq.dtype == torch.float32
    assert torch.equal(loaded.rotary_emb.inv_freq, reference)


def test_bf16_outputs_track_fp32() -> None:
    model = make_draft(seed=4)
    batch = random_batch(2, 16, seed=4)
    with torch.no_grad():
        full = model(*batch.args(), anchors=ANCHORS, keep=KEEP, return_logits=True).logits
        half = model.to(torch.bfloat16)(*batch.args(), anchors=ANCHORS, keep=KEEP, return_logits=True).logits
    assert full is not None and half is not None
    assert (full - half).abs().max() < 0.15 * full.abs().max()


def test_embeddings_and_lm_head_are_frozen_and_get_no_grad() -> None:
    model = make_draft(markov_head_type="gated").train()
    assert not model.embed_tokens.weight.requires_grad and not model.lm_head.weight.requires_grad
    out = DSparkObjective()(model, model(*random_batch(2, 16, seed=8).args(), anchors=ANCHORS, keep=KEEP))
    out.loss.backward()
    assert model.embed_tokens.weight.grad is None and model.lm_head.weight.grad is None
    for name, param in model.named_parameters():
        if name in ("embed_tokens.weight", "lm_head.weight"):
            continue
        assert param.requires_grad, name
        assert param.grad is not None and param.grad.abs().sum() > 0, name


# ---------------------------------------------------------------------------------------------------
# Registry and spec
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("architecture", ["Qwen3ForCausalLM", "Qwen3MoeForCausalLM"])
def test_registry_resolves_both_architectures_to_the_qwen3_draft(architecture: str) -> None:
    spec = resolve_dspark_draft_spec([architecture])
    assert spec.draft_cls is Qwen3DSparkModel


@pytest.mark.parametrize("moe", [False, True], ids=["qwen3", "qwen3_moe"])
def test_spec_builds_a_draft_from_a_target(moe: bool) -> None:
    architecture = "Qwen3MoeForCausalLM" if moe else "Qwen3ForCausalLM"
    torch.manual_seed(0)
    target = (Qwen3MoeForCausalLM if moe else Qwen3ForCausalLM)(target_config(moe=moe)).eval()
    spec = resolve_dspark_draft_spec([architecture])
    config = spec.build_draft_config(target.config, **draft_options(markov_head_type="rnn"))  # type: ignore[attr-defined]
    assert config.architectures == ["Qwen3DSparkModel"] and config.markov_head_type == "rnn"
    draft = spec.build_draft(target, **draft_options(markov_head_type="rnn"))  # type: ignore[attr-defined]
    assert type(draft) is Qwen3DSparkModel
    for field in ("target_layer_ids", "num_target_layers", "block_size", "mask_token_id", "markov_rank"):
        assert getattr(draft.config, field) == getattr(config, field), field
    assert torch.equal(draft.embed_tokens.weight, target.get_input_embeddings().weight)
    assert torch.equal(draft.lm_head.weight, target.get_output_embeddings().weight)
    assert draft.embed_tokens.weight.data_ptr() != target.get_input_embeddings().weight.data_ptr()
    assert not draft.embed_tokens.weight.requires_grad and not draft.lm_head.weight.requires_grad
    # the target's own weights stay trainable; only the draft's copies are frozen
    assert target.get_input_embeddings().weight.requires_grad
    # it runs on features of the target's shape
    batch = random_batch(1, 12, seed=9)
    out = draft(*batch.args(), anchors=torch.tensor([[1, 4, 6, 8]]))
    assert torch.isfinite(DSparkObjective()(draft, out).loss)


def test_spec_build_draft_follows_the_target_dtype() -> None:
    target = Qwen3ForCausalLM(target_config()).to(torch.bfloat16)
    draft = resolve_dspark_draft_spec(["Qwen3ForCausalLM"]).build_draft(target, **draft_options())  # type: ignore[attr-defined]
    assert draft.fc.weight.dtype == torch.bfloat16
    assert draft.rotary_emb.inv_freq.dtype == torch.float32
