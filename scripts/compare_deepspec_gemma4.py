"""Compare ``dspark_gemma4`` with DeepSpec's Gemma 4 DSpark draft on the same weights and inputs.

DeepSpec is not a dependency and nothing of it is copied here: the second phase imports it from a
checkout you point to, under the transformers it pins (5.10.2), in its own interpreter::

    python scripts/compare_deepspec_gemma4.py ours WORK          # dspark's env: draft, inputs, outputs
    PYTHONPATH=DEEPSPEC:TRANSFORMERS_5_10 python scripts/compare_deepspec_gemma4.py deepspec WORK
    python scripts/compare_deepspec_gemma4.py report WORK        # dspark's env: loads theirs back

``ours`` builds a draft for the tiny Gemma 4 target's config (random weights, every head), saves it
and the inputs, and records its training-forward logits, confidence logits, objective terms and a
greedy decode-time proposal. ``deepspec`` loads that ``config.json`` and checkpoint into DeepSpec's
``Gemma4DSparkModel`` (strict), runs the same blocks (its anchor sampler replaced by ours) and its
loss, and saves its own checkpoint with ``save_pretrained``. ``report`` loads DeepSpec's checkpoint
into ours, checks it reproduces the outputs, and prints the largest differences. All in float32.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

SEQ_LEN, BLOCK, ANCHORS, CONTEXT = 48, 7, 6, 20
OPTIONS: dict[str, Any] = {
    "num_draft_layers": 2,
    "block_size": BLOCK,
    "target_layer_ids": [0, 2],
    "mask_token_id": 4,
    "num_anchors": ANCHORS,
    "markov_rank": 16,
    "markov_head_type": "vanilla",
    "enable_confidence_head": True,
    "confidence_head_with_markov": True,
}
LOSS = {"decay_gamma": 4.0, "ce_weight": 0.1, "l1_weight": 0.9, "confidence_weight": 1.0}


def _inputs(config: Any) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    hidden, features = config.hidden_size, len(config.target_layer_ids) * config.hidden_size
    loss_mask = torch.ones(1, SEQ_LEN, dtype=torch.long)
    loss_mask[:, :6] = 0
    anchors = torch.tensor([[6, 11, 17, 25, 33, 44]])
    return {
        "input_ids": torch.randint(5, config.vocab_size, (1, SEQ_LEN), generator=generator),
        "target_features": torch.randn(1, SEQ_LEN, features, generator=generator),
        "target_final_hidden": torch.randn(1, SEQ_LEN, hidden, generator=generator),
        "loss_mask": loss_mask,
        "anchors": anchors,
        "keep": torch.ones_like(anchors, dtype=torch.bool),
    }


def _our_outputs(draft: Any, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from dspark_core.modeling.loss import DSparkLossConfig, DSparkObjective

    out = draft(
        inputs["input_ids"],
        inputs["target_features"],
        inputs["target_final_hidden"],
        inputs["loss_mask"],
        anchors=inputs["anchors"],
        keep=inputs["keep"],
        return_logits=True,
    )
    terms = DSparkObjective(DSparkLossConfig(**LOSS), all_reduce=False)(draft, out)
    with torch.no_grad():
        cache = draft.new_cache()
        proposal = draft.propose(
            inputs["input_ids"][:, CONTEXT], inputs["target_features"][:, :CONTEXT], cache
        )
    return {
        "logits": out.logits.detach(),
        "confidence": out.confidence_logits.detach(),
        "labels": out.labels,
        "eval_mask": out.eval_mask,
        "loss": terms.total.detach(),
        "proposal_tokens": proposal.tokens,
        "proposal_logits": proposal.logits,
    }


def phase_ours(work: Path) -> None:
    from transformers import Gemma4ForConditionalGeneration

    from dspark_core.targets.builders import TinyTargetShape
    from dspark_gemma4.modeling import Gemma4DSparkModel
    from dspark_gemma4.testing import tiny_target_config

    torch.manual_seed(0)
    target = Gemma4ForConditionalGeneration(tiny_target_config(TinyTargetShape(vocab_size=300)))
    draft = Gemma4DSparkModel.from_target(target, **OPTIONS)
    with torch.no_grad():  # no weight may sit at its init value: every parameter must matter
        for name, parameter in draft.named_parameters():
            if name.endswith("norm.weight"):
                parameter.uniform_(0.5, 1.5)
        draft.confidence_head.proj.bias.fill_(0.1)
    draft.eval()
    draft.save_pretrained(work / "ours")
    inputs = _inputs(draft.config)
    torch.save(inputs, work / "inputs.pt")
    torch.save(_our_outputs(draft, inputs), work / "ours.pt")
    print(f"ours: {sum(p.numel() for p in draft.parameters())} parameters saved to {work / 'ours'}")


def phase_deepspec(work: Path) -> None:
    import deepspec.modeling.dspark.gemma4.modeling as theirs
    import torch.distributed as dist
    import transformers
    from deepspec.modeling.dspark.loss import compute_dspark_loss
    from safetensors.torch import load_file
    from transformers.models.gemma4.configuration_gemma4 import Gemma4TextConfig

    inputs = torch.load(work / "inputs.pt")
    config = Gemma4TextConfig.from_pretrained(work / "ours")
    config._attn_implementation = "flex_attention"
    model = theirs.Gemma4DSparkModel(config).eval()
    missing, unexpected = model.load_state_dict(load_file(work / "ours" / "model.safetensors"), strict=True)
    assert not missing and not unexpected
    # Their forward samples anchors itself: give it ours.
    theirs.sample_anchor_positions = lambda **_: (inputs["anchors"], inputs["keep"])
    with torch.no_grad():  # flex attention has no CPU backward
        out = model(
            input_ids=inputs["input_ids"],
            target_hidden_states=inputs["target_features"],
            loss_mask=inputs["loss_mask"],
            target_last_hidden_states=inputs["target_final_hidden"],
        )
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"file://{work / 'pg'}", rank=0, world_size=1)
    loss = compute_dspark_loss(
        outputs=out,
        loss_decay_gamma=LOSS["decay_gamma"],
        ce_loss_alpha=LOSS["ce_weight"],
        l1_loss_alpha=LOSS["l1_weight"],
        confidence_head_alpha=LOSS["confidence_weight"],
    )
    # Decode time: the context's features, then one block [x_C, MASK, ...] with no mask at all.
    with torch.no_grad():
        block = torch.full((1, BLOCK), config.mask_token_id)
        block[:, 0] = inputs["input_ids"][:, CONTEXT]
        positions = torch.arange(CONTEXT + BLOCK).unsqueeze(0)
        hidden = model._forward_backbone(
            position_ids=positions,
            noise_embedding=model.embed_tokens(block),
            target_hidden_states=inputs["target_features"][:, :CONTEXT],
        )
        tokens, logits = model.sample_draft_tokens(
            model.compute_logits(hidden), first_prev_token_ids=block[:, 0], hidden_states=hidden
        )
    torch.save(
        {
            "logits": out.draft_logits.detach().float(),
            "confidence": out.confidence_pred.detach(),
            "labels": out.target_ids,
            "eval_mask": out.eval_mask,
            "loss": loss,
            "proposal_tokens": tokens,
            "proposal_logits": logits.float(),
            "transformers": transformers.__version__,
        },
        work / "deepspec.pt",
    )
    model.save_pretrained(work / "deepspec")
    print(f"deepspec (transformers {transformers.__version__}): outputs and checkpoint saved")


def phase_report(work: Path) -> None:
    from dspark_gemma4.modeling import Gemma4DSparkModel

    ours, theirs = torch.load(work / "ours.pt"), torch.load(work / "deepspec.pt", weights_only=False)
    reloaded = Gemma4DSparkModel.from_pretrained(work / "deepspec").eval()
    again = _our_outputs(reloaded, torch.load(work / "inputs.pt"))
    published = json.loads((work / "deepspec" / "config.json").read_text())
    mine = json.loads((work / "ours" / "config.json").read_text())
    same_fields = sorted(k for k in mine if k in published and mine[k] == published[k])
    print(f"DeepSpec ran under transformers {theirs['transformers']}")
    print(
        f"config.json: {len(same_fields)} shared fields equal; differing: "
        f"{sorted(k for k in mine if k in published and mine[k] != published[k])}"
    )
    print(
        f"labels equal: {torch.equal(ours['labels'], theirs['labels'])}; "
        f"eval_mask equal: {torch.equal(ours['eval_mask'], theirs['eval_mask'])}"
    )
    for name in ("logits", "confidence", "loss", "proposal_logits"):
        diff = (ours[name].float() - theirs[name].float()).abs().max().item()
        back = (again[name].float() - ours[name].float()).abs().max().item()
        print(
            f"{name}: max |ours - DeepSpec| = {diff:.3e}; DeepSpec's checkpoint in ours reproduces "
            f"ours to {back:.3e}"
        )
    print(f"greedy proposal equal: {torch.equal(ours['proposal_tokens'], theirs['proposal_tokens'])}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("phase", choices=("ours", "deepspec", "report"))
    parser.add_argument("work", type=Path)
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    {"ours": phase_ours, "deepspec": phase_deepspec, "report": phase_report}[args.phase](args.work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
