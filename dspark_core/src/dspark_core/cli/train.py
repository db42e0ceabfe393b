"""``dspark train``: train a DSpark draft for a target (also ``python -m dspark_core.train``).

Every :class:`~dspark_core.training.config.TrainConfig` field is a flag (``--batch-size 8``); a
``--config`` file (YAML or TOML) gives the defaults and flags override it. Under ``torchrun`` each
rank runs this command; ``--nproc-per-node N`` starts torchrun itself.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import typing
from dataclasses import fields
from typing import Any

from dspark_core.training.config import TrainConfig, field_help

HELP = "train a DSpark draft for a target on a chat dataset (DDP/FSDP under torchrun)"

# Flags whose names differ from the field name (the field's own spelling works too).
_ALIASES = {"output_dir": ("--output", "-o")}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="a YAML or TOML file of options; flags override it")
    parser.add_argument(
        "--nproc-per-node",
        type=int,
        default=None,
        metavar="N",
        help="start N processes on this machine with torchrun (DDP); without it, run in this process",
    )
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config as JSON and exit"
    )
    hints = typing.get_type_hints(TrainConfig)
    group = parser.add_argument_group("training options (see TrainConfig)")
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        names = [flag, *_ALIASES.get(f.name, ())]
        hint = hints[f.name]
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": field_help(f.name)}
        if hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(hint) is list and typing.get_args(hint) == (str,):
            kwargs["nargs"] = "+"
            kwargs["metavar"] = "PATH"
        else:
            kwargs["metavar"] = f.name.upper()
        group.add_argument(*names, **kwargs)


def resolve_config(args: argparse.Namespace) -> TrainConfig:
    """The config from ``--config`` (if any) with every given flag applied over it."""
    overrides = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    if args.config:
        return TrainConfig.from_file(args.config, overrides)
    return TrainConfig.from_mapping(overrides, source="flags")


def _launch_torchrun(config: TrainConfig, nproc: int) -> int:
    """Run ``config`` under torchrun with ``nproc`` processes; returns torchrun's exit code."""
    import json
    import tempfile

    # The ranks read the resolved config from a file, so nothing depends on how this process was called.
    with tempfile.TemporaryDirectory(prefix="dspark-train-") as tmp:
        config_file = os.path.join(tmp, "config.json")
        with open(config_file, "w", encoding="utf-8") as handle:
            json.dump(config.to_dict(), handle)
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "-m",
            "dspark_core.train",
            "--config",
            config_file,
        ]
        return subprocess.call(command)


def run(args: argparse.Namespace) -> int:
    config = resolve_config(args)
    if args.print_config:
        import json

        print(json.dumps(config.to_dict(), indent=2))
        return 0
    config.validate()
    if args.nproc_per_node is not None and args.nproc_per_node > 1 and "WORLD_SIZE" not in os.environ:
        return _launch_torchrun(config, args.nproc_per_node)
    from dspark_core.training.trainer import train

    result = train(config)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"trained {result.step} steps in {result.run_dir}")
        if result.checkpoint is not None:
            print(f"last checkpoint: {result.checkpoint}")
        if result.export_dir is not None:
            print(f"exported draft: {result.export_dir}")
    return 0
