"""``engine="ray"`` on a local Ray instance equals the local engine (slow: Ray's start-up takes about
half a minute on a 2-core machine, more than the default run can spend)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.bulk.helpers import failures, read_output, tiles, write_tar, write_tile_folder
from tests.fixtures_models import tiny_encoder
from visreg_hub.bulk import run_embedding
from visreg_hub.bulk.output import done_shards

pytest.importorskip("pyarrow")


@pytest.mark.slow
def test_ray_engine_equals_local_engine_and_resumes(tmp_path):
    ray = pytest.importorskip("ray")
    write_tile_folder(tmp_path / "imgs", 120)
    write_tar(tmp_path / "s.tar", list(tiles(30)), corrupt={3})
    inputs = [tmp_path / "imgs", tmp_path / "s.tar"]
    model = tiny_encoder()
    local = run_embedding(inputs, tmp_path / "local", model=model, shard_size=40)
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    try:
        # a half-finished job: shard 1 done by the local engine, the rest left to Ray
        run_embedding(inputs, tmp_path / "ray", model=model, shard_size=40, rank=1, world_size=3)
        assert done_shards(tmp_path / "ray") == {1}
        summary = run_embedding(inputs, tmp_path / "ray", model=model, shard_size=40, engine="ray")
    finally:
        ray.shutdown()
    assert summary.complete and (summary.shards_written, summary.shards_skipped) == (3, 1)
    rows, vectors, records = read_output(tmp_path / "ray")
    want_rows, want_vectors, want_records = read_output(tmp_path / "local")
    assert rows == want_rows and records == want_records  # same rows, side metadata included
    np.testing.assert_array_equal(vectors, want_vectors)
    assert failures(tmp_path / "ray") == failures(tmp_path / "local")
    assert local.embedded == len(rows) == 149
    assert not (tmp_path / "ray" / ".ray").exists()  # plans and the model copy go once complete
