"""Real images for bulk tests: tiles cut at test time from the committed photos, tar shards, readers."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
PHOTOS = sorted((ROOT / "tests" / "fixtures" / "photos").glob("*.jpg"))


def tiles(count: int, size: int = 20, step: int = 3):
    """``count`` distinct real RGB crops (size x size) from the fixture photos, deterministic.

    Overlapping crops at a small stride, round-robin over the four photos: about 5,000 different images.
    """
    sources = [Image.open(p).convert("RGB") for p in PHOTOS]
    grids = [
        [(x, y) for y in range(0, im.height - size + 1, step) for x in range(0, im.width - size + 1, step)]
        for im in sources
    ]
    if count > sum(len(g) for g in grids):
        raise ValueError(f"the fixtures give at most {sum(len(g) for g in grids)} tiles of {size} px")
    made = 0
    for position in range(max(len(g) for g in grids)):
        for image, grid in zip(sources, grids, strict=True):
            if position < len(grid):
                x, y = grid[position]
                yield image.crop((x, y, x + size, y + size))
                made += 1
                if made == count:
                    return


def write_tile_folder(folder: Path, count: int, *, nested: bool = True) -> list[Path]:
    """PNG tiles under ``folder`` (every 5th in a sub-folder); returns the paths in listing order."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, tile in enumerate(tiles(count)):
        sub = folder / "sub" if nested and i % 5 == 0 else folder
        sub.mkdir(exist_ok=True)
        path = sub / f"t{i:05d}.png"
        tile.save(path)
        paths.append(path)
    return paths


def write_tar(path: Path, images, *, side: bool = True, corrupt: set[int] = frozenset()) -> list[str]:
    """A webdataset shard: ``k.jpg`` (+ ``k.json``, ``k.cls``); members in ``corrupt`` hold garbage."""
    keys = []
    with tarfile.open(path, "w") as tar:
        for i, image in enumerate(images):
            key = f"sample{i:04d}"
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=90)
            payload = b"\xff\xd8 not really a jpeg" if i in corrupt else buffer.getvalue()
            members = [(f"{key}.jpg", payload)]
            if side:
                members += [(f"{key}.json", json.dumps({"i": i, "caption": f"tile {i}"}).encode()),
                            (f"{key}.cls", str(i % 3).encode())]  # fmt: skip
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            keys.append(key)
    return keys


def read_output(folder: Path) -> tuple[list[tuple[str, str | None]], np.ndarray, list[dict]]:
    """(row identities (path, key), embeddings (N, E), parquet rows as dicts) over all shards in order."""
    import pyarrow.parquet as pq

    rows, vectors, records = [], [], []
    for part in sorted(folder.glob("part-*.parquet")):
        table = pq.read_table(part)
        column = table.column("embedding").combine_chunks()
        vectors.append(column.flatten().to_numpy().reshape(len(column), column.type.list_size))
        for record in table.drop(["embedding"]).to_pylist():
            rows.append((record["path"], record["key"]))
            records.append(record)
    return rows, np.concatenate(vectors), records


def failures(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "failures.jsonl").read_text().splitlines()]


def cli(*argv, env: dict | None = None, **kwargs) -> subprocess.Popen:
    """Start ``python -m visreg_hub.cli ...`` with this checkout first on the path."""
    environment = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "visreg_hub.cli", *map(str, argv)], env=environment,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)  # fmt: skip
