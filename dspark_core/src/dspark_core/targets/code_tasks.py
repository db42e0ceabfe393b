"""Code-completion tasks cut from corpus files: a function's signature and docstring as the prompt,
its body as the reference answer.

Used twice: mixed into the embedded target's pretraining (so the target learns to answer in the
chat format), and as the demo data's prompts (whose answers the target then regenerates itself).
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from dspark_core.targets.corpus import CorpusFile

#: The user turn's instruction, before the code.
PROMPT_PREFIX = "Complete this Python function:\n"
MAX_PROMPT_CHARS = 1200
MAX_BODY_CHARS = 1500
MIN_BODY_LINES = 2
#: Bumped whenever the prompt or answer layout changes, so earlier builds are not reused.
CODE_TASK_FORMAT = 2


@dataclass(frozen=True)
class CodeTask:
    """One function: where it came from, the prompt shown to the model and the real body."""

    source: str  # "relative/path.py:line"
    prompt: str
    body: str

    def messages(self, *, with_answer: bool) -> list[dict[str, str]]:
        """The task as chat turns; the assistant turn holds the real body when ``with_answer``."""
        turns = [{"role": "user", "content": self.prompt}]
        if with_answer:
            turns.append({"role": "assistant", "content": self.body})
        return turns


def _task(node: ast.FunctionDef | ast.AsyncFunctionDef, lines: list[str], where: str) -> CodeTask | None:
    if ast.get_docstring(node) is None or len(node.body) < 2 or node.end_lineno is None:
        return None
    docstring_end = node.body[0].end_lineno
    body_start = node.body[1].lineno
    if docstring_end is None or body_start <= docstring_end:
        return None
    first = node.lineno - 1 - len(node.decorator_list)
    indent = len(lines[first]) - len(lines[first].lstrip())
    # Methods are shown dedented, as if they were top-level functions.
    cut = [line[indent:] if not line[:indent].strip() else line.lstrip() for line in lines]
    head = "\n".join(cut[first:docstring_end])
    body = "\n".join(cut[docstring_end : node.end_lineno]).lstrip("\n")
    if body.count("\n") + 1 < MIN_BODY_LINES or len(head) > MAX_PROMPT_CHARS or len(body) > MAX_BODY_CHARS:
        return None
    # Code goes in fences: the reply then starts with "```", never with indentation that byte-level
    # BPE would merge into the generation prompt's newline (a token the model never saw there).
    prompt = f"{PROMPT_PREFIX}```python\n{head.rstrip()}\n```"
    return CodeTask(where, prompt, f"```python\n{body.rstrip()}\n```")


def tasks_from_source(text: str, relative_path: str) -> list[CodeTask]:
    """Every documented function (methods included) in one file, in source order."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):  # a few stdlib files are deliberately not valid Python 3.11
        return []
    lines = text.splitlines()
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            task = _task(node, lines, f"{relative_path}:{node.lineno}")
            if task is not None:
                found.append(task)
    found.sort(key=lambda t: int(t.source.rsplit(":", 1)[1]))
    return found


def code_tasks(files: Iterable[CorpusFile]) -> Iterator[CodeTask]:
    """The tasks of each file, files in the order given."""
    for f in files:
        yield from tasks_from_source(f.read(), f.relative_path)
