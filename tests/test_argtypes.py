"""Start-up flags that would leave a server running but broken are refused by argparse (exit 2, the
flag named): demo --concurrency 0 hung every request, --top-k 500 failed every search against the
slider's range, --queue-size 0 refused everything, --max-file-size banana and --port 99999 crashed
with a traceback; serve --index NAME=FILE named neither the flag nor the fix."""

from __future__ import annotations

import argparse

import pytest

from visreg_hub.argtypes import file_size, int_range, port_number


@pytest.mark.parametrize(
    ("text", "expected"), [("10mb", 10 * 2**20), ("500KB", 500 * 1024), ("2048", 2048), ("1.5gb", 3 * 2**29)]
)
def test_file_size_parses_units(text, expected):
    assert file_size(text) == expected


@pytest.mark.parametrize("text", ["banana", "0", "0mb", "-5mb", "10 tb", ""])
def test_file_size_refuses_nonsense(text):
    with pytest.raises(argparse.ArgumentTypeError, match="10mb"):
        file_size(text)


def test_int_range_bounds_are_inclusive():
    parse = int_range(1, 50)
    assert parse("1") == 1 and parse("50") == 50
    for text in ("0", "51", "x", "2.5"):
        with pytest.raises(argparse.ArgumentTypeError, match="between 1 and 50"):
            parse(text)
    assert port_number("0") == 0 and port_number("65535") == 65535
    with pytest.raises(argparse.ArgumentTypeError):
        port_number("99999")


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--concurrency", "0"], "--concurrency"),
        (["--top-k", "500"], "--top-k"),
        (["--top-k", "0"], "--top-k"),
        (["--queue-size", "0"], "--queue-size"),
        (["--max-file-size", "banana"], "--max-file-size"),
        (["--port", "99999"], "--port"),
        (["--max-pixels", "0"], "--max-pixels"),
    ],
)
def test_demo_refuses_flags_that_would_break_it(argv, flag, capsys):
    pytest.importorskip("gradio")
    from demo.app import parse_args

    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2 and f"argument {flag}" in capsys.readouterr().err


def test_demo_top_k_default_fits_the_slider():
    pytest.importorskip("gradio")
    from demo.app import parse_args
    from demo.service import MAX_K

    args = parse_args([])
    assert 1 <= args.top_k <= MAX_K and args.max_file_size == 10 * 2**20


def test_serve_refuses_a_bad_port_and_a_file_as_index_folder(tmp_path, capsys):
    from visreg_hub.cli import main
    from visreg_hub.errors import ConfigError
    from visreg_hub.serving.config import index_spec

    for flag, value in (("--port", "99999"), ("--max-items", "-1"), ("--max-queue", "0")):
        assert main(["serve", flag, value]) == 2
        assert f"argument {flag}" in capsys.readouterr().err
    afile = tmp_path / "notes.txt"
    afile.write_text("x")
    with pytest.raises(ConfigError, match="exists and is not a folder"):
        index_spec(f"shop={afile}")
    assert index_spec(f"shop={tmp_path / 'new'}").folder == tmp_path / "new"
