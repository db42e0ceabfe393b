"""Trainer throughput on CPU against the bare objective step, in one run.

The model and data sizes are the model benchmark's (``model_bench.py``): a Qwen3-shaped target with
hidden 256 and 8 layers, a 2-layer draft with a rank-64 Markov head and a confidence head, V 4096,
S 512, N 32 anchors, B 7, one row per step. Three loops over the same rows are timed:

- **bare step**: the draft's forward, backward and AdamW step on target features computed beforehand
  (what ``model_bench.py`` times);
- **bare step + features**: the same with the target's features captured online, as training must;
- **Trainer**: :class:`dspark_core.training.trainer.Trainer` on the same target and rows (features
  online, gradient clipping, LR schedule, metrics, progress bookkeeping), tokens/s from its own
  ``metrics.jsonl`` (which leaves out checkpoint saves).

The loops alternate over several rounds and each reports its median round. The overhead target is
Trainer <= 5% slower than "bare step + features"; the table also shows the gap to the bare step.

    python benchmarks/train_bench.py [--rounds 5] [--steps 10] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import model_bench as mb  # the shared sizes live next to this file

ROWS = 16


def prepare(root: Path) -> tuple[Path, Path]:
    """Save the model benchmark's random target and ``ROWS`` pre-tokenised rows of length S."""
    import torch

    target, _, _ = mb.build()
    target_dir = root / "target"
    target.save_pretrained(target_dir)
    generator = torch.Generator().manual_seed(0)
    data = root / "rows.jsonl"
    with data.open("w") as handle:
        for _ in range(ROWS):
            ids = torch.randint(2, mb.VOCAB - 1, (mb.SEQ,), generator=generator).tolist()
            handle.write(json.dumps({"input_ids": ids, "loss_mask": [0] + [1] * (mb.SEQ - 1)}) + "\n")
    return target_dir, data


def trainer_config(target_dir: Path, data: Path, output: Path, max_steps: int, log_every: int) -> Any:
    from dspark_core.training.config import TrainConfig

    return TrainConfig.from_mapping(
        {
            "target": str(target_dir),
            "data": [str(data)],
            "output_dir": str(output),
            "num_draft_layers": mb.DRAFT_LAYERS,
            "block_size": mb.BLOCK,
            "num_anchors": mb.ANCHORS,
            "markov_rank": 64,
            "mask_token_id": mb.VOCAB - 1,
            "max_length": mb.SEQ,
            "batch_size": 1,
            "max_steps": max_steps,
            "lr": 1e-4,
            "log_every": log_every,  # one line per round: the trainer logs only at log_every steps
            "save_every": 10**9,
            "keep_last": 1,
            "progress": False,
            "device": "cpu",
        }
    )


class BareLoop:
    """The draft step alone, on the Trainer's own draft, rows and data order."""

    def __init__(self, trainer: Any, online: bool) -> None:
        import torch

        from dspark_core.modeling.loss import DSparkObjective
        from dspark_core.training.trainer import batch_target_features

        self.objective = DSparkObjective()
        self.online = online
        self.trainer = trainer
        self.draft = trainer.draft
        self.optimizer = torch.optim.AdamW([p for p in self.draft.parameters() if p.requires_grad], lr=1e-4)
        self.generator = torch.Generator().manual_seed(0)
        self.batches = [trainer.data.collator([row]) for row in trainer.data.rows]
        self.features = [batch_target_features(trainer.target, b, trainer.layer_ids) for b in self.batches]
        self.index = 0

    def run(self, steps: int) -> float:
        """Tokens per second over ``steps`` steps."""
        from dspark_core.training.trainer import batch_target_features

        tokens = 0
        start = time.perf_counter()
        for _ in range(steps):
            i = self.index % len(self.batches)
            self.index += 1
            batch = self.batches[i]
            features = (
                batch_target_features(self.trainer.target, batch, self.trainer.layer_ids)
                if self.online
                else self.features[i]
            )
            output = self.draft(
                batch["input_ids"],
                features.features,
                features.final_hidden,
                batch["loss_mask"],
                generator=self.generator,
            )
            self.objective(self.draft, output).loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            tokens += int(batch["attention_mask"].sum())
        return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="steps per loop per round")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    import torch

    from dspark_core.training.metrics import read_metrics
    from dspark_core.training.trainer import Trainer

    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        target_dir, data = prepare(root)
        total = (args.rounds + 1) * args.steps
        trainer = Trainer(trainer_config(target_dir, data, root / "run", total, args.steps))
        # The bare loops train their own copies, so that the three loops start from equal weights.
        bare = BareLoop(_copy_trainer_draft(trainer), online=False)
        online = BareLoop(_copy_trainer_draft(trainer), online=True)
        results: dict[str, list[float]] = {"bare": [], "online": [], "trainer": []}
        for round_index in range(args.rounds + 1):
            bare_tps = bare.run(args.steps)
            online_tps = online.run(args.steps)
            # The metrics window opened when the last round logged; the bare loops have run since.
            trainer.window.reset()
            trainer.train(stop_at=(round_index + 1) * args.steps)
            trainer_tps = float(read_metrics(root / "run")[-1]["tokens_per_s"])
            if round_index:  # round 0 warms up allocators and kernels
                results["bare"].append(bare_tps)
                results["online"].append(online_tps)
                results["trainer"].append(trainer_tps)
    medians = {name: statistics.median(values) for name, values in results.items()}
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; H={mb.HIDDEN} target layers="
        f"{mb.TARGET_LAYERS} draft layers={mb.DRAFT_LAYERS} V={mb.VOCAB} S={mb.SEQ} N={mb.ANCHORS} "
        f"B={mb.BLOCK}, r=64, batch 1; median of {args.rounds} rounds x {args.steps} steps"
    )
    rows = [
        ("bare step (precomputed features)", medians["bare"]),
        ("bare step + online target features", medians["online"]),
        ("Trainer", medians["trainer"]),
    ]
    # The last two columns are extra time per token relative to each baseline.
    print(f"{'loop':<38}{'tokens/s':>10}{'ms/step':>10}{'vs bare':>10}{'vs bare+features':>18}")
    for name, tps in rows:
        print(
            f"{name:<38}{tps:>10.0f}{1000 * mb.SEQ / tps:>10.1f}"
            f"{medians['bare'] / tps - 1:>+10.1%}{medians['online'] / tps - 1:>+18.1%}"
        )
    overhead = medians["online"] / medians["trainer"] - 1
    print(f"Trainer overhead over the bare step with online features: {overhead:+.1%} (target <= +5%)")


def _copy_trainer_draft(trainer: Any) -> Any:
    """A shallow stand-in for ``trainer`` whose draft is a deep copy (same weights, own optimizer)."""
    import copy
    from types import SimpleNamespace

    return SimpleNamespace(
        draft=copy.deepcopy(trainer.draft),
        target=trainer.target,
        data=trainer.data,
        layer_ids=trainer.layer_ids,
    )


if __name__ == "__main__":
    main()
