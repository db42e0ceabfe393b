"""``python -m dspark_core.train ...``: the ``dspark train`` command as a module, for torchrun.

Example::

    torchrun --nproc_per_node=2 -m dspark_core.train --target ./tiny-target --data demo --output ./runs/demo
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``dspark train`` with ``argv`` (default: the process's arguments); returns the exit code."""
    from dspark_core.cli import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
