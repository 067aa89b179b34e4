"""``visreg-hub serve`` flags: parsed into a ServeConfig, bad values refused with one line (no server)."""

from __future__ import annotations

import pytest

from visreg_hub.cli import build_parser, main
from visreg_hub.cli_serve import config_from_args
from visreg_hub.serving.security import hash_key


def test_flags_become_a_config(tmp_path, tiny_model_dir):
    keys = tmp_path / "keys"
    keys.write_text("k1\n")
    args = build_parser().parse_args([
        "serve", "--model", str(tiny_model_dir), "--model", "other=vit-mini-p7-fmnist",
        "--index", f"a={tmp_path / 'a'}", "--max-batch-size", "8", "--max-wait-ms", "2",
        "--api-keys", str(keys), "--max-pixels", "1000", "--max-items", "3", "--max-k", "7",
        "--request-timeout-s", "1.5", "--max-queue", "9", "--backend", "torch", "--cors-origin", "https://a.example",
        "--max-metadata-bytes", "99", "--draft-decode", "--max-image-bytes", "5000",
    ])  # fmt: skip
    config = config_from_args(args)
    assert [(m.name, m.source) for m in config.models] == [
        ("tiny", str(tiny_model_dir)), ("other", "vit-mini-p7-fmnist")
    ]  # fmt: skip
    assert config.indexes[0].name == "a" and config.indexes[0].folder == tmp_path / "a"
    assert (config.max_batch_size, config.max_wait_ms, config.backend) == (8, 2.0, "torch")
    assert config.api_key_hashes == {hash_key("k1")} and config.cors_origins == ("https://a.example",)
    limits = config.limits
    assert (limits.max_pixels, limits.max_items, limits.max_k, limits.max_queue) == (1000, 3, 7, 9)
    assert limits.request_timeout_s == 1.5 and limits.max_metadata_bytes == 99
    assert limits.max_image_bytes == 5000
    assert config.draft_decode and not config_from_args(build_parser().parse_args(["serve"])).draft_decode


def test_default_model_is_bundled_and_the_demos_photo_model():
    """A bare ``visreg-hub serve`` works offline (a bundled model) and suits photos (the demo's default)."""
    from demo.service import BUNDLED_SETS
    from visreg_hub.hub.registry import find_entry

    default = config_from_args(build_parser().parse_args(["serve"])).models[0]
    assert default.name == BUNDLED_SETS[0].model_name
    assert find_entry(default.source).local_path is not None


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["serve", "--index", "noequals"], "NAME=FOLDER"),
        (["serve", "--index", "bad/name=x"], "letters, digits"),
        (["serve", "--api-keys", "{tmp}/missing-keys"], "cannot read --api-keys"),
        (["serve", "--model", "a=x", "--model", "a=y"], "unique"),
    ],
)
def test_bad_flags_give_one_line(argv, message, capsys, tmp_path):
    assert main([arg.format(tmp=tmp_path) for arg in argv]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--max-batch-size", "0"), ("--max-wait-ms", "-1"), ("--max-wait-ms", "inf"),
     ("--request-timeout-s", "0"), ("--request-timeout-s", "nan"), ("--snapshot-every", "0"),
     ("--max-items", "x")],
)  # fmt: skip
def test_out_of_range_numbers_are_usage_errors(flag, value, capsys):
    """Every numeric flag is checked by argparse (exit 2 naming the flag), as the demo's own flags are."""
    assert main(["serve", flag, value]) == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and "Traceback" not in err


def test_a_port_in_use_is_one_line_before_any_model_loads(tiny_model_dir, monkeypatch, capsys):
    """uvicorn found the port taken only after every model had loaded, then exited 3 with its own line."""
    import socket

    import demo.app
    import visreg_hub.serving.service

    def no_loading(*_args, **_kwargs):
        raise AssertionError("a model was loaded before the port was bound")

    monkeypatch.setattr(visreg_hub.serving.service, "load_runtime", no_loading)
    monkeypatch.setattr(demo.app, "DemoService", no_loading)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--port", str(port), "--model", str(tiny_model_dir)]) == 1
        err = capsys.readouterr().err
        assert f"cannot serve on 127.0.0.1:{port}" in err and "choose another --port" in err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert demo.app.main(["--port", str(port)]) == 2
        err = capsys.readouterr().err
        assert f"error: cannot serve on 127.0.0.1:{port}" in err and len(err.strip().splitlines()) == 1


def test_every_address_of_localhost_is_bound_and_the_hint_fits_the_error():
    """`--host localhost` bound only getaddrinfo's first answer (::1 on most hosts files), so
    http://127.0.0.1 was refused where plain uvicorn served both."""
    import socket

    from visreg_hub.serving.server import listening_sockets

    sockets = listening_sockets("localhost", 0)
    try:
        addresses = {sock.getsockname()[0] for sock in sockets}
        expected = {info[4][0] for info in socket.getaddrinfo("localhost", 0, type=socket.SOCK_STREAM)}
        assert addresses == expected and "127.0.0.1" in addresses
    finally:
        for sock in sockets:
            sock.close()
    not_here = r"cannot serve on 203\.0\.113\.7:8000: .*this machine has no such address"
    with pytest.raises(ValueError, match=not_here):
        listening_sockets("203.0.113.7", 8000)  # TEST-NET-3: never an address of this machine
    with pytest.raises(ValueError, match=r"cannot serve on no-such-host\.invalid:8000: .*check --host"):
        listening_sockets("no-such-host.invalid", 8000)
