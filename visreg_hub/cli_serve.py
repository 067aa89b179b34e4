"""``visreg-hub serve``: the HTTP inference API (registered from :func:`visreg_hub.cli.build_parser`).

    visreg-hub serve                                   # the bundled photo model, offline
    visreg-hub serve --model vit-mini-p7-fmnist
    visreg-hub serve --model ./my-model --index photos=./photos-index --port 8080 --api-keys keys.txt

Thin: parses the flags into a :class:`~visreg_hub.serving.config.ServeConfig` and calls
:func:`visreg_hub.serving.server.serve`.
"""

from __future__ import annotations

import argparse
import logging

from visreg_hub.argtypes import float_range, int_range, port_number
from visreg_hub.errors import require_extra
from visreg_hub.hub.registry import DEFAULT_MODEL
from visreg_hub.serving.config import Limits, ServeConfig, index_spec, model_spec


def add_serve_parser(commands, common: argparse.ArgumentParser) -> None:
    """Add ``serve`` to the ``visreg-hub`` sub-commands."""
    defaults = Limits()
    p = commands.add_parser("serve", parents=[common], help="serve embeddings and search over HTTP")
    p.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="NAME_OR_PATH",
        help=f"model to serve, repeatable; NAME=PATH names it (default: {DEFAULT_MODEL}); "
        "the first is the default for requests",
    )
    p.add_argument(
        "--index",
        action="append",
        default=[],
        metavar="NAME=FOLDER",
        help="durable index (created if missing), repeatable",
    )
    p.add_argument("--host", default="127.0.0.1", help="interface (default 127.0.0.1; 0.0.0.0: all)")
    p.add_argument("--port", type=port_number, default=8000, help="TCP port (%(default)s)")
    p.add_argument(
        "--backend",
        choices=("auto", "torch", "onnx"),
        help="what runs the models (default: $VISREG_HUB_BACKEND or auto, as from_pretrained)",
    )
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--max-batch-size", type=int_range(1), default=32, help="images per forward pass (32)")
    p.add_argument(
        "--max-wait-ms", type=float_range(0.0), default=5.0, help="batching wait for the first image (5)"
    )
    p.add_argument("--api-keys", metavar="FILE", help="one key or sha256:<hex> per line; enables auth")
    p.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="allow browser calls from ORIGIN (repeatable; default: no CORS)",
    )
    for name, help_text in (
        ("max_body_bytes", "request body size"),
        ("max_pixels", "pixels per image (width*height)"),
        ("max_image_bytes", "encoded bytes per image"),
        ("max_items", "images or vectors per request"),
        ("max_k", "neighbours per search"),
        ("max_queue", "images waiting per model before 429"),
        ("decode_workers", "threads decoding images"),
        ("max_metadata_bytes", "JSON size of one index item's metadata"),
    ):
        flag = "--" + name.replace("_", "-")
        p.add_argument(
            flag, type=int_range(1), default=getattr(defaults, name), help=f"{help_text} (%(default)s)"
        )
    p.add_argument(
        "--request-timeout-s",
        type=float_range(0.0, low_open=True),
        default=defaults.request_timeout_s,
        help="seconds per request before 408 (%(default)s)",
    )
    p.add_argument(
        "--snapshot-every",
        type=int_range(1),
        default=10_000,
        help="log records per index snapshot (%(default)s)",
    )
    p.add_argument(
        "--on-error",
        choices=("raise", "skip"),
        default="raise",
        help="an image that cannot be embedded, when a request does not say: 'raise' fails the request "
        "with a 422 (OpenAI's behaviour), 'skip' embeds the others and lists it in `errors` (%(default)s)",
    )
    p.add_argument(
        "--draft-decode", action="store_true",
        help="decode JPEGs far larger than the model's input at 1/2-1/8 scale (faster on camera photos; "
             "embeddings close to, not equal to, encode()'s)",
    )  # fmt: skip
    p.set_defaults(func=cmd_serve)


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    from visreg_hub.serving.security import load_api_keys

    limits = Limits(
        max_body_bytes=args.max_body_bytes,
        max_pixels=args.max_pixels,
        max_image_bytes=args.max_image_bytes,
        max_items=args.max_items,
        max_k=args.max_k,
        request_timeout_s=args.request_timeout_s,
        max_queue=args.max_queue,
        decode_workers=args.decode_workers,
        max_metadata_bytes=args.max_metadata_bytes,
    )
    return ServeConfig(
        models=tuple(model_spec(m) for m in (args.model or [DEFAULT_MODEL])),
        indexes=tuple(index_spec(i) for i in args.index),
        backend=args.backend,
        device=args.device,
        max_batch_size=args.max_batch_size,
        max_wait_ms=args.max_wait_ms,
        api_key_hashes=load_api_keys(args.api_keys) if args.api_keys else frozenset(),
        cors_origins=tuple(args.cors_origin),
        limits=limits,
        snapshot_every=args.snapshot_every,
        draft_decode=args.draft_decode,
        on_error=args.on_error,
    )


def cmd_serve(args: argparse.Namespace) -> int:
    # why first: reading the flags already imports the server's web framework (--api-keys), and a
    # missing extra must be its one-line install hint, not a ModuleNotFoundError
    for module in ("fastapi", "uvicorn"):
        require_extra(module, "serve")
    from visreg_hub.serving.server import serve

    config = config_from_args(args)
    logging.getLogger("visreg_hub").setLevel(logging.INFO)
    serve(config, args.host, args.port, log_level="debug" if getattr(args, "verbose", False) else "info")
    return 0
