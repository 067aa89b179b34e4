"""Run one document's code blocks in order, in the current directory (a scratch folder).

Usage: ``python runner.py blocks.json``, where the JSON is a list of ``{"where", "lang", "code", "mode"}``.
Python blocks share one namespace (like a notebook: a later block uses an earlier block's names); bash
blocks run with ``bash -euo pipefail``; ``server`` blocks start each command, wait until it listens on a
free port (``--port N`` is replaced by it and ``GRADIO_SERVER_PORT`` names it), then stop it. The first
failing block is reported as ``DOCS-BLOCK-FAILED <file>:<line>`` and the exit status is 1.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import traceback

SERVER_START_TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _commands(code: str) -> list[str]:
    """Shell commands of a block: continuation lines joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", code)
    return [line for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _run_server(command: str) -> None:
    port = _free_port()
    command = re.sub(r"--port[ =]\d+", f"--port {port}", command)
    env = {**os.environ, "GRADIO_SERVER_PORT": str(port)}
    process = subprocess.Popen(["bash", "-c", f"exec {command}"], env=env, start_new_session=True)
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    try:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(
                    f"server exited with status {process.returncode} before listening: {command}"
                )
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                print(f"server came up on port {port}: {command}", flush=True)
                return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(
            f"server did not listen on port {port} within {SERVER_START_TIMEOUT_S} s: {command}"
        )
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def run_block(block: dict, namespace: dict) -> None:
    if block["mode"] in ("server", "slow-server"):
        for command in _commands(block["code"]):
            _run_server(command)
    elif block["lang"] == "python":
        exec(compile(block["code"], block["where"], "exec"), namespace)  # the docs' own code
    else:
        subprocess.run(["bash", "-euo", "pipefail", "-c", block["code"]], check=True)


def main(path: str) -> int:
    with open(path, encoding="utf-8") as handle:
        blocks = json.load(handle)
    namespace: dict = {"__name__": "__main__"}
    for block in blocks:
        print(f"--- {block['where']} ({block['lang']}, {block['mode']})", flush=True)
        started = time.monotonic()
        try:
            run_block(block, namespace)
        except BaseException:
            traceback.print_exc()
            print(f"DOCS-BLOCK-FAILED {block['where']}", flush=True)
            return 1
        print(f"--- ok in {time.monotonic() - started:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
