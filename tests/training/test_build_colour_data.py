"""scripts/build_colour_data.py: the crops override and the random square views it multiplies photos with."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]


def _script():
    path = REPO / "scripts" / "build_colour_data.py"
    spec = importlib.util.spec_from_file_location("_build_colour_data", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_crops_override_parses_known_sources_and_refuses_the_rest():
    build = _script()
    assert build.parse_crops(["ufoai=4", "gimp_patterns=0"]) == {"ufoai": 4, "gimp_patterns": 0}
    with pytest.raises(SystemExit, match=r"unknown source; choose from .*endless_sky"):
        build.parse_crops(["ufo=4"])
    for bad in ("ufoai", "ufoai=-1", "ufoai=two"):
        with pytest.raises(SystemExit, match="expected SOURCE=N"):
            build.parse_crops([bad])


def test_views_are_the_centre_square_then_crops_inside_the_image():
    build = _script()
    # A horizontal ramp: a square's mean column value tells where it was cut from.
    ramp = np.tile(np.linspace(0, 255, 300, dtype=np.float32)[None, :, None], (100, 1, 3)).astype(np.uint8)
    views = build.views(Image.fromarray(ramp), 5, 16, np.random.default_rng(0))
    assert len(views) == 6 and all(v.shape == (16, 16, 3) and v.dtype == np.uint8 for v in views)
    # Centre square of a 300x100 image: columns 100-199, mean value about 255 * 150 / 299.
    assert abs(views[0].mean() - 255 * 149.5 / 299) < 2
    # Every crop lies within the image and is at least a quarter of the shorter side: its ramp values span
    # at least 25 columns' worth and stay in range.
    for view in views[1:]:
        span = float(view[:, -1].mean()) - float(view[:, 0].mean())
        assert span >= 255 * 20 / 299
