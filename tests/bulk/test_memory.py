"""Peak RSS of a bulk job does not grow with the number of inputs (slow: two fresh processes).

Each job embeds a webdataset tar of 512-px JPEGs through ``visreg-hub embed`` in a fresh process, N and
then 4N members, and reports the peak RSS of the embedding itself (start-up excluded, see MEASURE).
Holding the payloads or rows of the whole job would add the extra 3N members' bytes to the 4N job's
peak; a streaming job's peak stays within a small fraction of that.
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

# A warm-up job (one image) loads every library and the model; then the kernel's peak-RSS mark is reset
# (clear_refs 5) so VmHWM is the peak of the measured job alone, not of start-up.
MEASURE = """
import re, sys
from pathlib import Path
from visreg_hub.cli import main
argv = sys.argv[1:]
warm = [a if a != argv[argv.index("-o") + 1] else a + "-warm" for a in argv]
warm[1] = sys.argv[-1]
assert main(warm[:-1]) == 0
Path("/proc/self/clear_refs").write_text("5")
code = main(argv[:-1])
peak = re.search(r"VmHWM:\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1)
print("PEAK_RSS", int(peak) * 1024)
sys.exit(code)
"""


def peak_rss(*argv, warm_input) -> int:
    """Peak RSS (bytes) of ``visreg-hub *argv`` after a warm-up run on ``warm_input``."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", MEASURE, *map(str, argv), str(warm_input)], env=env,
                            capture_output=True, text=True, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    return int(result.stdout.split("PEAK_RSS")[-1].strip())


@pytest.mark.slow
def test_peak_rss_is_flat_from_n_to_4n_inputs(tmp_path):
    n = 300
    images = [tile.resize((512, 512)) for tile in tiles(4 * n)]
    write_tar(tmp_path / "n.tar", images[:n])
    write_tar(tmp_path / "4n.tar", images)
    write_tar(tmp_path / "warm.tar", images[:1])
    payload = (tmp_path / "4n.tar").stat().st_size - (tmp_path / "n.tar").stat().st_size
    model = tmp_path / "model"
    tiny_encoder().save_pretrained(model)
    common = ["--model", model, "--shard-size", 100, "--batch-size", 32, "--no-progress"]
    small = peak_rss(
        "embed", tmp_path / "n.tar", "-o", tmp_path / "out-n", *common, warm_input=tmp_path / "warm.tar"
    )
    large = peak_rss(
        "embed", tmp_path / "4n.tar", "-o", tmp_path / "out-4n", *common, warm_input=tmp_path / "warm.tar"
    )
    manifest = json.loads((tmp_path / "out-4n" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["inputs"]["count"] == 4 * n
    growth = large - small
    print(f"peak RSS: N={n}: {small / 2**20:.1f} MiB, 4N={4 * n}: {large / 2**20:.1f} MiB, "
          f"growth {growth / 2**20:.1f} MiB; the extra 3N payload is {payload / 2**20:.1f} MiB")  # fmt: skip
    assert growth < 0.25 * payload, (small, large, payload)
