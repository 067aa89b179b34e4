"""Reading untrusted JSON (config.json, sidecars, manifests) into project errors, with size and depth caps.

``json.loads`` alone turns hostile input into ``UnicodeDecodeError``, ``RecursionError`` (deep nesting)
or a memory blow-up (huge files); here every failure is one :class:`~visreg_hub.errors.VisregHubError`
naming the file and the fix.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from visreg_hub.errors import ConfigError, VisregHubError

MAX_JSON_BYTES = 16 * 1024 * 1024
MAX_JSON_DEPTH = 64  # config.json nests 3 levels; eval results and recipes a few more


def json_depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value (scalars 0), computed without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            stack.extend((child, depth + 1) for child in item.values())
        elif isinstance(item, list):
            stack.extend((child, depth + 1) for child in item)
        else:
            deepest = max(deepest, depth)
            continue
        deepest = max(deepest, depth + 1)
    return deepest


def parse_json(
    raw: bytes | str,
    source: str,
    *,
    error: type[VisregHubError] = ConfigError,
    max_depth: int = MAX_JSON_DEPTH,
) -> Any:
    """Parse UTF-8 JSON ``raw``; every failure is ``error`` with a one-line message naming ``source``."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError as exc:
        raise error(
            f"{source} is not UTF-8 text ({exc.reason} at byte {exc.start}); rewrite it as UTF-8 JSON"
        ) from None
    try:
        value = json.loads(text)
    except RecursionError:
        raise error(f"{source} is nested too deeply to be a JSON document this library reads") from None
    except ValueError as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise error(f"{source} is not valid JSON ({message}); fix or regenerate the file") from None
    if json_depth(value) > max_depth:
        raise error(f"{source} nests deeper than {max_depth} levels; it is not a file this library writes")
    return value


def read_json_file(
    path: str | Path,
    *,
    error: type[VisregHubError] = ConfigError,
    max_bytes: int = MAX_JSON_BYTES,
    max_depth: int = MAX_JSON_DEPTH,
) -> Any:
    """Read and parse a JSON file with :func:`parse_json`; unreadable or oversized files are ``error`` too."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise error(f"{path} is {size} bytes, over the {max_bytes}-byte limit for a JSON file here")
        with open(path, "rb") as handle:
            raw = handle.read(max_bytes + 1)
    except OSError as exc:
        raise error(f"cannot read {path}: {exc.strerror or exc}") from None
    return parse_json(raw, str(path), error=error, max_depth=max_depth)
