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
    with pytest.raises(ApiError) as emptied:
        store.search(np.ones((1, store.dim), dtype=np.float32), 3)
    assert emptied.value.status == 503 and "gallery 'photos' cannot be searched now" in emptied.value.message
    assert str(folders[0]) not in emptied.value.message


def test_a_search_during_a_build_is_answered_at_once(api_and_demo, monkeypatch):
    """API requests share the event loop's small thread pool, so none waits on another thread's build:
    during the first build a search is a 503 with Retry-After, during a rebuild it gets the last index."""
    api, _demo, folders = api_and_demo
    store = api.indexes["photos"]
    started, release = hold_builds(monkeypatch)
    query = np.ones((1, store.dim), dtype=np.float32)

    def build_in_the_background() -> threading.Thread:
        started.clear()
        release.clear()
        builder = threading.Thread(target=store.search, args=(query, 3))
        builder.start()
        assert started.wait(30)
        return builder

    builder = build_in_the_background()
    begin = time.perf_counter()
    with pytest.raises(ApiError) as busy:
        store.search(query, 3)
    assert time.perf_counter() - begin < 1
    assert busy.value.status == 503 and busy.value.headers == {"Retry-After": "5"}
    assert "gallery 'photos' is being indexed" in busy.value.message
    release.set()
    builder.join(30)
    first = store.search(query, 3)
    # a file added: the next look at the folder rebuilds, and searches meanwhile get the last index
    monkeypatch.setattr(demo_service, "RESCAN_S", 0.0)
    shutil.copy2(sorted(folders[0].glob("*/*.png"))[0], folders[0] / "added.png")
    builder = build_in_the_background()
    during = store.search(query, 3)
    assert during.ids.tolist() == first.ids.tolist() and len(store) == 10
    release.set()
    builder.join(30)
    assert len(store) == 11
