"""The one embedding pipeline: the batch entry points a server's dynamic batcher calls."""

from __future__ import annotations

import pytest
import timm.data
import torch

from tests.fixtures_models import tiny_encoder
from tests.inference import malformed
from visreg_hub.inference import EmbeddingPipeline, TorchBackend, encode


@pytest.fixture(scope="module")
def model():
    return tiny_encoder(seed=3)


def timm_reference(model, images, normalize=True):
    """Independent path: timm's eval transform on decoded PIL images, then model.forward."""
    transform = timm.data.create_transform(**model.data_config)
    with torch.no_grad():
        out = model(torch.stack([transform(image) for image in images]))
    return torch.nn.functional.normalize(out, dim=-1) if normalize else out


def test_embed_batch_reports_bad_items_by_position_and_embeds_the_rest(model, photo_paths):
    photos = [malformed.photo_rgb(p) for p in photo_paths]
    items = [photo_paths[0].read_bytes(), b"not an image", photos[1], photo_paths[0].parent, photos[2]]
    pipeline = EmbeddingPipeline(TorchBackend(model))
    out = pipeline.embed_batch(items)
    assert out.indices == [0, 2, 4]
    assert [f.index for f in out.failures] == [1, 3]
    assert "item 1" in out.failures[0].reason and "one image per item" in out.failures[1].reason
    expected = timm_reference(model, [photos[0], photos[1], photos[2]])
    torch.testing.assert_close(out.embeddings, expected, atol=1e-5, rtol=0)
    # the loop entry point gives the same rows for the same images
    torch.testing.assert_close(encode(model, [photo_paths[0], photos[1], photos[2]]), out.embeddings)


def test_embed_pixels_takes_a_preprocessed_batch_and_checks_its_shape(model, photo_paths):
    backend = TorchBackend(model)
    photos = [malformed.photo_rgb(p) for p in photo_paths]
    pixels = torch.stack([backend.transform(image) for image in photos])  # (4, 3, 28, 28) uint8
    raw = EmbeddingPipeline(backend, normalize=False).embed_pixels(pixels)
    torch.testing.assert_close(raw, timm_reference(model, photos, normalize=False), atol=1e-5, rtol=0)
    assert EmbeddingPipeline(backend).embed_pixels(pixels[:0]).shape == (0, 32)
    with pytest.raises(ValueError, match=r"pixels must be uint8 \(B, 3, 28, 28\)"):
        EmbeddingPipeline(backend).embed_pixels(pixels.float())


def test_embed_batch_of_only_bad_items_returns_an_empty_batch(model):
    out = EmbeddingPipeline(TorchBackend(model)).embed_batch([b"x", "missing.png"])
    assert out.embeddings.shape == (0, 32) and out.indices == [] and [f.index for f in out.failures] == [0, 1]


def test_prefetch_keeps_order_raises_producer_errors_and_stops_when_left():
    from visreg_hub.inference.pipeline import prefetched

    assert list(prefetched(iter(range(50)))) == list(range(50))

    def broken():
        yield from range(3)
        raise OSError("disk gone")

    seen = []
    with pytest.raises(OSError, match="disk gone"):
        for item in prefetched(broken()):
            seen.append(item)
    assert seen == [0, 1, 2]

    produced = []

    def endless():
        while True:
            produced.append(len(produced))
            yield produced[-1]

    for item in prefetched(endless(), depth=2):
        if item == 1:
            break
    assert len(produced) <= 5  # two consumed, at most depth queued and one in the producer's hand


def test_prefetch_returns_without_waiting_on_a_producer_that_is_exiting(monkeypatch):
    """After the producer hands over its end marker the consumer joins it; it never polls the queue."""
    import queue
    import threading
    import time

    from visreg_hub.inference import pipeline

    polls = []

    class SlowToExit(queue.Queue):
        def put(self, item, *args, **kwargs):
            super().put(item, *args, **kwargs)
            if not isinstance(item[0], int):  # the end marker: stay alive a while, as a busy CPU makes it
                time.sleep(0.2)

        def get(self, block=True, timeout=None):
            if timeout is not None:
                polls.append(timeout)
            return super().get(block, timeout)

    monkeypatch.setattr(pipeline.queue, "Queue", SlowToExit)
    assert list(pipeline.prefetched(iter(range(5)))) == list(range(5))
    assert polls == []  # the old loop polled get(timeout=0.05) until the thread ended
    assert not [t for t in threading.enumerate() if t.name == "visreg-decode"]  # joined, not left running


def test_one_batch_is_decoded_without_a_thread_and_several_with_one(model, photo_paths, monkeypatch):
    from visreg_hub.inference import pipeline

    calls = []
    real = pipeline.prefetched

    def counting(batches, *args, **kwargs):
        calls.append(1)
        return real(batches, *args, **kwargs)

    monkeypatch.setattr(pipeline, "prefetched", counting)
    photos = [malformed.photo_rgb(p) for p in photo_paths]
    one = encode(model, photo_paths[0])
    assert calls == []  # one batch: nothing to overlap, no thread
    torch.testing.assert_close(one, timm_reference(model, photos[:1])[0], atol=1e-5, rtol=0)
    several = encode(model, photo_paths, batch_size=1)
    assert calls == [1]
    unthreaded, _ = EmbeddingPipeline(TorchBackend(model)).run(photo_paths, batch_size=1, prefetch=False)
    torch.testing.assert_close(several, unthreaded, atol=0, rtol=0)
    torch.testing.assert_close(several, timm_reference(model, photos), atol=1e-5, rtol=0)


UNUSABLE_DEVICES = ["bogus", "cuda:x", "cuda:99" if torch.cuda.is_available() else "cuda", "meta"]


@pytest.mark.parametrize("device", UNUSABLE_DEVICES)
def test_encode_with_an_unusable_device_is_one_device_error(model, photo_paths, device):
    from visreg_hub.errors import DeviceError, VisregHubError

    with pytest.raises(DeviceError, match=r"device") as info:
        encode(model, photo_paths[:1], device=device)
    assert isinstance(info.value, VisregHubError)
    assert "\n" not in str(info.value)
    # the caller's model is untouched: "meta" used to empty its weights for good
    assert next(model.parameters()).device.type == "cpu"
    assert encode(model, photo_paths[:1]).shape == (1, model.embedding_dim())


def test_from_pretrained_refuses_the_meta_device(model, tmp_path):
    from visreg_hub import from_pretrained
    from visreg_hub.errors import DeviceError

    with pytest.raises(DeviceError, match="holds no data"):
        from_pretrained(model.save_pretrained(tmp_path / "m"), device="meta")
