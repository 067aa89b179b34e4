"""A model folder is untrusted: hostile config.json / weights give one clear error, before any allocation,
without the network, and never another exception type."""

from __future__ import annotations

import json
import re
import resource
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from tests.fixtures_models import tiny_encoder
from visreg_hub.errors import CheckpointError, ConfigError, VisregHubError
from visreg_hub.hub import from_pretrained
from visreg_hub.models import ModelConfig, ModelLimits, VISRegEncoder


@pytest.fixture()
def no_network(monkeypatch):
    """Every outbound socket operation raises and is recorded (loopback included: nothing may try)."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access attempted during a local load")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return attempts


@pytest.fixture()
def folder(tmp_path):
    model = tiny_encoder()
    model.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def _edit_config(folder, change) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))


def _crafted(config: dict, model_args: dict) -> None:
    """Change ``model_args`` as a crafted folder would: with the copies timm and transformers read made to
    agree (input size, feature width, embedding length), so only the budget and header checks remain."""
    config["model_args"].update(model_args)
    args = config["model_args"]
    config["pretrained_cfg"]["input_size"] = [args["in_chans"], args["img_size"], args["img_size"]]
    config["num_features"] = args["embed_dim"]
    config["visreg"]["embedding_dim"] = args["embed_dim"]  # the tiny encoder pools "cls"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c["pretrained_cfg"].update(input_size=[3, 10**5, 10**5]), r"input_size is"),
        (lambda c: c["pretrained_cfg"].update(input_size=[3, -5, 32]), r"pretrained_cfg\.input_size is"),
        # missing: timm and transformers fall back to their default 224 px (probe 15)
        (lambda c: c["pretrained_cfg"].pop("input_size"),
         r"input_size is missing, .* default \[3, 224, 224\]"),
        # ... whatever the architecture's name says (its *_384 default is replaced by the folder's cfg)
        (lambda c: (c["pretrained_cfg"].pop("input_size"), c.update(architecture="vit_tiny_patch16_384")),
         r"input_size is missing, .* default \[3, 224, 224\]"),
        (lambda c: c.update(num_features=10**12), r"num_features is 1000000000000 but the model .* has 32"),
        (lambda c: c.update(num_classes=1000), "num_classes is 1000"),
        # another pool: timm refuses the weights (fc_norm missing), transformers fills it with random ones
        (lambda c: c.update(global_pool="avg"), r"global_pool is 'avg' but the model .* has 'token'"),
        (lambda c: c["model_args"].update(global_pool="avg"), r"model_args\.global_pool is 'avg'"),
        (lambda c: c["model_args"].update(global_pool="map"), r"model_args\.global_pool is 'map'"),
        (lambda c: c["model_args"].update(num_classes=10), r"model_args\.num_classes is 10"),
        (lambda c: c["visreg"].update(embedding_dim=10**12), r"visreg\.embedding_dim is"),
        (lambda c: c["pretrained_cfg"].update(url="http://evil.example/w.pth"), r"weights location \(url\)"),
        (lambda c: c["pretrained_cfg"].update(hf_hub_id="evil/model", file="/etc/passwd"),
         r"weights location \(file, hf_hub_id\)"),
    ],
)  # fmt: skip
def test_fields_timm_and_transformers_read_must_agree_with_the_model(folder, no_network, change, message):
    """visreg_hub rebuilds the model from model_args alone, but timm's local-dir: loader and transformers
    read these copies: a folder where they disagree (or that names a download) was accepted silently."""
    from_pretrained(folder)  # the folder as saved passes
    _edit_config(folder, change)
    with pytest.raises(CheckpointError, match=message):
        from_pretrained(folder)
    assert no_network == []


def test_a_missing_input_size_is_refused_only_where_timm_would_read_another_size(tmp_path):
    """timm and transformers fall back to 224 px when pretrained_cfg has no input_size, whatever the
    architecture's own default: a *_384 name at 224 px loads; the same name at 384 px is refused."""
    import json

    from tests.fixtures_models import tiny_encoder

    for img_size, refused in ((224, False), (384, True)):
        folder = tiny_encoder(img_size=img_size, patch_size=32).save_pretrained(tmp_path / str(img_size))
        config = json.loads((folder / "config.json").read_text())
        config["architecture"] = "vit_tiny_patch16_384"
        del config["pretrained_cfg"]["input_size"]
        (folder / "config.json").write_text(json.dumps(config))
        if refused:
            with pytest.raises(CheckpointError, match=r"input_size is missing"):
                from_pretrained(folder)
        else:
            assert from_pretrained(folder).config.img_size == 224


def test_a_local_load_never_touches_the_network(folder, no_network):
    model = from_pretrained(folder)
    assert model.config.depth == 2 and no_network == []


@pytest.mark.parametrize(
    "architecture",
    ["hf-hub:timm/vit_tiny_patch16_224.augreg_in21k", "local-dir:/etc", "resnet50", "timm/vit_tiny", 7, None],
)
def test_config_architecture_cannot_redirect_timm(folder, no_network, architecture):
    _edit_config(folder, lambda c: c.__setitem__("architecture", architecture))
    with pytest.raises(CheckpointError, match="not a timm Vision Transformer"):
        from_pretrained(folder)
    assert no_network == []


_NO_CLS_TOKEN = ["vit_medium_patch16_gap_256", "vit_base_patch16_siglip_224"]


@pytest.mark.parametrize("architecture", _NO_CLS_TOKEN)
def test_an_architecture_without_a_cls_token_is_a_checkpoint_error(folder, architecture):
    """timm refuses token pooling without a class token with a bare assert (AssertionError, or nothing
    under -O); the loader must name the file and the fix in its own error type instead."""
    with torch.device("meta"):  # independent reference: timm itself builds it without a CLS token
        assert timm.create_model(architecture, num_classes=0, global_pool="avg", depth=1).cls_token is None
    _edit_config(folder, lambda c: c.__setitem__("architecture", architecture))
    expected = rf"{re.escape(str(folder / 'config.json'))}: architecture '{architecture}' has no CLS token"
    with pytest.raises(CheckpointError, match=rf"{expected}.*class_token=True"):
        from_pretrained(folder, backend="torch")
    small = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
    with pytest.raises(ConfigError, match="has no CLS token"):  # the same refusal when built directly
        VISRegEncoder(ModelConfig(architecture=architecture, **small))


def test_the_cls_token_refusal_holds_under_python_O(tmp_path):
    """The same refusal with asserts stripped (python -O), for both architectures in one process: an -O
    start compiles torch and timm without cached bytecode (about 20 s here), so it is paid once."""
    folders = []
    for architecture in _NO_CLS_TOKEN:
        folder = tiny_encoder().save_pretrained(tmp_path / architecture)
        _edit_config(folder, lambda c, a=architecture: c.__setitem__("architecture", a))
        folders.append(str(folder))
    script = (
        "import sys\n"
        "from visreg_hub.errors import CheckpointError\n"
        "from visreg_hub.hub import from_pretrained\n"
        "assert sys.flags.optimize\n"
        "for folder in sys.argv[1:]:\n"
        "    try: from_pretrained(folder, backend='torch')\n"
        "    except CheckpointError as exc: print('refused:', exc)\n"
        "    else: sys.exit(f'{folder} loaded')\n"
    )
    ran = subprocess.run([sys.executable, "-O", "-c", script, *folders], capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert ran.returncode == 0, ran.stderr[-2000:]
    refusals = [line for line in ran.stdout.splitlines() if line.startswith("refused:")]
    assert len(refusals) == 2 and all("has no CLS token" in line for line in refusals), ran.stdout


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


@pytest.mark.parametrize(
    ("model_args", "message", "error"),
    [
        ({"depth": 10_000}, "depth=10000 is out of range", CheckpointError),
        ({"embed_dim": 1 << 20, "num_heads": 2}, "embed_dim=1048576 is out of range", CheckpointError),
        ({"img_size": 4096, "patch_size": 1}, "GiB of activations per image", ConfigError),
        ({"depth": 512, "embed_dim": 8192, "num_heads": 64}, "B-parameter model", ConfigError),
        ({"reg_tokens": 5000}, "num_reg_tokens=5000 is out of range", CheckpointError),
        ({"mlp_ratio": 1e9}, "mlp_ratio=1000000000.0 is out of range", CheckpointError),
        # within every bound and the budget (1.2 B parameters, 4.8 GB to build): the header check refuses it
        ({"depth": 24, "embed_dim": 2048, "num_heads": 16}, "does not match the model", CheckpointError),
    ],
)
def test_huge_configs_are_refused_before_allocation(folder, model_args, message, error):
    _edit_config(folder, lambda c: _crafted(c, model_args))
    before, started = _peak_rss_bytes(), time.perf_counter()
    with pytest.raises(error, match=message):
        from_pretrained(folder)
    assert time.perf_counter() - started < 20  # seconds: the unchecked path took 18 s and 6 GB
    assert _peak_rss_bytes() - before < 512 * 2**20  # building any of these would take gigabytes


def test_limits_argument_overrides_the_budget(folder):
    with pytest.raises(ConfigError, match="over the limit"):
        from_pretrained(folder, limits=ModelLimits(max_params=10_000))
    assert from_pretrained(folder, limits=ModelLimits(max_params=None, max_activation_bytes=None)) is not None


def test_weights_declaring_other_tensors_than_the_config_are_refused_from_the_header(folder):
    _edit_config(folder, lambda c: c["model_args"].update({"depth": 3}))
    with pytest.raises(CheckpointError, match=r"missing keys \['blocks.2.attn.proj.bias'"):
        from_pretrained(folder)


def test_integer_weights_are_refused(folder):
    weights = load_file(str(folder / "model.safetensors"))
    weights["norm.weight"] = torch.ones(32, dtype=torch.int32)
    save_file(weights, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"non-float tensors \['norm.weight'\]"):
        from_pretrained(folder)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_refused(folder, value):
    weights = load_file(str(folder / "model.safetensors"))
    weights["blocks.1.mlp.fc1.weight"][3, 5] = value
    save_file(weights, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"NaN or Inf values in \['blocks.1.mlp.fc1.weight'\]"):
        from_pretrained(folder)


MALFORMED = {
    "non-utf8": b'{"architecture": "vit_tiny_patch16_224", "name": "\xff\xfe"}',
    "deep-nesting": b'{"architecture": "vit_tiny_patch16_224", "visreg": '
    + b"[" * 100_000
    + b"]" * 100_000
    + b"}",
    "moderate-nesting": b'{"architecture": "vit_tiny_patch16_224", "x": ' + b"[" * 500 + b"]" * 500 + b"}",
    "not-json": b"architecture: vit",
    "json-list": b"[1, 2, 3]",
    "empty": b"",
    "nul-bytes": b"\x00" * 64,
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_config_json_is_a_checkpoint_error(folder, name, no_network):
    (folder / "config.json").write_bytes(MALFORMED[name])
    with pytest.raises(CheckpointError) as caught:
        from_pretrained(folder)
    assert "\n" not in str(caught.value) and "config.json" in str(caught.value)


@pytest.mark.parametrize(
    "change",
    [
        lambda c: c["model_args"].update({"depth": "2"}),
        lambda c: c["model_args"].update({"embed_dim": 32.5}),
        lambda c: c["model_args"].update({"img_size": [28, 28, 28]}),
        lambda c: c["model_args"].update({"img_size": [28, 14]}),
        lambda c: c["model_args"].update({"patch_size": []}),
        lambda c: c["model_args"].update({"qkv_bias": "yes"}),
        lambda c: c["model_args"].update({"init_values": "small"}),
        lambda c: c["model_args"].update({"unknown_arg": 1}),
        lambda c: c.__setitem__("model_args", [1, 2]),
        lambda c: c.__setitem__("visreg", "v1"),
        lambda c: c.__setitem__("pretrained_cfg", 3),
        lambda c: c["pretrained_cfg"].update({"mean": "abc"}),
        lambda c: c["pretrained_cfg"].update({"mean": {"r": 1}}),
        lambda c: c["pretrained_cfg"].update({"std": [0.0, 0.1, 0.1]}),
        lambda c: c["pretrained_cfg"].update({"crop_pct": "full"}),
        lambda c: c["pretrained_cfg"].update({"crop_pct": 0.0001}),  # would resize to 280,000 px a side
        lambda c: c["pretrained_cfg"].update({"crop_pct": 1e-300}),
        lambda c: c["pretrained_cfg"].update({"interpolation": ["bicubic"]}),
        lambda c: c["pretrained_cfg"].update({"crop_mode": "zoom"}),
        lambda c: c["pretrained_cfg"].update({"crop_mode": ["center"]}),
        lambda c: c["visreg"].update({"format_version": "1"}),
        lambda c: c["visreg"].update({"format_version": 99}),
        lambda c: c["visreg"].update({"pooling": {"cls": 1}}),
        lambda c: c["visreg"].update({"name": ["x"]}),
        lambda c: c["visreg"].update({"extra": "notes"}),
        lambda c: c["visreg"].update({"drop_path_rate": 2.0}),
        lambda c: (c["model_args"].pop("depth"), c["model_args"].update({"embed_dim": 30, "num_heads": 4})),
    ],
)
def test_wrong_types_and_values_are_checkpoint_errors(folder, change):
    _edit_config(folder, change)
    with pytest.raises(VisregHubError) as caught:
        from_pretrained(folder)
    assert isinstance(caught.value, CheckpointError | ConfigError), type(caught.value)
    assert "\n" not in str(caught.value)


def test_a_header_with_too_many_tensors_is_refused_before_it_is_parsed_in_full(folder):
    """A million-entry header (58 MB) used to take ~30 s and ~900 MB before the key check refused it."""
    from visreg_hub.hub.header import MAX_HEADER_BYTES, MAX_TENSORS

    weights = folder / "model.safetensors"
    entries = {
        f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(MAX_TENSORS + 1)
    }
    header = json.dumps(entries).encode()
    assert len(header) < MAX_HEADER_BYTES
    weights.write_bytes(len(header).to_bytes(8, "little") + header)
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=f"more than the {MAX_TENSORS:,}"):
        from_pretrained(folder)
    assert time.perf_counter() - start < 10
    big = b" " * (MAX_HEADER_BYTES + 1)
    weights.write_bytes(len(big).to_bytes(8, "little") + big)
    with pytest.raises(CheckpointError, match="header is declared"):
        from_pretrained(folder)


def test_names_the_os_cannot_look_up_and_string_dtypes():
    from visreg_hub.errors import ModelNotFoundError

    for name in ("", "a" * 500, "x\0y"):
        with pytest.raises(ModelNotFoundError):
            from_pretrained(name)
    model = from_pretrained("vit-mini-p7-fmnist", dtype="bf16", backend="torch")
    assert next(model.parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype must be"):
        from_pretrained("vit-mini-p7-fmnist", dtype="int8")


def test_checkpoint_files_linking_outside_the_folder_are_refused_and_never_echoed(folder, tmp_path):
    """A model.safetensors symlinked to a secret: the old message printed its first 8 bytes as a number."""
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"hunter2!SECRETKEY=abcdefghijklmnop")
    link = tmp_path / "linked"
    shutil.copytree(folder, link)
    (link / "model.safetensors").unlink()
    (link / "model.safetensors").symlink_to(secret)
    with pytest.raises(CheckpointError, match="symlink to a file outside the folder") as info:
        from_pretrained(link)
    assert str(int.from_bytes(b"hunter2!", "little")) not in str(info.value)
    # the same bytes as a plain file inside the folder: refused without echoing them either
    (link / "model.safetensors").unlink()
    (link / "model.safetensors").write_bytes(secret.read_bytes())
    with pytest.raises(CheckpointError, match="header length field exceeds") as info:
        from_pretrained(link)
    assert str(int.from_bytes(b"hunter2!", "little")) not in str(info.value)


def test_a_hugging_face_snapshot_folder_with_blob_links_loads(folder, tmp_path):
    """The HF cache layout (snapshots/<rev>/file -> ../../blobs/<sha>) stays loadable as a local folder."""
    repo = tmp_path / "models--org--tiny"
    snapshot = repo / "snapshots" / "abc123"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        blob = repo / "blobs" / f"blob-{name}"
        shutil.copy(folder / name, blob)
        (snapshot / name).symlink_to(Path("../../blobs") / blob.name)
    images = torch.rand(1, *from_pretrained(folder).config.data_config["input_size"])
    with torch.no_grad():
        torch.testing.assert_close(from_pretrained(snapshot)(images), from_pretrained(folder)(images))


def test_a_snapshot_whose_blobs_folder_is_a_link_is_refused(folder, tmp_path):
    """``blobs`` itself a link to / let a snapshot's files point at any file on the machine (probe 15)."""
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(folder, elsewhere)
    repo = tmp_path / "models--org--evil"
    snapshot = repo / "snapshots" / "rev"
    snapshot.mkdir(parents=True)
    (repo / "blobs").symlink_to("/")
    for name in ("config.json", "model.safetensors"):
        (snapshot / name).symlink_to(Path("../../blobs") / (elsewhere / name).relative_to("/"))
    with pytest.raises(CheckpointError, match="symlink to a file outside the folder"):
        from_pretrained(snapshot)


def test_a_missing_folder_path_says_it_does_not_exist(tmp_path):
    from visreg_hub.errors import ModelNotFoundError

    with pytest.raises(ModelNotFoundError, match="does not exist"):
        from_pretrained(tmp_path / "nope" / "dir")


def test_a_global_pool_other_than_token_is_what_timm_refuses(folder):
    """The refusal above stands for timm's own: the folder with ``global_pool: avg`` in model_args does not
    load in timm, so accepting it here made a folder that visreg_hub and transformers read differently."""
    _edit_config(folder, lambda c: c["model_args"].update(global_pool="avg"))
    with pytest.raises(RuntimeError, match="fc_norm"):
        timm.create_model(f"local-dir:{folder}", pretrained=True)


@pytest.mark.parametrize("name", ["config.json", "model.safetensors"])
@pytest.mark.parametrize("kind", ["folder", "fifo"])
def test_a_checkpoint_file_that_is_no_regular_file_is_named_so(folder, name, kind):
    """Probe: a folder or FIFO named model.safetensors was reported as "has no model.safetensors", sending
    the user to look for a file they could see."""
    import os

    (folder / name).unlink()
    os.mkfifo(folder / name) if kind == "fifo" else (folder / name).mkdir()
    with pytest.raises(CheckpointError, match=rf"{name} is not a regular file \(a folder, FIFO or device\)"):
        from_pretrained(folder)


@pytest.mark.parametrize("spelling", [str, Path, lambda p: f"local-dir:{p}"])
def test_a_file_given_as_the_model_is_named_a_file_however_it_is_spelled(folder, spelling):
    """Probe: a Path or local-dir: naming a file said "has no config.json"; a str said "is a file"."""
    from visreg_hub.errors import ModelNotFoundError

    weights = folder / "model.safetensors"
    with pytest.raises(ModelNotFoundError, match=r"model\.safetensors' is a file; pass the folder"):
        from_pretrained(spelling(weights))
