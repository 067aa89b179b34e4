"""Bulk embedding: folders, file lists and webdataset tar shards -> resumable parquet shards.

    from visreg_hub.bulk import embed_dataset

    out = embed_dataset(["photos/", "more.txt", "shard-0000.tar"], "embeddings/", model="vit-mini-p7-fmnist")

Re-running the same call after a crash continues where it stopped; ``accelerate launch`` splits the
shards across processes and machines; ``engine="ray"`` runs it as a Ray Data job. The CLI is
``visreg-hub embed INPUTS... -o OUTDIR``.
"""

from __future__ import annotations

from visreg_hub._lazy import lazy_exports

_EXPORTS = {
    "EmbedSummary": "visreg_hub.bulk.runner",
    "embed_dataset": "visreg_hub.bulk.runner",
    "run_embedding": "visreg_hub.bulk.runner",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
