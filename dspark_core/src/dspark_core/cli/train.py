"""``dspark train``: train a DSpark draft for a target (also ``python -m dspark_core.train``).

Every :class:`~dspark_core.training.config.TrainConfig` option is a flag (``--batch-size 8``), the
nested ``draft`` and ``loss`` options included (``--block-size 7``); a ``--config`` file (YAML, TOML or
JSON) gives the defaults and flags override it. Under ``torchrun`` each
rank runs this command; ``--nproc-per-node N`` starts torchrun itself.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import typing
from typing import Any

from dspark_core.training.config import TrainConfig, option_fields

HELP = "train a DSpark draft for a target on a chat dataset (DDP/FSDP under torchrun)"

# Flags whose names differ from the field name (the field's own spelling works too).
_ALIASES = {"output_dir": ("--output", "-o")}
_LIST_METAVARS = {"report_to": "BACKEND"}


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
    groups: dict[str | None, argparse._ArgumentGroup] = {
        None: parser.add_argument_group("training options (see TrainConfig)"),
        "draft": parser.add_argument_group("draft options ([draft] table of a config file)"),
        "loss": parser.add_argument_group("objective options ([loss] table of a config file)"),
    }
    for option in option_fields():
        names = [_flag(option.name), *(_flag(a) for a in option.aliases), *_ALIASES.get(option.name, ())]
        kwargs: dict[str, Any] = {"dest": option.name, "default": argparse.SUPPRESS, "help": option.help}
        if option.hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(option.hint) is list and typing.get_args(option.hint) == (str,):
            kwargs["nargs"] = "+"
            kwargs["metavar"] = _LIST_METAVARS.get(option.name, "PATH")
        else:
            kwargs["metavar"] = option.name.upper()
        groups[option.section].add_argument(*names, **kwargs)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def resolve_config(args: argparse.Namespace) -> TrainConfig:
    """The config from ``--config`` (if any) with every given flag applied over it."""
    overrides = {o.name: getattr(args, o.name) for o in option_fields() if hasattr(args, o.name)}
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
    from dspark_core.training.tracking import check_backends

    check_backends(config.report_to)  # before torch is imported: a missing tracker is one line at once
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
