"""hubconf.py: torch.hub.load(repo, "<registry name with underscores>", source="local") for every entry."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from visreg_hub import from_pretrained, list_models

REPO = Path(__file__).resolve().parents[2]


def _hub_entry_points() -> list[str]:
    """What torch.hub.list reports for a GitHub repo: hubconf's public callables (no local mode there)."""
    spec = importlib.util.spec_from_file_location("hubconf", REPO / "hubconf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return sorted(
        name for name in dir(module) if callable(getattr(module, name)) and not name.startswith("_")
    )


def test_entry_points_are_the_registry_names():
    expected = sorted(entry.name.replace("-", "_") for entry in list_models())
    assert _hub_entry_points() == expected
    assert "vit_mini_p7_fmnist" in expected


def test_bundled_entry_loads_the_same_model_as_from_pretrained(fmnist_test):
    ours = from_pretrained("vit-mini-p7-fmnist")
    hub_model = torch.hub.load(str(REPO), "vit_mini_p7_fmnist", source="local")
    assert type(hub_model) is type(ours) and not hub_model.training
    images = list(fmnist_test[0][:6])  # real Fashion-MNIST images, uint8 (28, 28)
    torch.testing.assert_close(hub_model.encode(images), ours.encode(images), rtol=0, atol=0)
    random = torch.hub.load(str(REPO), "vit_mini_p7_fmnist", source="local", pretrained=False)
    assert random.config == ours.config
    assert not torch.equal(random.backbone.pos_embed, ours.backbone.pos_embed)


def test_random_weights_take_the_pretrained_entrys_arguments(caplog):
    """pretrained=False failed with raw torch errors on the arguments pretrained=True takes (probe 15)."""
    from visreg_hub.errors import DeviceError

    def random(**kwargs):
        return torch.hub.load(str(REPO), "vit_mini_p7_fmnist", source="local", pretrained=False, **kwargs)

    assert random(dtype="bf16").backbone.pos_embed.dtype == torch.bfloat16
    assert random(backend="torch").backend == "torch" and random().backend == "torch"
    with pytest.raises(DeviceError):
        random(device="cuda" if not torch.cuda.is_available() else "cuda:99")
    with caplog.at_level("WARNING", logger="visreg_hub"):
        random(revision="v1")
    assert "revision='v1' ignored" in caplog.text
    with pytest.raises(TypeError, match="unexpected keyword"):
        random(bogus=1)
    from visreg_hub.errors import ConfigError
    from visreg_hub.models.limits import ModelLimits

    with pytest.raises(ConfigError):  # limits= checked before anything is built, as from_pretrained does
        random(limits=ModelLimits(max_params=10))
    assert random(limits=ModelLimits(max_params=None)).backend == "torch"


def test_entries_needing_the_network_fail_with_a_clear_error_offline(tmp_path):
    """Offline (HF_HUB_OFFLINE=1, as on this CI): a one-line visreg_hub error, never a raw traceback.

    An unreachable endpoint without HF_HUB_OFFLINE gives the same error after huggingface_hub's
    retries (tens of seconds), which is why this test uses the offline switch.
    """
    code = f"""
import json, torch
from visreg_hub.errors import VisregHubError
out = {{}}
for name in {_hub_entry_points()!r}:
    try:
        torch.hub.load({str(REPO)!r}, name, source="local")
        out[name] = "loaded"
    except VisregHubError as exc:
        out[name] = [type(exc).__name__, str(exc)]
print(json.dumps(out))
"""
    env = {**os.environ, "HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(outcome) == {entry.name.replace("-", "_") for entry in list_models()}
    for entry in list_models():
        got = outcome[entry.name.replace("-", "_")]
        if entry.status == "bundled":
            assert got == "loaded"
        elif entry.status == "not yet published":
            assert got[0] == "ModelNotPublishedError" and "training/pretrain.py" in got[1]
        else:
            assert got[0] == "ModelNotFoundError", got
            assert "Hub is unreachable" in got[1] and "\n" not in got[1]
