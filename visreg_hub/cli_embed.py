"""``visreg-hub embed`` and ``visreg-hub index build|inspect`` (registered from :mod:`visreg_hub.cli`).

    visreg-hub embed photos/ lists.txt shard-{0000..0099}.tar -o embeddings/   # resumable parquet shards
    visreg-hub embed photos/ -o emb.npy                                        # one file (small sets)
    visreg-hub index build embeddings/ -o gallery-index --max-memory 2GB --target-recall 0.95
    visreg-hub index inspect gallery-index

Thin: parses flags and calls :func:`visreg_hub.bulk.run_embedding`,
:func:`visreg_hub.retrieval.build.build_index` and :func:`visreg_hub.retrieval.read_manifest`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from visreg_hub.cli_common import expand_image_inputs, load_model, model_reference, progress, warn
from visreg_hub.errors import UserInputError, printable
from visreg_hub.hub.registry import DEFAULT_MODEL

DEFAULT_SHARD_SIZE = 5000
SINGLE_FILE_SUFFIXES = (".npy", ".parquet")
# an output named like one of these is a mistyped single file, not a shard folder
_FILE_LIKE = (
    ".csv",
    ".json",
    ".jsonl",
    ".txt",
    ".npz",
    ".pt",
    ".pth",
    ".h5",
    ".pkl",
    ".tar",
    ".zip",
    ".arrow",
)


def cmd_embed(args: argparse.Namespace) -> int:
    out = Path(args.output)
    if out.suffix.lower() in SINGLE_FILE_SUFFIXES:
        _warn_ignored(args)
        return _embed_single_file(args)
    if out.suffix.lower() in _FILE_LIKE or out.is_file():
        raise UserInputError(
            f"output {args.output!r} must end with .npy or .parquet (one file), or name a folder for "
            f"resumable parquet shards"
        )
    if args.on_error == "raise":
        raise UserInputError(
            "--on-error raise needs a single .npy/.parquet output; shard folders always record unreadable "
            "inputs in failures.jsonl"
        )
    if args.overwrite:
        warn(
            f"--overwrite applies to single-file outputs only; the shard folder {args.output} resumes "
            f"(remove it to start over)"
        )
    from visreg_hub.bulk import run_embedding

    summary = run_embedding(
        args.inputs,
        args.output,
        model=args.model,  # recorded by run_embedding as index build and search record it
        shard_size=DEFAULT_SHARD_SIZE if args.shard_size is None else args.shard_size,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        pooling=args.pooling,
        normalize=not args.no_normalize,
        device=args.device,
        dtype=args.dtype,
        engine=args.engine or "local",
        show_progress_bar=progress(args),
        draft_decode=args.draft_decode,
        max_pixels=args.max_pixels,
    )
    print(summary.line())
    return 0


def _warn_ignored(args: argparse.Namespace) -> None:
    """Say which shard-folder options a single-file output ignores (silently ignoring them would let a
    user believe the run is resumable or runs on Ray)."""
    ignored = [flag for flag, value in (("--shard-size", args.shard_size), ("--engine", args.engine))
               if value is not None]  # fmt: skip
    if ignored:
        warn(
            f"{' and '.join(ignored)} {'apply' if len(ignored) > 1 else 'applies'} to shard-folder outputs "
            f"only; ignored for the single file "
            f"{args.output} (pass a folder as -o for resumable shards)"
        )


def _embed_single_file(args: argparse.Namespace) -> int:
    """All embeddings in memory, one .npy/.parquet file + its sidecar (for small sets)."""
    from visreg_hub.durable import check_writable
    from visreg_hub.errors import ImageDecodeError
    from visreg_hub.retrieval.files import check_suffix, sidecar_path, write_embeddings

    out = check_suffix(args.output, "output")  # fail before the slow part (and before torch is imported)
    _refuse_existing(out, sidecar_path(out), overwrite=args.overwrite)
    check_writable(out)
    listings = [i for i in args.inputs if Path(i).suffix.lower() in (".txt", ".tar") and Path(i).is_file()]
    if listings:
        # why: a one-file output names its rows by image path; tar members and list lines are embedded
        # (with their keys, .cls/.json sides and per-line failures) by the shard-folder job
        raise UserInputError(
            f"{listings[0]}: .txt lists and .tar shards are read into a shard folder, not a single "
            f"{out.suffix} file; pass a folder as -o (e.g. -o {out.with_suffix('')}/), then "
            f"`visreg-hub index build` reads it"
        )
    on_error = args.on_error or "raise"
    from visreg_hub.bulk.listing import check_no_overlap  # imports torch: after the checks above

    check_no_overlap(args.inputs, [os.path.abspath(Path(i).expanduser()) for i in args.inputs])
    paths = expand_image_inputs(args.inputs, keep_missing=on_error == "skip")  # skip: a failure each
    from visreg_hub.hub.format import weights_digest  # timm: seconds, after every check above
    from visreg_hub.inference import encode

    model = load_model(args.model, args.device)
    pooling = args.pooling if args.pooling is not None else model.config.pooling
    try:
        result = encode(
            model, paths, batch_size=args.batch_size, pooling=pooling, normalize=not args.no_normalize,
            device=args.device, dtype=args.dtype, num_workers=args.num_workers,
            show_progress_bar=progress(args), convert_to_numpy=True, on_error=on_error,
            draft_decode=args.draft_decode, max_pixels=args.max_pixels,
        )  # fmt: skip
    except ImageDecodeError as exc:
        message = str(exc).replace("pass on_error='skip'", "pass --on-error skip")
        raise UserInputError(message) from exc
    failures = result.failures if on_error == "skip" else []
    embeddings = result.embeddings if on_error == "skip" else result
    failed = {f.index for f in failures}
    if len(failed) == len(paths):
        raise UserInputError(
            f"none of the {len(paths)} images could be embedded; first failure: {failures[0].reason}"
        )
    sidecar = write_embeddings(
        out,
        embeddings,
        paths=[p for i, p in enumerate(paths) if i not in failed],
        failures=[(paths[f.index], f.reason) for f in failures],
        model=model_reference(args.model),
        pooling=pooling,
        normalized=not args.no_normalize,
        weights_sha256=weights_digest(model),
    )
    rows, dim = len(paths) - len(failed), model.embedding_dim(pooling)
    # model.backend after the call: what actually ran (an unusable ONNX cache falls back to torch)
    device = next(model.parameters()).device.type
    print(f"wrote {rows} x {dim} embeddings to {out} (paths: {sidecar}) with {model.backend} on {device}")
    if failures:
        first = printable(failures[0].reason)  # names a file of someone's folder: escape it
        print(f"{len(failures)} image(s) failed and were skipped; first: {first}", file=sys.stderr)
    return 0


def _refuse_existing(*outputs: Path, overwrite: bool) -> None:
    """A UserInputError naming the first of ``outputs`` that exists, unless ``overwrite``.

    why: embedding a large set or building an index can take hours; a mistyped -o must not replace one.
    """
    existing = next((path for path in outputs if path.exists() or path.is_symlink()), None)
    if existing is not None and not overwrite:
        raise UserInputError(
            f"{existing} already exists; pass --overwrite to replace it, or choose another -o/--output"
        )


# which index kinds read each build parameter
_PARAM_KINDS = {"nlist": ("ivf", "ivfsq8", "ivfpq"), "nprobe": ("ivf", "ivfsq8", "ivfpq"), "pq_m": ("ivfpq",),
                "m": ("hnsw",), "ef_search": ("hnsw",)}  # fmt: skip


def cmd_index_build(args: argparse.Namespace) -> int:
    from visreg_hub.durable import check_writable
    from visreg_hub.retrieval.build import RECALL_K, build_index
    from visreg_hub.retrieval.manifest import MANIFEST_NAME
    from visreg_hub.retrieval.storage import check_index_output, output_folder

    fixed = {name: getattr(args, name) for name in ("nlist", "nprobe", "pq_m", "m", "ef_search")}
    fixed = {name: value for name, value in fixed.items() if value is not None}
    kind = args.kind
    if fixed and kind == "auto":
        raise UserInputError(f"--{next(iter(fixed)).replace('_', '-')} needs an explicit --kind (not auto)")
    for name in fixed:  # as `search` warns: a value the chosen kind never reads is a likely mistake
        kinds = _PARAM_KINDS[name]
        if kind not in kinds:
            flag, wanted = name.replace("_", "-"), " / ".join(kinds)
            warn(f"--{flag} applies to --kind {wanted} only; ignored for --kind {kind}")
    # a folder that is not an index's (an embed output, other files) first: --overwrite would not help there
    check_index_output(args.output)
    # an earlier index in the folder (the library replaces it; the command asks first)
    _refuse_existing(output_folder(args.output) / MANIFEST_NAME, overwrite=args.overwrite)
    check_writable(output_folder(args.output))  # the index is staged beside its folder, then renamed
    index = build_index(
        args.embeddings,
        args.output,
        kind=kind,
        max_memory=args.max_memory,
        target_recall=args.target_recall,
        metric=args.metric,
        normalize=args.normalize,
        model_name=model_reference(args.model) if args.model else None,
        num_queries=args.queries,
        paths_file=args.paths,
        overwrite=args.overwrite,
        **fixed,
    )
    info = index.build_info
    recall = info[f"recall_at_{RECALL_K}"]
    print(
        f"built {info['factory']} index ({args.metric}) of {len(index)} x {index.dim} vectors in "
        f"{args.output}: about {_size(info['estimated_bytes'])} in memory, recall@{RECALL_K} {recall:.3f} "
        f"on {len(info['query_ids'])} held-out queries"
    )
    if index.model_name is None:
        print("no model recorded in the index; `search` will need --model", file=sys.stderr)
    return 0


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB" if nbytes >= 2**20 else f"{nbytes / 2**10:.1f} KiB"


def cmd_index_inspect(args: argparse.Namespace) -> int:
    from visreg_hub.retrieval.storage import verify_index

    # every check load() and search make (one home): an index that inspects clean also loads
    manifest = verify_index(args.index).manifest
    build = {key: value for key, value in manifest["build"].items() if key != "query_ids"}
    fields = ("kind", "factory", "metric", "dim", "count", "next_id", "model_name", "pooling", "normalized",
              "params")  # fmt: skip
    summary = {key: manifest[key] for key in fields}
    summary["build"] = build
    summary["files"] = {name: "sha256 and contents verified" for name in manifest["files"]}
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    for key, value in summary.items():
        print(f"{key:>11}: {json.dumps(value)}")
    return 0


def add_embed_parsers(commands, common: argparse.ArgumentParser) -> None:
    """Register ``embed`` and ``index build|inspect`` on the ``visreg-hub`` sub-command parser."""
    from visreg_hub.argtypes import int_range, user_path
    from visreg_hub.models.limits import DEFAULT_MAX_PIXELS

    p = commands.add_parser("embed", parents=[common], help="embed images, file lists or tar shards")
    p.add_argument(
        "inputs", nargs="+", metavar="INPUT",
        help="folders and image files; .txt lists and .tar shards too with a shard folder as -o",
    )  # fmt: skip
    p.add_argument("-o", "--output", required=True, type=user_path,
                   help="output folder of resumable parquet shards, or one .npy/.parquet file")  # fmt: skip
    p.add_argument(
        "--model", default=DEFAULT_MODEL, help=f"registry name, Hub repo or folder ({DEFAULT_MODEL})"
    )
    p.add_argument(
        "--shard-size",
        type=int_range(1),
        help=f"inputs per parquet shard (the unit of resume; {DEFAULT_SHARD_SIZE})",
    )
    p.add_argument("--batch-size", type=int_range(1), default=64, help="images per forward pass (default 64)")
    p.add_argument("--pooling", help="cls | cls_last2 | cls_last4 | mean_patch (default: the model's)")
    p.add_argument("--on-error", choices=("raise", "skip"),
                   help="single-file output: stop at an unreadable image (raise, default) or skip it; "
                        "shard folders always skip and record it in failures.jsonl")  # fmt: skip
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--dtype", help="bf16 or fp16 autocast (for GPUs; on a CPU slower and less exact; "
                                   "default: the model's dtype)")  # fmt: skip
    p.add_argument("--max-pixels", type=int_range(1), default=DEFAULT_MAX_PIXELS,
                   help="decompression-bomb cap per image, width*height (%(default)s); raise it only for "
                        "files you trust")  # fmt: skip
    p.add_argument(
        "--num-workers",
        type=int_range(0),
        default=0,
        help="decoding worker processes (default 0: decode in the main process)",
    )
    p.add_argument("--no-normalize", action="store_true", help="keep raw (not L2-normalised) embeddings")
    p.add_argument("--draft-decode", action="store_true",
                   help="decode JPEGs far larger than the model's input at 1/2-1/8 scale: faster on camera "
                        "photos, embeddings close to (not equal to) a full decode")  # fmt: skip
    p.add_argument("--engine", choices=("local", "ray"), help="local (default; one process per rank) or ray")
    p.add_argument(
        "--overwrite", action="store_true", help="replace an existing .npy/.parquet output (default: refuse)"
    )
    p.set_defaults(func=cmd_embed)

    p = commands.add_parser("index", parents=[common], help="build or inspect an embedding index")
    actions = p.add_subparsers(dest="index_command", metavar="ACTION")
    b = actions.add_parser("build", parents=[common], help="build a FAISS index from embeddings")
    b.add_argument(
        "embeddings", nargs="+", type=user_path, help="`embed` output folders and/or .npy/.parquet files"
    )
    b.add_argument("-o", "--output", required=True, type=user_path, help="index folder to write")
    b.add_argument("--kind", choices=("auto", "flat", "ivf", "ivfsq8", "ivfpq", "hnsw"), default="auto",
                   help="auto: the most accurate index within --max-memory (flat without one)")  # fmt: skip
    b.add_argument("--max-memory", help="FAISS memory budget, e.g. 256MB or 2GB (default: none)")
    b.add_argument("--target-recall", type=float, default=0.95,
                   help="recall@10 the search effort is tuned to reach: the least nprobe / ef_search that "
                        "meets it on held-out queries (default 0.95)")  # fmt: skip
    b.add_argument(
        "--queries",
        type=int_range(1),
        default=1000,
        help="held-out queries for measuring recall (>= 1; 1000)",
    )
    b.add_argument("--metric", choices=("ip", "l2"), default="ip", help="inner product (cosine) or L2")
    b.add_argument(
        "--paths", type=user_path, help="file naming the rows of one .npy file (default: its sidecar)"
    )
    b.add_argument("--model", help="model to record for `search` (default: the embed job's)")
    b.add_argument("--nlist", type=int_range(1),
                   help="IVF cells (explicit IVF kinds; default 4*sqrt(N), at most N/39)")  # fmt: skip
    b.add_argument(
        "--nprobe", type=int_range(1), help="IVF cells searched per query (default: tuned to the target)"
    )
    b.add_argument("--pq-m", type=int_range(1), help="IVF-PQ bytes per vector (must divide the dimension)")
    b.add_argument("--m", type=int_range(1), help="HNSW neighbours per node (default 32)")
    b.add_argument(
        "--ef-search", type=int_range(1), help="HNSW search beam width (default: tuned to the target)"
    )
    b.add_argument("--normalize", action="store_true", help="L2-normalise vectors (cosine with --metric ip)")
    b.add_argument("--overwrite", action="store_true", help="replace an index in -o (default: refuse)")
    b.set_defaults(func=cmd_index_build)
    i = actions.add_parser(
        "inspect", parents=[common], help="verify an index folder as loading does; print its manifest summary"
    )
    i.add_argument("index", type=user_path, help="index folder")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.set_defaults(func=cmd_index_inspect)
    p.set_defaults(func=None, subparser=p)
