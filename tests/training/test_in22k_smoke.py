"""The IN-22K preset runs end to end: training/configs/vit-l14-in22k.yaml at tiny scale, same code path.

Only sizes change (width, depth, image sizes, batch, slices, steps) and the data paths point at real
photos packed as WebDataset shards (``xxx.jpg`` + ``xxx.cls``) and an ImageFolder validation set, as the
preset expects. Everything else (ViT-L/14 family and patch size, lambda 0.8, GPU-side views, shard
streaming, kNN monitoring on the folder validation set, checkpoint, final export) is the preset's.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

from PIL import Image

from tests.training.helpers import REPO, run_script
from visreg_hub.hub import from_pretrained

PHOTOS = sorted((REPO / "tests" / "fixtures" / "photos").glob("*.jpg"))


def _crops(count: int, offset: int):
    """``count`` (jpeg bytes, label) pairs: crops of the four fixture photos, label = photo index."""
    out = []
    for i in range(count):
        label = (i + offset) % len(PHOTOS)
        image = Image.open(PHOTOS[label]).convert("RGB")
        side = min(image.size) // 2 + 7 * i % 20
        left = (13 * i) % (image.size[0] - side)
        buffer = io.BytesIO()
        image.crop((left, 0, left + side, side)).resize((40, 40)).save(buffer, format="JPEG")
        out.append((buffer.getvalue(), label))
    return out


def _write_shards(folder: Path) -> None:
    folder.mkdir()
    for shard in range(2):
        with tarfile.open(folder / f"in22k-{shard:05d}.tar", "w") as tar:
            for i, (jpeg, label) in enumerate(_crops(12, shard)):
                for suffix, payload in (("jpg", jpeg), ("cls", str(label).encode())):
                    info = tarfile.TarInfo(f"s{shard}_{i:04d}.{suffix}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))


def _write_val_folder(folder: Path) -> None:
    for i, (jpeg, label) in enumerate(_crops(16, 1)):
        (folder / f"class{label}").mkdir(parents=True, exist_ok=True)
        (folder / f"class{label}" / f"{i}.jpg").write_bytes(jpeg)


def test_in22k_preset_trains_and_exports_at_tiny_scale(tmp_path):
    _write_shards(tmp_path / "shards")
    _write_val_folder(tmp_path / "val")
    out = tmp_path / "run"
    result = run_script(
        ["--config", str(REPO / "training/configs/vit-l14-in22k.yaml"),
         f"data.path={tmp_path / 'shards'}", f"data.val_path={tmp_path / 'val'}", f"train.output_dir={out}",
         "data.num_workers=0", "data.base_size=32", "data.shuffle_buffer=8",
         "model.embed_dim=32", "model.depth=1", "model.num_heads=2",
         "augment.global_size=28", "augment.local_size=14",
         "projector.hidden_dim=64", "projector.out_dim=32", "loss.num_slices=64",
         "train.global_batch_size=8", "train.per_device_batch_size=4", "train.max_steps=3",
         "train.checkpoint_every=2", "train.progress_bar=false", "train.log_with=none", "train.log_every=1",
         "eval.knn_every=3", "eval.knn_bank_size=8", "eval.batch_size=8"],
        cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((out / "final" / "config.json").read_text())
    assert config["architecture"] == "vit_large_patch14_224"
    model = from_pretrained(out / "final")
    assert model.config.patch_size == 14 and model.config.depth == 1 and model.config.img_size == 28
    recipe = (out / "config.yaml").read_text()
    assert "reg_weight: 0.8" in recipe and "augment_on: device" in recipe and "source: webdataset" in recipe
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [m["step"] for m in metrics if "loss/total" in m]
    assert steps[-1] == 3 and all(m["loss/total"] == m["loss/total"] for m in metrics if "loss/total" in m)
    assert any(k.startswith("knn") for m in metrics for k in m), "kNN monitoring on the folder val set"
