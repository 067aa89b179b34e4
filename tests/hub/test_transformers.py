"""Folders written by save_pretrained load in transformers (TimmWrapper) and give our embeddings.

transformers reads ``config.json`` as a timm config: ``AutoModel`` builds ``TimmWrapperModel`` with
``timm.create_model(architecture, num_classes=0, **model_args)`` and loads ``model.safetensors`` with a
``timm_model.`` prefix; ``AutoImageProcessor`` builds timm's eval transform from ``pretrained_cfg``.
Its ``pooler_output`` is timm's ``forward_head`` (the final-norm CLS token for ``global_pool="token"``),
i.e. our ``pooling="cls"``. The reference here is our own ``encode()`` on the same real images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import transformers  # in the dev extra: this runs in the default suite
from PIL import Image

from tests.fixtures_models import tiny_encoder
from visreg_hub import from_pretrained
from visreg_hub.hub.loading import resolve


def _unit(rows: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(rows.float(), dim=-1)


@pytest.fixture(scope="module")
def rgb_folder(tmp_path_factory):
    model = tiny_encoder(seed=5, pooling="cls")
    folder = model.save_pretrained(tmp_path_factory.mktemp("rgb") / "tiny-rgb")
    return model, folder


def test_automodel_and_image_processor_match_encode_on_rgb_photos(rgb_folder, photo_paths):
    model, folder = rgb_folder
    hf_model = transformers.AutoModel.from_pretrained(str(folder)).eval()
    processor = transformers.AutoImageProcessor.from_pretrained(str(folder))
    assert type(hf_model).__name__ == "TimmWrapperModel"
    images = [Image.open(path).convert("RGB") for path in photo_paths]
    with torch.no_grad():
        pooled = hf_model(**processor(images, return_tensors="pt")).pooler_output
    ours = model.encode(images)  # (N, D), L2-normalised
    assert pooled.shape == ours.shape
    torch.testing.assert_close(_unit(pooled), ours, rtol=0, atol=1e-5)


def test_pipeline_image_feature_extraction_matches_encode(rgb_folder, photo_paths):
    model, folder = rgb_folder
    extractor = transformers.pipeline("image-feature-extraction", model=str(folder), device="cpu")
    pooled = torch.tensor(np.asarray(extractor([str(p) for p in photo_paths], pool=True))).reshape(
        len(photo_paths), -1
    )
    torch.testing.assert_close(_unit(pooled), model.encode(photo_paths), rtol=0, atol=1e-5)


def test_transparent_images_match_transformers_only_after_compositing_on_white(rgb_folder, photo_paths):
    """docs/interop.md's alpha caveat: encode() composites on white, the pipeline drops alpha; compositing on
    white before transformers (the documented recipe) gives encode()'s vector."""
    model, folder = rgb_folder
    rgba = [Image.open(path).convert("RGBA") for path in photo_paths]
    for image in rgba:
        image.putalpha(128)
    white = [
        Image.alpha_composite(Image.new("RGBA", image.size, "white"), image).convert("RGB") for image in rgba
    ]
    extractor = transformers.pipeline("image-feature-extraction", model=str(folder), device="cpu")

    def pipeline_vectors(images):
        return _unit(torch.tensor(np.asarray(extractor(images, pool=True))).reshape(len(images), -1))

    ours = model.encode(rgba)
    torch.testing.assert_close(pipeline_vectors(white), ours, rtol=0, atol=1e-5)
    dropped = pipeline_vectors(rgba)  # the pipeline's own handling: alpha dropped, not composited
    assert (dropped - ours).norm(dim=-1).min() > 0.05
    docs = " ".join((Path(__file__).parents[2] / "docs/interop.md").read_text().split())
    assert "composites it on a **white** background" in docs and "def on_white(" in docs


def test_bundled_grayscale_model_loads_in_transformers(fmnist_test):
    """The bundled 1-channel model: AutoModel + AutoImageProcessor on grayscale ("L") images.

    transformers' pipeline converts every input to RGB, which a 1-channel model cannot take; that
    limitation is documented in docs/interop.md.
    """
    ours = from_pretrained("vit-mini-p7-fmnist")
    folder = resolve("vit-mini-p7-fmnist").location
    hf_model = transformers.AutoModel.from_pretrained(folder).eval()
    processor = transformers.AutoImageProcessor.from_pretrained(folder)
    images = [Image.fromarray(pixels, mode="L") for pixels in fmnist_test[0][:8]]
    with torch.no_grad():
        pooled = hf_model(**processor(images, return_tensors="pt")).pooler_output
    torch.testing.assert_close(_unit(pooled), ours.encode(images), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["vit-tiny-p8-colour", "vit-tiny-p4-fmnist"])
def test_card_states_the_pooler_output_width_transformers_gives(name, fmnist_test, photo_paths):
    """Cards said `pooler_output` was the default embedding's width (256 / 512 for these cls_lastK models);
    transformers gives the cls tap: the card must say what AutoModel returns."""
    import re

    ours = from_pretrained(name)
    folder = resolve(name).location
    hf_model = transformers.AutoModel.from_pretrained(folder).eval()
    processor = transformers.AutoImageProcessor.from_pretrained(folder)
    if ours.config.in_chans == 1:
        images = [Image.fromarray(fmnist_test[0][0], mode="L")]
    else:
        images = [Image.open(photo_paths[0]).convert("RGB")]
    with torch.no_grad():
        pooled = hf_model(**processor(images, return_tensors="pt")).pooler_output
    card = (Path(folder) / "README.md").read_text()
    stated = re.search(r"pooler_output\s+# \(1, (\d+)\)", card)
    assert stated and int(stated.group(1)) == pooled.shape[-1] == ours.embedding_dim("cls")
    assert ours.embedding_dim() != pooled.shape[-1]  # the case the old card got wrong
    torch.testing.assert_close(pooled, ours.encode(images, pooling="cls", normalize=False), rtol=0, atol=1e-5)
