"""demo.gallery_api in-process: which index names and models the demo's galleries get in its API, and
what a gallery index answers when its folder changes under it."""

from __future__ import annotations

import shutil
import threading
import time

import numpy as np
import pytest

from demo import service as demo_service
from demo.server import combined_app
from demo.service import DemoService
from tests.demo.conftest import EXAMPLES, copy_gallery, hold_builds
from visreg_hub.inference import list_image_files
from visreg_hub.serving.service import ApiError


@pytest.fixture
def api_and_demo(demo_model_dir, tmp_path):
    """The combined app's API service over the operator's model and three galleries: two folders named
    ``photos`` and one named like a bundled gallery's key."""
    folders = [tmp_path / "a" / "photos", tmp_path / "b" / "photos", tmp_path / "c" / "bundled"]
    for folder in folders:
        copy_gallery(folder, per_class=1)
    demo = DemoService([str(demo_model_dir)], folders, cache_dir=tmp_path / "cache",
                       download_dir=tmp_path / "downloads")  # fmt: skip
    api = combined_app(demo).state.service
    try:
        yield api, demo, folders
    finally:
        api.close()


def test_galleries_are_named_without_server_paths_and_paired_as_the_page_pairs_them(
    api_and_demo, demo_model_dir
):
    api, _demo, folders = api_and_demo
    assert list(api.indexes) == ["photos", "photos-2", "bundled-2", "bundled-photos", "bundled"]
    assert api.index_models == {
        "photos": demo_model_dir.name, "photos-2": demo_model_dir.name, "bundled-2": demo_model_dir.name,
        "bundled-photos": "vit-tiny-p8-colour", "bundled": "vit-tiny-p4-fmnist",
    }  # fmt: skip
    store = api.indexes["photos-2"]
    assert store.read_only_reason and store.dim == api.runtimes[demo_model_dir.name].embedding_dim
    with pytest.raises(ApiError) as refused:
        api.writable_index("photos-2")
    assert refused.value.status == 403 and "read-only" in refused.value.message
    # the second "photos" is the second folder: hits against a numpy brute force over encode() of its files
    model = api.runtimes[demo_model_dir.name].model
    files = list_image_files(folders[1])
    good = [i for i, f in enumerate(files) if f.parent.name != "broken"]
    scores = model.encode([files[i] for i in good], convert_to_numpy=True) @ model.encode(
        EXAMPLES / "Bag_320.png", convert_to_numpy=True
    )
    order = np.argsort(-scores)[:3]
    query = model.encode(EXAMPLES / "Bag_320.png", normalize=False, convert_to_numpy=True)  # any length
    result = store.search(query[None, :], 3)
    assert result.ids[0].tolist() == [good[j] for j in order]
    np.testing.assert_allclose(result.scores[0], scores[order], atol=1e-5)
    assert [m["path"] for m in result.metadata[0]] == [
        files[good[j]].relative_to(folders[1]).as_posix() for j in order
    ]


def test_a_gallery_emptied_under_the_server_is_a_503_naming_why(api_and_demo, monkeypatch):
    api, _demo, folders = api_and_demo
    store = api.indexes["photos"]
    assert len(store) == 10  # one image per class; the truncated file is left out
    monkeypatch.setattr(demo_service, "RESCAN_S", 0.0)  # list the folder again on every use
    for child in folders[0].iterdir():
        shutil.rmtree(child)
    # the look at the folder runs in the background: the last index answers until it has failed
    deadline = time.monotonic() + 30
    with pytest.raises(ApiError) as emptied:
        while time.monotonic() < deadline:
            store.search(np.ones((1, store.dim), dtype=np.float32), 3)
            time.sleep(0.05)
    assert emptied.value.status == 503 and "gallery 'photos' cannot be searched now" in emptied.value.message
    assert str(folders[0]) not in emptied.value.message


def test_a_search_during_a_build_is_answered_at_once(api_and_demo, monkeypatch):
    """API requests share the event loop's small thread pool, so none lists, loads or builds a gallery in
    its own thread (probe: the request that started a build was held for the whole build, past the
    request timeout): the work runs in a background thread; a search waits BACKGROUND_WAIT_S at most,
    then is a 503 with Retry-After during the first build, and gets the last index during a rebuild."""
    api, _demo, folders = api_and_demo
    store = api.indexes["photos"]
    started, release = hold_builds(monkeypatch)
    builders: list[str] = []
    held = demo_service.load_or_build
    monkeypatch.setattr(
        demo_service,
        "load_or_build",
        lambda *a, **k: (builders.append(threading.current_thread().name), held(*a, **k))[1],
    )
    monkeypatch.setattr(demo_service, "BACKGROUND_WAIT_S", 0.3)
    query = np.ones((1, store.dim), dtype=np.float32)

    def answered(call, seconds: float = 30.0):
        deadline = time.monotonic() + seconds
        while True:
            try:
                return call()
            except ApiError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    for _ in range(2):  # the search that starts the build is answered too, not held for the build
        begin = time.perf_counter()
        with pytest.raises(ApiError) as busy:
            store.search(query, 3)
        assert time.perf_counter() - begin < 1.5
        assert busy.value.status == 503 and busy.value.headers == {"Retry-After": "5"}
        assert "gallery 'photos' is being indexed" in busy.value.message
    assert started.wait(30) and builders == ["gallery-index-photos"]  # one build, in the background
    release.set()
    first = answered(lambda: store.search(query, 3))
    # a file added: the next look at the folder rebuilds, and searches meanwhile get the last index
    started.clear()
    release.clear()
    monkeypatch.setattr(demo_service, "RESCAN_S", 0.0)
    shutil.copy2(sorted(folders[0].glob("*/*.png"))[0], folders[0] / "added.png")
    begin = time.perf_counter()
    during = store.search(query, 3)
    assert time.perf_counter() - begin < 1.5 and started.wait(30)
    assert during.ids.tolist() == first.ids.tolist() and len(store) == 10
    release.set()
    deadline = time.monotonic() + 30
    while len(store) != 11 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(store) == 11 and builders == ["gallery-index-photos"] * 2


def test_the_index_list_shows_a_gallery_that_cannot_be_searched_beside_the_others(
    demo_model_dir, tmp_path, monkeypatch
):
    """Probe: GET /v1/indexes was one 503 while any gallery was being built (minutes for a large one) or
    had been emptied, hiding every other index. Each gallery is listed now, one that cannot be searched
    with its status and why; the single GET /v1/indexes/{name} of that one stays a 503."""
    import httpx

    from tests.serving.helpers import ThreadServer

    folders = [tmp_path / "a" / "photos", tmp_path / "b" / "soon-empty"]
    for folder in folders:
        copy_gallery(folder, per_class=1)
    demo = DemoService([str(demo_model_dir)], folders, cache_dir=tmp_path / "cache",
                       download_dir=tmp_path / "downloads")  # fmt: skip
    monkeypatch.setattr(demo_service, "BACKGROUND_WAIT_S", 0.1)
    started, release = hold_builds(monkeypatch)
    app = combined_app(demo)
    with ThreadServer(app) as server, httpx.Client(base_url=server.url, timeout=60) as http:

        def listing() -> dict[str, dict]:
            answer = http.get("/v1/indexes")
            assert answer.status_code == 200, answer.text
            return {info["name"]: info for info in answer.json()["data"]}

        building = listing()  # every build is held: each gallery is listed as being built
        assert started.is_set() and list(building) == ["photos", "soon-empty", "bundled-photos", "bundled"]
        for info in building.values():
            assert (info["status"], info["count"], info["metric"]) == ("building", None, None), info
            assert "is being indexed" in info["problem"] and info["dim"] > 0
        release.set()
        deadline = time.monotonic() + 120
        while any(i["status"] != "ready" for i in listing().values()) and time.monotonic() < deadline:
            time.sleep(0.2)
        ready = listing()
        assert (
            ready["photos"]["count"] == ready["soon-empty"]["count"] == 10
            and ready["photos"]["problem"] is None
        )
        monkeypatch.setattr(demo_service, "RESCAN_S", 0.0)
        for child in folders[1].iterdir():
            shutil.rmtree(child)
        while listing()["soon-empty"]["status"] == "ready" and time.monotonic() < deadline:
            time.sleep(0.1)
        after = listing()
        assert after["soon-empty"]["status"] == "unavailable" and after["soon-empty"]["count"] is None
        assert "cannot be searched now" in after["soon-empty"]["problem"]
        assert str(folders[1]) not in after["soon-empty"]["problem"]
        assert after["photos"]["status"] == "ready" and after["photos"]["count"] == 10  # the others as before
        single = http.get("/v1/indexes/soon-empty")
        assert single.status_code == 503 and single.json()["error"]["code"] == "index_unavailable"
