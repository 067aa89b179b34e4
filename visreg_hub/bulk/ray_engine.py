"""``engine="ray"``: the same shards embedded by a Ray Data job (``pip install 'visreg_hub[ray]'``).

The driver streams the listing once and writes each unfinished shard's plan (its items: file paths, or
tar path + member offsets) to ``OUTDIR/.ray/plan-NNNNN.jsonl``, so the listing lives on disk, not in
memory. A Ray dataset of shard numbers is then mapped by a pool of actors, each holding the model
once: an actor reads a plan, reads tar members by offset, embeds through the same
:class:`~visreg_hub.bulk.runner.ShardEmbedder` and writes the shard atomically, exactly as the local
engine does. Ray supplies scheduling across machines, back-pressure and task retries; resume works as
locally (finished shards are skipped, a re-run redoes the rest). ``OUTDIR`` must be on storage every
Ray node sees. Connects to ``RAY_ADDRESS`` if set, else starts a local Ray instance.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from visreg_hub.bulk import output
from visreg_hub.bulk.listing import Item, iter_items, read_refs
from visreg_hub.errors import require_extra

logger = logging.getLogger(__name__)

PLAN_DIR = ".ray"


def _write_plans(sources: list[str], folder: Path, shard_size: int, todo: set[int], listing) -> None:
    """One plan file per shard in ``todo``; refused if the listing changed since ``listing`` was taken
    (before any shard is embedded, so no shard is written from a shifted plan)."""
    plans = folder / PLAN_DIR
    plans.mkdir(exist_ok=True)
    handle, current = None, -1
    digest, count = hashlib.sha256(), 0
    try:
        for position, item in enumerate(iter_items(sources)):
            digest.update(item.identity())
            count += 1
            shard = position // shard_size
            if shard not in todo:
                continue
            if shard != current:
                if handle is not None:
                    handle.close()
                handle, current = (plans / f"plan-{shard:05d}.jsonl").open("w", encoding="utf-8"), shard
            record = {"path": item.path, "key": item.key, "error": item.error, "refs": item.refs}
            handle.write(json.dumps(record) + "\n")
    finally:
        if handle is not None:
            handle.close()
    if digest.hexdigest() != listing.digest or count != listing.count:
        shutil.rmtree(plans, ignore_errors=True)
        raise output.OutputMismatchError(
            f"the inputs changed while the job was being planned ({listing.count} items listed before, "
            f"{count} now); nothing was embedded; re-run once the inputs are settled"
        )


class _ShardActor:
    """A Ray Data actor: loads the model once, then embeds and writes whole shards."""

    def __init__(self, model: str, folder: str, options: dict[str, Any]) -> None:
        from visreg_hub.bulk.runner import ShardEmbedder
        from visreg_hub.hub import from_pretrained
        from visreg_hub.inference.backends import backend_for
        from visreg_hub.inference.pipeline import EmbeddingPipeline

        net = from_pretrained(model, device=options["device"])
        runner = backend_for(
            net, pooling=options["pooling"], device=options["device"], dtype=options["dtype"]
        )
        pipeline = EmbeddingPipeline(
            runner, normalize=options["normalize"], max_pixels=options["max_pixels"],
            draft_decode=options["draft_decode"],
        )  # fmt: skip
        self.embedder = ShardEmbedder(pipeline, batch_size=options["batch_size"], num_workers=0)
        self.folder = Path(folder)
        self.job_id = options.get("job_id")

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        embedded, failed = [], []
        for shard in batch["shard"]:
            shard = int(shard)
            items = []
            for line in (self.folder / PLAN_DIR / f"plan-{shard:05d}.jsonl").read_text("utf-8").splitlines():
                record = json.loads(line)
                refs = {k: tuple(v) for k, v in record["refs"].items()} if record["refs"] else None
                items.append(Item(path=record["path"], key=record["key"], error=record["error"], refs=refs))
            tars: dict[str, Any] = {}
            try:
                for item in items:
                    if item.key is not None and item.error is None and item.refs:
                        handle = tars.get(item.path) or tars.setdefault(item.path, open(item.path, "rb"))  # noqa: SIM115
                        read_refs(item, handle)
            finally:
                for handle in tars.values():
                    handle.close()
            rows, vectors, failures = self.embedder.embed(items)
            output.write_shard(self.folder, shard, rows=rows, embeddings=vectors, failures=failures,
                               job_id=self.job_id)  # fmt: skip
            embedded.append(len(rows))
            failed.append(len(failures))
        return {"shard": batch["shard"], "embedded": embedded, "failed": failed}


def run_ray(sources, folder: Path, manifest, net, runner, listing, num_shards: int, *, start: float,
            batch_size: int, normalize: bool, max_pixels, device=None, dtype=None, pooling=None,
            draft_decode: bool = False):  # fmt: skip
    """Embed the unfinished shards with Ray Data; returns an :class:`~visreg_hub.bulk.runner.EmbedSummary`."""
    from visreg_hub.bulk.runner import EmbedSummary

    ray = require_extra("ray", "ray")
    shard_size = manifest["shard_size"]
    todo = sorted(set(range(num_shards)) - output.finished_shards(folder, manifest, num_shards))
    model = manifest["model"]["name"]
    if model is None or not Path(model).is_dir():
        model = str(folder / PLAN_DIR / "model")  # actors load a saved copy of an in-memory model
        net.save_pretrained(model)
    _write_plans(sources, folder, shard_size, set(todo), listing)
    embedded = failed = 0
    if todo:
        if not ray.is_initialized():
            ray.init(ignore_reinit_error=True, include_dashboard=False, logging_level=logging.WARNING)
        cpus = int(ray.cluster_resources().get("CPU", 1))
        gpus = int(ray.cluster_resources().get("GPU", 0))
        options = {"device": device, "dtype": dtype, "pooling": pooling, "normalize": normalize,
                   "max_pixels": max_pixels, "batch_size": batch_size,
                   "draft_decode": draft_decode, "job_id": manifest.get("job_id")}  # fmt: skip
        actors = max(1, gpus) if gpus else max(1, cpus // 2)
        dataset = ray.data.from_items([{"shard": s} for s in todo]).map_batches(
            _ShardActor,
            fn_constructor_kwargs={"model": model, "folder": str(folder), "options": options},
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=actors),  # Ray 2.60 deprecates concurrency= for this
            num_gpus=1 if gpus else 0,
            num_cpus=1,
        )
        for row in dataset.iter_rows():
            embedded, failed = embedded + int(row["embedded"]), failed + int(row["failed"])
    complete = output.finalize(folder, manifest, num_shards)
    if complete:  # the plans and the model copy for the actors are only needed to resume
        shutil.rmtree(folder / PLAN_DIR, ignore_errors=True)
    summary = EmbedSummary(folder, embedded, failed, time.perf_counter() - start, len(todo),
                           num_shards - len(todo), complete, output.listed_failures(folder))  # fmt: skip
    logger.info("%s", summary.line())
    return summary
