"""A digest of the training rows, so a resume can tell that the data changed since the checkpoint."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from dspark_core.training.data.rows import Example, PackedRow

__all__ = ["dataset_fingerprint"]


def dataset_fingerprint(rows: Sequence[Example] | Sequence[PackedRow]) -> str:
    """A SHA-256 of every row's tokens and mask (and documents), to tell a changed dataset on resume."""

    digest = hashlib.sha256()
    for row in rows:
        digest.update(len(row.input_ids).to_bytes(8, "little"))
        digest.update(b"".join(int(t).to_bytes(4, "little", signed=True) for t in row.input_ids))
        digest.update(bytes(row.loss_mask))
        if isinstance(row, PackedRow):
            digest.update(b"".join(int(d).to_bytes(4, "little", signed=True) for d in row.document_ids))
    return digest.hexdigest()
