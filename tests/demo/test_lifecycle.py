"""The spare demo server, for what the shared one must not do: fill its queue, and stop.

It runs with ``--queue-size 1 --concurrency 1``: a burst of requests gets "queue is full" for some and
answers for the others, and the server serves again afterwards. Stopped with SIGTERM (what systemd and
docker send): it exits 0 and its temporary folder (uploads, Gradio's cache, .npy downloads) is gone.
"""

from __future__ import annotations

import numpy as np
from gradio_client import Client, handle_file

from tests.demo.conftest import EXAMPLES, stop_server


def test_bounded_queue_and_clean_shutdown(
    spare_demo_server, tmp_path, demo_model_dir, demo_model, demo_gallery
):
    server = spare_demo_server
    try:
        client = Client(
            server.url, verbose=False, download_files=str(tmp_path / "client"), analytics_enabled=False
        )
        query = EXAMPLES / "Sandal_384.png"
        gallery_key = str(demo_gallery.resolve())
        jobs = [
            client.submit(str(demo_model_dir), gallery_key, handle_file(str(query)), 5, api_name="/search")
            for _ in range(16)
        ]
        outcomes = []
        for job in jobs:
            try:
                outcomes.append(job.result(timeout=120))
            except Exception as exc:  # the client raises QueueError for a full queue
                outcomes.append(exc)
        refused = [o for o in outcomes if isinstance(o, Exception)]
        answered = [o for o in outcomes if not isinstance(o, Exception)]
        assert refused and answered, outcomes
        assert all("Queue is full" in str(exc) for exc in refused), refused

        # still serving, and the .npy download lands in the run's temporary folder
        _, _, npy_path, *_ = client.predict(
            str(demo_model_dir), handle_file(str(query)), "model default", True, api_name="/extract"
        )
        np.testing.assert_allclose(
            np.load(npy_path), demo_model.encode(query, convert_to_numpy=True), atol=1e-6
        )
        workspaces = list(server.tmpdir.glob("visreg-demo-*"))
        assert len(workspaces) == 1
        assert list((workspaces[0] / "downloads").rglob("*.npy")) and (workspaces[0] / "gradio").is_dir()
        client.close()
    finally:
        code = stop_server(server)
    assert code == 0, server.log()
    assert not list(server.tmpdir.glob("visreg-demo-*")), "the temporary folder was left behind"
    assert "Traceback" not in server.log()
