"""The demo's bundled (model, gallery, examples) sets: the colour-photo set first, Fashion-MNIST second."""

from __future__ import annotations

import numpy as np
from PIL import Image

from demo import menus
from demo.menus import BUNDLED_SETS
from demo.service import DemoService
from visreg_hub import from_pretrained
from visreg_hub.inference import list_image_files


def test_menus_open_on_the_colour_photo_set_then_fashion_mnist(tmp_path):
    demo = DemoService(cache_dir=tmp_path / "c", download_dir=tmp_path / "d", device="cpu")
    assert [c.key for c in demo.model_choices] == ["bundled-photos", "bundled"]
    assert [c.key for c in demo.gallery_choices] == ["bundled-photos", "bundled"]
    assert demo.default_model == demo.default_gallery == "bundled-photos"
    assert "vit-tiny-p8-colour" in demo.model_choices[0].label
    model = from_pretrained(demo.model_choices[0].source)
    assert model.config.in_chans == 3 and model.config.name == "vit-tiny-p8-colour"
    assert DemoService.examples()[0].parent == BUNDLED_SETS[0].examples


def test_a_bundled_model_named_with_model_is_the_bundled_choice_with_its_gallery(tmp_path):
    """`--model vit-tiny-p4-fmnist` loaded the model twice (also as 'bundled'), listed it twice (the API
    as `...-2`) and paired it with the photo gallery by default, without the mismatch note (probe 16)."""
    for spec in ("vit-tiny-p4-fmnist", str(menus.MODEL_ASSETS / "vit-tiny-p4-fmnist")):
        demo = DemoService([spec], cache_dir=tmp_path / "c", download_dir=tmp_path / "d", device="cpu")
        assert [c.key for c in demo.model_choices] == ["bundled", "bundled-photos"], spec
        assert demo.default_gallery == "bundled"  # its own gallery first
    galleries = [str(BUNDLED_SETS[1].gallery), str(BUNDLED_SETS[1].gallery) + "/"]  # a bundled gallery, twice
    demo = DemoService(galleries=galleries, cache_dir=tmp_path / "c", download_dir=tmp_path / "d")
    assert [c.key for c in demo.gallery_choices] == ["bundled", "bundled-photos"]  # listed once (review 17)
    other = tmp_path / "vit-tiny-p4-fmnist"  # a local folder of that name is the user's model, not ours
    other.mkdir()
    demo = DemoService([str(other)], cache_dir=tmp_path / "c", download_dir=tmp_path / "d", device="cpu")
    assert [c.key for c in demo.model_choices] == ["vit-tiny-p4-fmnist", "bundled-photos", "bundled"]
    assert demo.model_choices[0].source == str(other)
    # the bundled model of that name steps aside in the API: one id per model
    assert [c.name for c in demo.model_choices] == ["vit-tiny-p4-fmnist", "vit-tiny-p8-colour",
                                                    "vit-tiny-p4-fmnist-2"]  # fmt: skip


def test_models_are_listed_by_name_never_by_their_server_path(tmp_path):
    """Two --model folders of one name were `mymodel` / `mymodel-2` in /v1/models but their full server paths
    in the demo's menu (and as the keys its Gradio API takes): every visitor saw the operator's folders, which
    the HTTP API never shows. The menu now lists and takes the API's names."""
    from demo.server import model_specs

    folders = [tmp_path / "a" / "mymodel", tmp_path / "b" / "mymodel", tmp_path / "c" / "mymodel",
               tmp_path / "bundled"]  # fmt: skip
    for folder in folders:
        folder.mkdir(parents=True)
    specs = [str(folders[0]), str(folders[1]), str(folders[0]) + "/", str(folders[2]), str(folders[3])]
    demo = DemoService(specs, cache_dir=tmp_path / "cache", download_dir=tmp_path / "d", device="cpu")
    operator = demo.model_choices[:4]
    assert [c.key for c in operator] == ["mymodel", "mymodel-2", "mymodel-3", "bundled-2"]
    assert [c.source for c in operator] == [str(folders[i]) for i in (0, 1, 2, 3)]
    for choice in demo.model_choices:
        assert str(tmp_path) not in choice.key + choice.label, choice
    api_specs, names = model_specs(demo)
    assert [s.name for s in api_specs][:4] == [c.key for c in operator]  # menu key == API model id
    assert len({s.name for s in api_specs}) == len(api_specs) == len(demo.model_choices)
    assert names == {c.key: c.name for c in demo.model_choices}
    assert menus.find_choice(demo.model_choices, "mymodel-2", "model").source == str(folders[1])
    # a folder named like a bundled model, then that bundled model by its registry name: two API ids
    other = tmp_path / "d" / "vit-tiny-p4-fmnist"
    other.mkdir(parents=True)
    demo = DemoService([str(other), "vit-tiny-p4-fmnist"], cache_dir=tmp_path / "cache",
                       download_dir=tmp_path / "d", device="cpu")  # fmt: skip
    assert [c.name for c in demo.model_choices] == ["vit-tiny-p4-fmnist", "vit-tiny-p4-fmnist-2",
                                                    "vit-tiny-p8-colour"]  # fmt: skip


def test_photo_gallery_is_small_credited_and_disjoint_from_its_examples():
    photos = BUNDLED_SETS[0]
    images = list_image_files(photos.gallery)
    assert len(images) > 300
    total = sum(p.stat().st_size for p in photos.gallery.rglob("*") if p.is_file())
    assert total < 20_000_000
    credits = (photos.gallery / "CREDITS.md").read_text()
    for path in images:  # every file is traced to its public-domain source file
        if path.parent.name != "satellite":
            assert path.stem in credits, path
    assert "public domain" in credits
    for path in images[::25]:
        with Image.open(path) as image:
            assert image.mode == "RGB" and max(image.size) <= 256
    gallery_pixels = {np.asarray(Image.open(p)).tobytes() for p in images}
    examples = [p for p in DemoService.examples() if p.parent == photos.examples]
    assert len(examples) >= 4
    assert all(np.asarray(Image.open(p)).tobytes() not in gallery_pixels for p in examples)


def test_a_missing_bundled_model_leaves_the_other_offered(monkeypatch, tmp_path):
    real = menus.MODEL_ASSETS
    (tmp_path / "assets").mkdir()
    (tmp_path / "assets" / "vit-tiny-p4-fmnist").symlink_to(real / "vit-tiny-p4-fmnist")
    monkeypatch.setattr(menus, "MODEL_ASSETS", tmp_path / "assets")
    demo = DemoService(cache_dir=tmp_path / "c", download_dir=tmp_path / "d", device="cpu")
    assert [c.key for c in demo.model_choices] == ["bundled"]
