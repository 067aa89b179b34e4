"""Training data: readers on real images, long-tailed subsampling, the global-batch sampler, shards.

Expected values are computed independently in the tests (PIL reference pipeline, the long-tail formula
written out, the global batch as a slice of the seeded permutation).
"""

from __future__ import annotations

import hashlib
import io
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training.config import LongTailSection, load_config
from training.data import (
    GlobalBatchSampler,
    MultiCropCollate,
    batch_seed,
    build_data,
    class_groups,
    cut_views,
    long_tail_indices,
)
from training.datasets import (
    ImageSet,
    read_filelist,
    read_fmnist,
    read_npz,
    scan_folder,
    to_base_tensor,
)
from training.shards import InPositionOrder, PositionedCollate, ShardSet, ShardStream, round_robin_positions
from visreg_hub.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
FIXTURE_CONFIG = REPO / "training" / "configs" / "fmnist-fixture-cpu.yaml"


def _write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_image_folder_layout_gives_labels_and_lossless_pixels(tmp_path, fmnist_train):
    images, labels = fmnist_train
    for i in range(9):
        _write_png(tmp_path / f"class_{labels[i]}" / ("nested" if i % 2 else "") / f"{i}.png", images[i])
    paths, found_labels, names = scan_folder(tmp_path)
    assert names == sorted({f"class_{label}" for label in labels[:9]})
    assert len(paths) == 9
    dataset = ImageSet(paths, found_labels, channels=1, base_size=28)
    for index, path in enumerate(paths):
        original = images[int(path.stem)]
        assert names[dataset.label(index)] == f"class_{labels[int(path.stem)]}"
        image, used = dataset.load(index)
        assert used == index and torch.equal(image[0], torch.from_numpy(original))


def test_an_undecodable_labelled_image_is_replaced_together_with_its_label(tmp_path, fmnist_train):
    """Probe 15: the next image's pixels came back under the broken file's own label, so at a class
    boundary the kNN bank and the online probe saw one class's pixels labelled as another."""
    images, _ = fmnist_train
    _write_png(tmp_path / "a" / "a0.png", images[0])
    (tmp_path / "a" / "zz.png").write_bytes(b"not a png")
    _write_png(tmp_path / "b" / "b0.png", images[1])
    paths, labels, names = scan_folder(tmp_path)
    assert [p.name for p in paths] == ["a0.png", "zz.png", "b0.png"]
    image, label, _ = ImageSet(paths, labels, channels=1, base_size=28)[1]
    assert torch.equal(image[0], torch.from_numpy(images[1])) and names[label] == "b"


def test_flat_folder_is_unlabelled_and_recursive(tmp_path, fmnist_train):
    images, _ = fmnist_train
    _write_png(tmp_path / "a.png", images[0])
    _write_png(tmp_path / "sub" / "b.png", images[1])
    paths, labels, _ = scan_folder(tmp_path)
    assert [p.name for p in paths] == ["a.png", "b.png"] and labels is None


def test_file_list_relative_paths_string_labels_and_comments(tmp_path, fmnist_train):
    images, _ = fmnist_train
    for i in range(3):
        _write_png(tmp_path / "imgs" / f"{i}.png", images[i])
    listing = tmp_path / "train.txt"
    listing.write_text(
        "# path label\nimgs/0.png\tshirt\nimgs/1.png boot\n\n" + f"{tmp_path}/imgs/2.png shirt\n"
    )
    paths, labels, names = read_filelist(listing)
    assert paths == [tmp_path / "imgs" / f"{i}.png" for i in range(3)]
    assert names == ["boot", "shirt"] and labels.tolist() == [1, 0, 1]
    listing.write_text("imgs/0.png 3\nimgs/1.png\n")
    with pytest.raises(ConfigError, match="some lines have a label and some do not"):
        read_filelist(listing)


def test_photo_is_resized_on_the_shorter_side_and_centre_cropped(photo_paths):
    path = photo_paths[0]
    reference = Image.open(path).convert("RGB")
    width, height = reference.size
    scale = 48 / min(width, height)
    size = (max(48, round(width * scale)), max(48, round(height * scale)))
    reference = reference.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    left, top = (size[0] - 48) // 2, (size[1] - 48) // 2
    expected = np.asarray(reference.crop((left, top, left + 48, top + 48))).transpose(2, 0, 1)
    assert torch.equal(to_base_tensor(path, 3, 48), torch.from_numpy(expected.copy()))
    gray = to_base_tensor(path, 1, 48)
    assert gray.shape == (1, 48, 48) and gray.dtype == torch.uint8


def test_npz_and_grayscale_to_rgb(fixtures_dir):
    images, labels = read_npz(fixtures_dir / "fmnist_train_500.npz")
    assert images.shape == (500, 28, 28) and labels.shape == (500,)
    rgb, _ = ImageSet(images, labels, channels=3, base_size=28).load(7)
    assert (
        rgb.shape == (3, 28, 28)
        and torch.equal(rgb[0], rgb[2])
        and torch.equal(rgb[0], torch.from_numpy(images[7]))
    )


@pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="dataset-fashion-mnist missing"
)
def test_debian_fashion_mnist_reader():
    images, labels = read_fmnist("/usr/share/datasets/fashion-mnist", "test")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [1000] * 10


def test_pareto_long_tail_follows_the_formula_and_is_seeded():
    labels = np.repeat(np.arange(10), 300)
    spec = LongTailSection(enabled=True, profile="pareto", imbalance_ratio=50.0, max_per_class=200, seed=3)
    kept, info = long_tail_indices(labels, spec)
    alpha = math.log(50.0) / math.log(10)
    expected = sorted((int(200 * (r + 1) ** -alpha) for r in range(10)), reverse=True)
    assert sorted(info.counts.values(), reverse=True) == expected
    assert np.bincount(labels[kept], minlength=10).tolist() == [info.counts[c] for c in range(10)]
    again, _ = long_tail_indices(labels, spec)
    assert np.array_equal(kept, again)
    _, other_info = long_tail_indices(labels, LongTailSection(**{**spec.__dict__, "seed": 4}))
    assert other_info.counts != info.counts  # another seed puts other classes at the head


def test_exponential_long_tail_reaches_the_imbalance_ratio():
    labels = np.repeat(np.arange(5), 400)
    spec = LongTailSection(enabled=True, profile="exponential", imbalance_ratio=16.0, max_per_class=320)
    _, info = long_tail_indices(labels, spec)
    assert sorted(info.counts.values()) == [20, 40, 80, 160, 320]


def test_class_groups_use_imagenet_lt_thresholds_scaled_for_small_sets():
    counts = {0: 1280, 1: 101, 2: 100, 3: 20, 4: 19, 5: 5}
    info = class_groups(counts)
    assert (info.many_threshold, info.few_threshold) == (100, 20)
    assert [info.groups[c] for c in range(6)] == ["many", "many", "medium", "medium", "few", "few"]
    # Smaller sets: the same log-scale positions between n_min and n_max as 100 and 20 between 5 and 1280.
    small = class_groups({0: 640, 1: 95, 2: 94, 3: 28, 4: 27, 5: 10})
    ratio = 640 / 10
    expected = (
        round(10 * ratio ** (math.log(100 / 5) / math.log(1280 / 5))),
        round(10 * ratio ** (math.log(20 / 5) / math.log(256))),
    )
    assert (small.many_threshold, small.few_threshold) == expected == (95, 28)
    assert [small.groups[c] for c in range(6)] == ["many", "medium", "medium", "medium", "few", "few"]
    assert class_groups({0: 30, 1: 30}).groups == {
        0: "medium",
        1: "medium",
    }  # balanced: nothing is many or few


@pytest.mark.parametrize("world,accumulation,per_device", [(1, 1, 24), (2, 3, 4), (4, 1, 6)])
def test_global_batch_is_the_same_whatever_the_process_count(world, accumulation, per_device):
    order = torch.randperm(100, generator=torch.Generator().manual_seed(5 * 1_000_003 + 2)).tolist()
    per_rank = [
        list(GlobalBatchSampler(100, per_device, world, rank, accumulation, seed=5, epoch=2))
        for rank in range(world)
    ]
    assert all(len(batches) == 4 * accumulation for batches in per_rank)
    for step in range(4):
        seen = []
        for rank in range(world):
            for micro in range(accumulation):
                keys = per_rank[rank][step * accumulation + micro]
                assert {seed for _, seed in keys} == {batch_seed(5, 2, step, micro, rank)}
                seen += [index for index, _ in keys]
        assert sorted(seen) == sorted(order[step * 24 : (step + 1) * 24])
    resumed = list(GlobalBatchSampler(100, per_device, world, 0, accumulation, seed=5, epoch=2, start_step=3))
    assert resumed == per_rank[0][3 * accumulation :]


def test_workers_and_device_paths_cut_identical_views(fmnist_train):
    config = load_config(FIXTURE_CONFIG)
    images = torch.from_numpy(fmnist_train[0][:8]).unsqueeze(1)
    samples = [(images[i], i, 1234) for i in range(8)]
    on_workers = MultiCropCollate(config.augment, cut=True)(samples)
    raw = MultiCropCollate(config.augment, cut=False)(samples)
    global_views, local_views = cut_views(raw["images"], raw["seed"], config.augment)
    assert torch.equal(on_workers["global_views"], global_views)
    assert torch.equal(on_workers["local_views"], local_views)
    assert global_views.shape == (2, 8, 1, 28, 28) and local_views.shape == (2, 8, 1, 16, 16)
    other, _ = cut_views(raw["images"], 1235, config.augment)
    assert not torch.equal(other, global_views)


def test_build_data_carves_a_balanced_validation_split_before_the_long_tail():
    config = load_config(
        FIXTURE_CONFIG,
        [f"data.path={REPO}/tests/fixtures/fmnist_train_500.npz", "data.long_tail.enabled=true",
         "data.long_tail.imbalance_ratio=10", "data.long_tail.max_per_class=30", "eval.knn_bank_size=50"],
    )  # fmt: skip
    data = build_data(config)
    assert len(data.val) == 100
    assert sorted(data.long_tail.counts.values(), reverse=True)[0] == 30
    assert len(data.train) == sum(data.long_tail.counts.values())
    assert len(data.bank) == 50 and data.has_labels and data.num_classes == 10
    train_keys = {hashlib.md5(image.tobytes()).hexdigest() for image in data.train.items}
    val_keys = {hashlib.md5(image.tobytes()).hexdigest() for image in data.val.items}
    assert not train_keys & val_keys


# ------------------------------------------------------------------------------------------ shards
@pytest.fixture()
def shard_folder(tmp_path, fmnist_train):
    images, labels = fmnist_train
    start = 0
    for shard, count in enumerate((10, 7, 13)):
        with tarfile.open(tmp_path / f"train-{shard:03d}.tar", "w") as tar:
            for i in range(start, start + count):
                buffer = io.BytesIO()
                Image.fromarray(images[i]).save(buffer, format="PNG")
                for suffix, payload in (("png", buffer.getvalue()), ("cls", str(labels[i]).encode())):
                    info = tarfile.TarInfo(f"sample{i:05d}.{suffix}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        start += count
    return tmp_path


def _stream(shards: ShardSet, rank: int, world: int, workers: int, skip: int = 0, ordered: bool = True):
    counts = shards.batches_per_worker(shards.assignment(0, 7, rank, world, workers), 3)
    total = sum(counts)
    seeds = list(range(1000 * rank, 1000 * rank + total))
    stream = ShardStream(shards, seeds, 0, 7, rank, world, workers, 3, skip, total)
    collate = PositionedCollate(lambda samples: {"samples": samples})
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers, collate_fn=collate)
    return seeds, list(InPositionOrder(loader, skip) if ordered else loader)


def test_shards_are_counted_labelled_and_split_across_ranks_and_workers(shard_folder, fmnist_train):
    shards = ShardSet.scan(shard_folder, channels=1, base_size=28, shuffle_buffer=4)
    assert shards.counts == (10, 7, 13) and shards.num_classes == int(fmnist_train[1][:30].max()) + 1
    everything = []
    for rank in range(2):
        seeds, batches = _stream(shards, rank, world=2, workers=2, ordered=False)
        # From the start of an epoch the DataLoader's round-robin over workers is the planned order.
        assert [batch["position"] for batch in batches] == list(range(len(seeds)))
        assert [batch["samples"][0][2] for batch in batches] == seeds
        everything += [(bytes(image.numpy()), label) for b in batches for image, label, _ in b["samples"]]
    originals = {bytes(fmnist_train[0][i]): int(fmnist_train[1][i]) for i in range(30)}
    assert len(set(everything)) == len(everything)  # no image twice, across ranks and workers
    assert all(originals[image] == label for image, label in everything)


def test_shard_stream_resumes_mid_epoch_exactly(shard_folder):
    shards = ShardSet.scan(shard_folder, channels=1, base_size=28, shuffle_buffer=4)
    _, full = _stream(shards, 0, world=1, workers=2)
    _, resumed = _stream(shards, 0, world=1, workers=2, skip=3)
    assert [batch["position"] for batch in resumed] == list(range(3, len(full)))
    for a, b in zip(full[3:], resumed, strict=True):
        pairs = zip(a["samples"], b["samples"], strict=True)
        assert all(torch.equal(x[0], y[0]) and x[1:] == y[1:] for x, y in pairs)


def test_round_robin_positions_drop_exhausted_workers():
    assert round_robin_positions([2, 0, 3]) == [[0, 2], [], [1, 3, 4]]


def test_a_long_tail_profile_clipped_by_small_classes_says_so(caplog):
    """Probe 10: a 500-image set under the 1280 -> 5 profile kept 41/41/41/38/... per class while every
    table said "1280 -> 5", with nothing in the logs."""
    import logging

    labels = np.repeat(np.arange(5), 40)
    spec = LongTailSection(enabled=True, profile="exponential", imbalance_ratio=16.0, max_per_class=320)
    with caplog.at_level(logging.WARNING, logger="training.data"):
        _, info = long_tail_indices(labels, spec)
    expected = sorted(min(40, int(320 * 16.0 ** (-r / 4))) for r in range(5))
    assert sorted(info.counts.values()) == expected
    assert "long-tail profile clipped to the images available" in caplog.text and "of 320" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="training.data"):
        long_tail_indices(labels, LongTailSection(**{**spec.__dict__, "max_per_class": 40}))
    assert "clipped" not in caplog.text  # a profile the data can supply is silent


def test_workers_leave_a_sigterm_to_the_main_process(tmp_path):
    """A scheduler's preemption signals every process of the job: a loader worker it killed failed the run
    with "DataLoader worker ... killed by signal" instead of the main process's clean stop."""
    import os
    import signal

    import psutil

    from tests.training.helpers import tiny_config
    from training.data import train_loader

    config = tiny_config(tmp_path, "data.num_workers=1")
    before = {child.pid for child in psutil.Process().children()}  # servers of other tests may run
    batches = iter(train_loader(build_data(config), config, rank=0, world=1, accumulation=1, epoch=0))
    next(batches)  # the worker is up
    (worker,) = [child for child in psutil.Process().children() if child.pid not in before]
    os.kill(worker.pid, signal.SIGTERM)
    assert worker.is_running() and worker.status() != psutil.STATUS_ZOMBIE
    for _ in range(3):  # and it still serves the main process
        next(batches)
