"""SHA-256 of files: how model, index, shard and cache folders check that a file is the one recorded.

Torch-free on purpose: index and shard tools (``visreg-hub index inspect``, ``index build``) use it and
must not pay for importing torch (several seconds on a small CPU).
"""

from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks so large files never sit in memory twice."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()
