"""One error family: bad input to ``visreg-hub`` or ``training/pretrain.py`` is one line and exit 1 or 2.

Most cases call the programs' ``main(argv)`` in this process (the exact code path of the executables,
minus interpreter start-up); a few run the real executables as subprocesses to check the exit status and
that stderr holds no traceback. ``-v`` brings the traceback back.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.fixtures_models import tiny_encoder
from visreg_hub.errors import (
    CheckpointError,
    ConfigError,
    DeviceError,
    UserInputError,
    VisregHubError,
    is_expected,
    one_line,
    printable,
)

ROOT = Path(__file__).resolve().parents[1]
PHOTO = ROOT / "tests" / "fixtures" / "photos" / "coffee.jpg"
FIXTURE_CONFIG = ROOT / "training" / "configs" / "fmnist-fixture-cpu.yaml"
FIXTURE_NPZ = ROOT / "tests" / "fixtures" / "fmnist_train_500.npz"
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("model") / "tiny"
    tiny_encoder().save_pretrained(folder)
    return folder


def _cli(capsys, *argv) -> tuple[int, str, str]:
    from visreg_hub.cli import main

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = main([str(a) for a in argv])
    finally:
        torch.set_num_threads(previous)
    out, err = capsys.readouterr()
    return code, out, err


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if "error" in line]
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


def test_error_types_are_also_the_builtin_types():
    assert issubclass(UserInputError, ValueError) and issubclass(DeviceError, ValueError)
    from demo.service import UserInputError as DemoUserInputError

    assert DemoUserInputError is UserInputError  # one user-error type for the CLI and the demo


def test_shown_cuts_a_long_value_and_says_how_long_it_was():
    from visreg_hub.errors import shown

    assert shown("model-a") == "'model-a'"
    long = "x" * 10_000
    assert shown(long) == repr(long)[:80] + "... (10,002 characters)"


def test_one_line_and_printable():
    assert one_line(KeyError(101)) == "KeyError: 101"
    # probe 20: ours are one line by design; a newline comes from a quoted name and is escaped, not cut
    # (an unreadable `two\nlines.png` printed "error: .../two", losing the reason)
    assert one_line(CheckpointError("/d/two\nlines.png: not an image")) == "/d/two\\nlines.png: not an image"
    assert one_line(ValueError("first line\n  library detail")) == "first line"  # others: the first line
    assert one_line(RecursionError("maximum recursion depth exceeded")).startswith("the input is nested")
    assert one_line(MemoryError()).startswith("out of memory")
    try:  # a real allocator failure (1 PiB), not a hand-made message
        torch.empty(1 << 50, dtype=torch.uint8)
    except RuntimeError as exc:
        assert one_line(exc).startswith("out of memory (") and is_expected(exc)
    assert not is_expected(TypeError("x")) and is_expected(KeyError(1))
    import errno

    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/data/out/part-00003.parquet")
    assert one_line(full) == (  # was "[Errno 28] No space left on device", with no file and no fix
        "/data/out/part-00003.parquet: no space left on the disk; "
        "free some space and run the same command again"
    )
    assert printable("a\x1b[2Jb\nc\x07\u202e") == "a\\x1b[2Jb\\nc\\x07\\u202e"
    assert printable("chat_été.jpg") == "chat_été.jpg"


def _embed(tmp: Path, model: Path, *extra) -> list:
    return ["embed", PHOTO, "-o", tmp / "e.npy", "--model", model, *extra]


@pytest.mark.parametrize(
    ("make_args", "needle"),
    [
        (lambda tmp, model: ["convert", _text_file(tmp, "a.pth"), tmp / "out"], "not a PyTorch checkpoint"),
        (lambda tmp, model: _embed(tmp, model, "--device", "bogus"), "device 'bogus' is not a device name"),
        (lambda tmp, model: _embed(tmp, model, "--device", "cuda:99"), "cuda:99"),
        (lambda tmp, model: _embed(tmp, _hostile_model(tmp, model, "deep")), "nested too deeply"),
        (lambda tmp, model: _embed(tmp, _hostile_model(tmp, model, "arch")), "not a timm Vision Transformer"),
        (lambda tmp, model: _embed(tmp, _hostile_model(tmp, model, "utf8")), "not UTF-8"),
        (lambda tmp, model: _embed(tmp, _hostile_model(tmp, model, "huge")), "out of range"),
        (lambda tmp, model: ["index", "build", _embeddings_with_sidecar(tmp, b"[" * 50_000), "-o", tmp / "i"],
         "nested too deeply"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_and_exit_1(tmp_path, capsys, model_dir, make_args, needle):
    code, _, err = _cli(capsys, *make_args(tmp_path, model_dir))
    assert code == 1
    line = _one_error_line(err)
    assert line.startswith("visreg-hub: error: ") and needle in line


def _text_file(folder: Path, name: str) -> Path:
    path = folder / name
    path.write_text("hello, I am not a checkpoint\n")
    return path


def _hostile_model(tmp: Path, model: Path, kind: str) -> Path:
    target = tmp / f"model-{kind}"
    target.mkdir()
    (target / "model.safetensors").write_bytes((model / "model.safetensors").read_bytes())
    config = json.loads((model / "config.json").read_text())
    if kind == "deep":
        raw = b'{"architecture": "vit_tiny_patch16_224", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    elif kind == "utf8":
        raw = (model / "config.json").read_bytes().replace(b'"tiny-test"', b'"tiny-\xff\xfe"')
    else:
        if kind == "arch":
            config["architecture"] = "hf-hub:timm/vit_tiny_patch16_224.augreg_in21k"
        else:
            config["model_args"]["depth"] = 10_000
        raw = json.dumps(config).encode()
    (target / "config.json").write_bytes(raw)
    return target


def _embeddings_with_sidecar(tmp: Path, sidecar: bytes) -> Path:
    np.save(tmp / "emb.npy", np.ones((2, 4), np.float32), allow_pickle=False)
    (tmp / "emb.json").write_bytes(sidecar)
    return tmp / "emb.npy"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cuda_without_a_gpu_is_one_line(tmp_path, capsys, model_dir):
    code, _, err = _cli(
        capsys, "embed", PHOTO, "-o", tmp_path / "e.npy", "--model", model_dir, "--device", "cuda"
    )
    assert code == 1 and "no CUDA GPU is usable here" in _one_error_line(err)


def test_search_escapes_terminal_sequences_in_file_names(tmp_path, capsys, model_dir):
    """A gallery file named with ANSI escapes (clear screen, set title) is printed escaped, never raw."""
    gallery = tmp_path / "gallery"
    gallery.mkdir()
    hostile = "evil\x1b[2J\x1b]0;owned\x07.png"
    for name in (hostile, "plain.png"):
        Image.open(PHOTO).convert("RGB").resize((32, 32)).save(gallery / name, format="PNG")
    assert _cli(capsys, "embed", gallery, "-o", tmp_path / "e.npy", "--model", model_dir)[0] == 0
    assert _cli(capsys, "index", "build", tmp_path / "e.npy", "-o", tmp_path / "index")[0] == 0
    code, out, _ = _cli(capsys, "search", tmp_path / "index", gallery / "plain.png", "-k", "2")
    assert code == 0 and "\x1b" not in out and "\x07" not in out
    assert "evil\\x1b[2J\\x1b]0;owned\\x07.png" in out
    code, out, _ = _cli(capsys, "search", tmp_path / "index", gallery / "plain.png", "-k", "2", "--json")
    assert "\x1b" not in out and hostile in {h["metadata"]["path"].rsplit("/", 1)[-1]
                                             for h in json.loads(out)[0]["results"]}  # fmt: skip


def test_verbose_shows_the_traceback(tmp_path, capsys):
    code, _, err = _cli(capsys, "-v", "convert", _text_file(tmp_path, "x.pth"), tmp_path / "out")
    assert code == 1 and "Traceback" in err and "not a PyTorch checkpoint" in err.splitlines()[-1]


def _pretrain(capsys, *argv) -> tuple[int, str]:
    from training.pretrain import main

    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def _object_npz(tmp: Path) -> Path:
    path = tmp / "objects.npz"
    np.savez(path, images=np.array([{"a": 1}, None], dtype=object), labels=np.array([0, 1]))
    return path


@pytest.mark.parametrize(
    ("make_overrides", "needle"),
    [
        (lambda tmp: ["data.path=/tmp"], "is a folder; data source 'npz' needs a file"),
        (lambda tmp: [f"data.path={_object_npz(tmp)}"], "pickled or object data, which is never loaded"),
        (lambda tmp: [f"data.path={_text_file(tmp, 'fake.npz')}"], "not a readable .npz"),
        (lambda tmp: [f"data.path={FIXTURE_NPZ}", f"train.output_dir={_text_file(tmp, 'file')}/run"],
         "is not a writable folder (Not a directory)"),
        (lambda tmp: [f"data.path={FIXTURE_NPZ}", "train.output_dir=/proc/visreg-run"],
         "not a writable folder"),
        (lambda tmp: [f"data.path={FIXTURE_NPZ}", "model.depth=10000"], "depth=10000 is out of range"),
        (lambda tmp: [f"data.path={FIXTURE_NPZ}", "model.embed_dim=4096", "model.num_heads=16",
                      "model.depth=256"], "B-parameter model, over the limit"),
        (lambda tmp: [f"data.path={FIXTURE_NPZ}", "model.size=vit-h14"], "not a multiple of the patch size"),
        (lambda tmp: [f"data.path={FIXTURE_NPZ}", "projector.hidden_dim=1000000000"], "over the limit"),
    ],
)  # fmt: skip
def test_pretrain_configuration_errors_are_one_line_and_exit_2(tmp_path, capsys, make_overrides, needle):
    overrides = make_overrides(tmp_path)
    if not any(o.startswith("train.output_dir=") for o in overrides):
        overrides.append(f"train.output_dir={tmp_path / 'run'}")
    code, err = _pretrain(capsys, "--config", FIXTURE_CONFIG, *overrides)
    assert code == 2
    line = _one_error_line(err)
    assert line.startswith("error: ") and needle in line


def test_pretrain_missing_config_file(tmp_path, capsys):
    code, err = _pretrain(capsys, "--config", tmp_path / "absent.yaml")
    assert code == 2 and "does not exist" in _one_error_line(err)


@pytest.mark.parametrize(
    ("argv", "status", "needle"),
    [
        ([sys.executable, "-m", "visreg_hub.cli", "convert", "{text}", "{tmp}/out"], 1,
         "not a PyTorch checkpoint"),
        ([sys.executable, "-m", "visreg_hub.cli", "search"], 2, "the following arguments are required"),
        ([sys.executable, "-m", "visreg_hub.cli", "list", "--bogus-flag"], 2, "unrecognized arguments"),
        ([sys.executable, str(ROOT / "training/pretrain.py"), "--config", str(FIXTURE_CONFIG),
          "data.path=/tmp", "train.output_dir={tmp}/run"], 2, "needs a file"),
        # the [serve] extra missing: None in sys.modules makes each import raise ImportError
        ([sys.executable, "-c", "import sys; sys.modules.update(starlette=None, fastapi=None, uvicorn=None); "
          "from visreg_hub.cli import main; sys.exit(main(['serve', '--api-keys', '{text}']))"], 1,
         "pip install 'visreg_hub[serve]'"),
    ],
)  # fmt: skip
def test_real_processes_exit_1_or_2_without_a_traceback(tmp_path, argv, status, needle):
    text = _text_file(tmp_path, "ckpt.pth")
    command = [part.format(tmp=tmp_path, text=text) for part in argv]
    result = subprocess.run(command, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == status, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and needle in result.stderr


def test_library_errors_are_visreg_hub_errors(model_dir):
    """The same failures through the Python API: project types, never a bare RuntimeError."""
    from visreg_hub.hub import from_pretrained

    with pytest.raises(DeviceError):
        from_pretrained(model_dir, device="bogus")
    with pytest.raises(VisregHubError):
        from_pretrained(model_dir, device="cuda:7")
    from training.config import load_config

    with pytest.raises(ConfigError):
        from training.checks import model_config

        model_config(load_config(FIXTURE_CONFIG, ["model.depth=100000"]))


def test_bad_arguments_to_the_python_api_are_visreg_hub_errors_and_value_errors(model_dir):
    """``except VisregHubError`` catches bad arguments too (they were bare ValueErrors: probe 6, F5), and
    ``except ValueError`` still does."""
    from visreg_hub.hub import from_pretrained
    from visreg_hub.losses import VISRegLoss
    from visreg_hub.retrieval import EmbeddingIndex
    from visreg_hub.retrieval.metrics import knn_accuracy

    model = from_pretrained(model_dir, backend="torch")
    image = np.zeros((16, 16, 3), np.uint8)
    zeros = np.zeros((4, 8), np.float32)
    calls = {
        "encode batch_size=0": lambda: model.encode([image], batch_size=0),
        "encode on_error": lambda: model.encode([image], on_error="ignore"),
        "encode precision": lambda: model.encode([image], precision="int4"),
        "from_pretrained dtype": lambda: from_pretrained(model_dir, dtype="fp8"),
        "from_pretrained backend": lambda: from_pretrained(model_dir, backend="tensorflow"),
        "index search k=0": lambda: EmbeddingIndex(8).search(zeros, k=0),
        "loss on a 1-D input": lambda: VISRegLoss(num_slices=8)(torch.zeros(8)),
        "knn with mismatched labels": lambda: knn_accuracy(zeros, np.zeros(3), zeros, np.zeros(4), k=2),
    }
    for name, call in calls.items():
        with pytest.raises(VisregHubError) as caught:
            call()
        assert isinstance(caught.value, ValueError), name


def test_the_package_raises_no_bare_value_error():
    """The class, not the examples: no ``raise ValueError(...)`` is left in visreg_hub (a new one would
    escape ``except VisregHubError``); raise UserInputError, ConfigError, CheckpointError, ... instead."""
    import ast

    bare = []
    for path in sorted((ROOT / "visreg_hub").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            call = node.exc if isinstance(node, ast.Raise) else None
            func = call.func if isinstance(call, ast.Call) else None
            if isinstance(func, ast.Name) and func.id == "ValueError":
                bare.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert bare == []
