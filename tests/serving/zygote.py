"""A pre-imported parent that forks ``visreg-hub serve`` processes on demand (for the kill -9 tests).

A server process costs seconds of imports (torch, timm, FastAPI); forking one from a parent that has
already imported them costs milliseconds, so a test can kill and restart the server many times. Each
child runs the real entry point, ``visreg_hub.cli.main(["serve", ...])``, in its own process.

Protocol (one JSON line per command on stdin, one JSON line answer on stdout):
``["start", ARGS, LOG_PATH]`` -> ``{"pid": PID}``; ``["wait", PID]`` -> ``{"status": RC}``
(negative: killed by that signal).
"""

from __future__ import annotations

import json
import os
import sys

import faiss  # noqa: F401  - imported before forking, like everything below
import fastapi  # noqa: F401
import uvicorn  # noqa: F401

import visreg_hub.cli
import visreg_hub.serving.app
import visreg_hub.serving.routes
from visreg_hub.hub import from_pretrained  # noqa: F401


def main() -> None:
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        if command[0] == "start":
            _, args, log_path = command
            pid = os.fork()
            if pid == 0:
                fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                os.close(0)
                code = visreg_hub.cli.main(args)
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
            print(json.dumps({"pid": pid}), flush=True)
        elif command[0] == "wait":
            _, status = os.waitpid(command[1], 0)
            code = os.waitstatus_to_exitcode(status)
            print(json.dumps({"status": code}), flush=True)


if __name__ == "__main__":
    main()
