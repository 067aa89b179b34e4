"""Peak RSS of a bulk job does not grow with the number of inputs (slow: two fresh processes).

Each job embeds a webdataset tar of 384-px JPEGs (about 40 KB each) through ``visreg-hub embed`` in a
fresh process, N and then 4N members. Holding the payloads or the rows of the whole job would add about
3N x 40 KB to the 4N job's peak; a streaming job's peak stays within a few MiB.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.bulk.helpers import ROOT, tiles, write_tar
from tests.fixtures_models import tiny_encoder

pytest.importorskip("pyarrow")

MEASURE = (
    "import resource, sys; from visreg_hub.cli import main; code = main(sys.argv[1:]); "
    "print('PEAK_RSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024); sys.exit(code)"
)


def peak_rss(*argv) -> int:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", MEASURE, *map(str, argv)], env=env, capture_output=True,
                            text=True, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    return int(result.stdout.split("PEAK_RSS")[-1].strip())


@pytest.mark.slow
def test_peak_rss_is_flat_from_n_to_4n_inputs(tmp_path):
    n = 300
    images = [tile.resize((384, 384)) for tile in tiles(4 * n)]
    write_tar(tmp_path / "n.tar", images[:n])
    write_tar(tmp_path / "4n.tar", images)
    payload = (tmp_path / "4n.tar").stat().st_size - (tmp_path / "n.tar").stat().st_size
    model = tmp_path / "model"
    tiny_encoder().save_pretrained(model)
    common = ["--model", model, "--shard-size", 100, "--batch-size", 32, "--no-progress"]
    small = peak_rss("embed", tmp_path / "n.tar", "-o", tmp_path / "out-n", *common)
    large = peak_rss("embed", tmp_path / "4n.tar", "-o", tmp_path / "out-4n", *common)
    manifest = json.loads((tmp_path / "out-4n" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["inputs"]["count"] == 4 * n
    growth = large - small
    print(f"peak RSS: N={n}: {small / 2**20:.1f} MiB, 4N={4 * n}: {large / 2**20:.1f} MiB, "
          f"growth {growth / 2**20:.1f} MiB; the extra 3N payload is {payload / 2**20:.1f} MiB")  # fmt: skip
    assert growth < 0.25 * payload, (small, large, payload)
