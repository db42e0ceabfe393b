"""Produce the pretrained embedded target that dspark-core ships (``dspark_core/targets/shipped``).

Run from the repository root: ``python scripts/build_shipped_target.py [--steps N]``. It pretrains
the default :class:`~dspark_core.targets.build.PretrainedTargetSpec` on this interpreter's standard
library with the ``qwen3`` family and records this script's arguments and the corpus in
``dspark_target.json``. About 25 minutes on two CPU cores.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from dspark_core.targets.build import PretrainedTargetSpec, make_pretrained_target, with_recipe
from dspark_core.targets.shipped import SHIPPED_DIR, seal


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=PretrainedTargetSpec().recipe.steps)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=SHIPPED_DIR)
    args = parser.parse_args(argv)
    from tqdm import tqdm

    spec = with_recipe(PretrainedTargetSpec(), steps=args.steps, seed=args.seed)
    bar = tqdm(total=spec.recipe.steps, desc="pretrain", unit="step")

    def on_step(step: int, loss: float) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")

    script = {
        "script": "scripts/build_shipped_target.py",
        "arguments": sys.argv[1:] if argv is None else argv,
    }
    out, record, reused = make_pretrained_target(args.output, spec, on_step=on_step, extra_record=script)
    bar.close()
    shutil.rmtree(out / "__pycache__", ignore_errors=True)
    record = seal(out)
    print(f"{'reused' if reused else 'wrote'} {out}: held-out perplexity {record['heldout_perplexity']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
