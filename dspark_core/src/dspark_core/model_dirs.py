"""Checks on local model directories and their ``config.json``, shared by every command (torch-free).

Nothing is downloaded: a path that is not a directory is "no such directory", never a Hub repo id.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from dspark_core.errors import DraftConfigError, DSparkError

__all__ = [
    "ModelDirectoryError",
    "architectures_of",
    "check_fits_positions",
    "file_sha256",
    "require_model_dir",
]


class ModelDirectoryError(DSparkError, FileNotFoundError):
    """A model directory is missing or lacks its ``config.json``."""


def require_model_dir(path: str | Path, what: str) -> Path:
    """``path`` as a directory holding ``config.json``; ``what`` names it in the error (``--target``)."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ModelDirectoryError(f"{what} {path}: no such directory (a local model directory is required)")
    if not (folder / "config.json").is_file():
        raise ModelDirectoryError(f"{what} {path}: no config.json in the directory; is it a saved model?")
    return folder


def architectures_of(config: Any, source: str | Path) -> list[str]:
    """``config.architectures`` as a list; a bare string is refused, as the registry refuses it."""
    value = getattr(config, "architectures", None)
    if isinstance(value, str):
        raise DraftConfigError(
            f"{source}: `architectures` is the string {value!r}; write a list, "
            f'"architectures": [{json.dumps(value)}]'
        )
    return [str(a) for a in (value or [])]


def text_config_of(config: Any) -> Any:
    """A model config's text part (``get_text_config()`` of a multimodal config; itself otherwise)."""
    get_text_config = getattr(config, "get_text_config", None)
    return get_text_config() if callable(get_text_config) else config


def check_fits_positions(prompt_tokens: int, max_new_tokens: int, config: Any, source: str) -> None:
    """Refuse a prompt that, with ``max_new_tokens``, runs past the target's ``max_position_embeddings``."""
    limit = getattr(text_config_of(config), "max_position_embeddings", None)
    if isinstance(limit, int) and prompt_tokens + max_new_tokens > limit:
        raise DraftConfigError(
            f"{source}: a prompt of {prompt_tokens} tokens plus max_new_tokens {max_new_tokens} exceeds the "
            f"target's max_position_embeddings {limit}; shorten the prompt or lower --max-new-tokens"
        )


def file_sha256(path: Path) -> str:
    """The hex SHA-256 of a file, read in 1 MiB blocks (weights files are large)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()
