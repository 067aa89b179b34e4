"""benchmarks/serve_fairness.py --dry-run: the mixed load (one large-request client, small-request clients)
runs end to end against a real server of this checkout, so the script cannot rot."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_dry_run_measures_small_requests_beside_a_large_client():
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "serve_fairness.py"), "--dry-run"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    [row] = [line for line in done.stdout.splitlines() if line.startswith("| this checkout")]
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    p50, p99, small, large_rate = float(cells[2]), float(cells[3]), int(cells[4]), float(cells[5])
    assert small > 0 and 0 < p50 <= p99 and large_rate > 0 and cells[6] == "0", row
    assert "wrote" not in done.stdout  # a dry run leaves docs/benchmarks.md alone
