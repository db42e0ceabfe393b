"""Third-party output at the CLI boundary: transformers' log records become one line each.

transformers logs multi-line tables (the LOAD REPORT of missing or unexpected weights) and long
advice ("You are using a model of type ..."), and draws progress bars while loading and saving
weights. Under the CLI's one-line-per-problem policy each record is printed as
``warning: transformers: <first line>`` (a load report as its counts), and progress bars are off;
``--verbose`` leaves transformers' own output as it is. Not a subcommand: :func:`cli.main` uses it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import re
import sys
from collections.abc import Callable, Iterator

__all__ = ["OneLineLogHandler", "one_line", "routed_library_output"]

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_REPORT_STATUSES = ("MISSING", "UNEXPECTED", "MISMATCH", "CONVERSION")


def one_line(record: logging.LogRecord) -> str:
    """``<level>: <library>: <message>`` on one line; a load report becomes its counts."""
    lines = [line.strip() for line in _ANSI.sub("", record.getMessage()).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    if "LOAD REPORT" in text:
        text = _summarise_load_report(lines)
    elif len(lines) > 1:
        text += f" (and {len(lines) - 1} more lines: run with --verbose to see them)"
    level = "error" if record.levelno >= logging.ERROR else "warning"
    library = record.name.partition(".")[0]
    return f"{level}: {library}: {' '.join(text.split())}"


def _summarise_load_report(lines: list[str]) -> str:
    # Table rows look like "key | STATUS | details"; the notes below the table are not counted.
    counts = dict.fromkeys(_REPORT_STATUSES, 0)
    for line in lines[1:]:
        cells = [cell.strip() for cell in line.split("|")]
        for status in _REPORT_STATUSES:
            if len(cells) > 1 and status in cells[1:]:
                counts[status] += 1
    found = ", ".join(f"{n} {status.lower()}" for status, n in counts.items() if n)
    return f"{lines[0].rstrip(':')}: {found or 'see the table'} key(s) (run with --verbose for the table)"


class OneLineLogHandler(logging.Handler):
    """Prints each record as :func:`one_line` on the current ``sys.stderr``."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            print(one_line(record), file=sys.stderr, flush=True)
        except Exception:
            self.handleError(record)


@contextlib.contextmanager
def routed_library_output(*, verbose: bool) -> Iterator[None]:
    """Within the block, transformers' records go through :class:`OneLineLogHandler` and its progress
    bars are off; with ``verbose`` (or without transformers) nothing changes."""
    if verbose or importlib.util.find_spec("transformers") is None:
        yield
        return
    from transformers.utils import logging as hf_logging

    root = hf_logging.get_logger()  # the library's root logger, with its default handler installed
    previous = list(root.handlers)
    bars = hf_logging.is_progress_bar_enabled()
    handler = OneLineLogHandler(level=logging.WARNING)
    # Untyped in transformers: called through typed names.
    disable_bars: Callable[[], None] = hf_logging.disable_progress_bar
    enable_bars: Callable[[], None] = hf_logging.enable_progress_bar
    for old in previous:
        root.removeHandler(old)
    root.addHandler(handler)
    disable_bars()
    try:
        yield
    finally:
        root.removeHandler(handler)
        for old in previous:
            root.addHandler(old)
        if bars:
            enable_bars()
