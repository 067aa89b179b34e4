"""``visreg-hub``: the command line. Thin: every sub-command parses arguments and calls the library.

    visreg-hub list [pattern]
    visreg-hub embed photos/ -o embeddings/ --model vit-b16-in1k  # resumable parquet shards
    visreg-hub index build embeddings/ -o gallery-index            # paths/model from the embed job
    visreg-hub search gallery-index query.jpg -k 5                 # model taken from the index manifest
    visreg-hub convert visreg-vit-b-inet1k.pth vit-b16-in1k/ --arch vit-b16

Results go to stdout, diagnostics and progress bars to stderr. Exit codes: 0 success, 1 user error
(one-line message; ``--verbose`` adds the traceback), 2 usage error (argparse).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import sys
import traceback
from pathlib import Path

from visreg_hub import __version__
from visreg_hub.argtypes import int_range, user_path
from visreg_hub.cli_common import expand_image_inputs, load_model, model_reference, progress, warn
from visreg_hub.errors import ImageDecodeError, UserInputError, is_expected, one_line, printable
from visreg_hub.native_io import name_fields

logger = logging.getLogger("visreg_hub.cli")


# ------------------------------------------------------------------------------------------ commands
def cmd_list(args: argparse.Namespace) -> int:
    from visreg_hub.hub import list_models

    entries = list_models(args.pattern)
    if args.json:
        rows = [
            {key: getattr(e, key, None) for key in ("name", "status", "license", "repo_id", "description")}
            for e in entries
        ]
        print(json.dumps(rows, indent=2))
        return 0
    if not entries:
        print(f"no registry model matches {args.pattern!r}", file=sys.stderr)
        return 0
    width = max(len(e.name) for e in entries)
    status_width = max(len(e.status) for e in entries)
    for e in entries:
        print(f"{e.name:<{width}}  {e.status:<{status_width}}  {e.license:<14}  {e.description}")
    return 0


def _check_weights(index, model, model_name: str) -> None:
    """Warn when the index records the weights that embedded it and ``model`` has other weights.

    why: a retrained folder keeps its config's name, so the name check passes while every score compares
    embeddings of two different models (cosines near 0.4 for the same image).
    """
    from visreg_hub.hub.format import weights_digest

    built = index.build_info.get("weights_sha256") if isinstance(index.build_info, dict) else None
    if isinstance(built, str) and built != weights_digest(model):
        warn(
            f"model {model_name!r} does not have the weights the index was built with (weights sha256 "
            f"{built[:12]}...): scores compare embeddings of two models; search with the model folder that "
            f"embedded the index, or rebuild the index with this model"
        )


def _recorded_model(name: str | None, index_folder: str) -> str:
    """The model an index records, when ``search`` may load it without ``--model``.

    A registry name (pinned by this package) or a model folder on this machine is loaded; a Hub repository
    is not: the index folder may come from someone else, and it must not choose what is downloaded.
    """
    from visreg_hub.hub.registry import find_entry

    if name is None:
        raise UserInputError(f"the index {index_folder!r} records no model; pass --model NAME")
    if find_entry(name) is not None:
        return name
    if Path(name).is_absolute() and Path(name).is_dir():
        note = f"using the model the index records: {name} (pass --model to choose another)"
        print(printable(note), file=sys.stderr)  # the name comes from the index folder: escape it
        return name
    if Path(name).is_absolute():  # a folder on the machine that built the index: moved, deleted or elsewhere
        raise UserInputError(
            f"the index {index_folder!r} records the model folder {name!r}, which does not exist here "
            "(moved or deleted, or the index was built on another machine); pass --model with the "
            "folder's new location or the model's name"
        )
    raise UserInputError(
        f"the index {index_folder!r} records the model {name!r}, which is neither a registry model nor a "
        f"model folder on this machine; pass --model {name!r} to download and use it (an index folder does "
        "not choose what is downloaded)"
    )


def cmd_search(args: argparse.Namespace) -> int:
    from visreg_hub.inference import encode
    from visreg_hub.retrieval import EmbeddingIndex

    if args.k < 1:
        raise UserInputError(f"-k must be a positive integer, got {args.k}")
    queries = expand_image_inputs(args.images, keep_missing=args.on_error == "skip")
    index = EmbeddingIndex.load(args.index)
    _apply_search_options(args, index)
    model_name = args.model or _recorded_model(index.model_name, args.index)
    model = load_model(model_name, args.device)
    same = {model_reference(args.model), model.config.name} if args.model else set()
    if args.model and index.model_name and index.model_name not in same:  # the bundled folder is its name
        warn(
            f"--model {args.model!r} is not the model the index was built with ({index.model_name!r}); "
            f"scores compare embeddings of two models and mean little unless they share weights"
        )
    _check_weights(index, model, model_name)
    dim = model.embedding_dim(index.pooling)
    if dim != index.dim:
        raise UserInputError(
            f"model {model_name!r} gives {dim}-dimensional embeddings (pooling {index.pooling!r}) but the "
            f"index holds {index.dim}-dimensional ones; pass the --model the index was built with"
        )
    try:
        encoded = encode(
            model,
            queries,
            pooling=index.pooling,
            normalize=index.normalized,
            device=args.device,
            show_progress_bar=progress(args),
            convert_to_numpy=True,
            on_error=args.on_error,
        )
    except ImageDecodeError as exc:  # its hint names encode()'s on_error; the flag is --on-error here
        instead = "fix or remove that query image, or pass --on-error skip"
        message = re.sub(r"pass on_error=.skip.[^)]*", instead, str(exc))
        raise UserInputError(message) from exc
    embeddings = encoded
    if args.on_error == "skip":
        for failure in encoded.failures:
            warn(f"query skipped: {failure.reason}")
        failed = {failure.index for failure in encoded.failures}
        queries = [query for i, query in enumerate(queries) if i not in failed]
        embeddings = encoded.embeddings
        if not queries:
            raise UserInputError("no query image could be decoded (each is listed above)")
    result = index.search(embeddings, k=args.k)
    report = [
        {
            **name_fields(query, "query"),  # a non-UTF-8 name: readable text plus its exact bytes
            "metric": index.metric,  # "ip": higher score is closer; "l2": score is a squared distance
            "results": [
                {"rank": rank + 1, "score": float(score), "id": int(hit), "metadata": meta}
                for rank, (score, hit, meta) in enumerate(zip(scores, ids, metas, strict=True))
                if hit != -1
            ],
        }
        for query, scores, ids, metas in zip(queries, result.scores, result.ids, result.metadata, strict=True)
    ]
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    score_name = "score" if index.metric == "ip" else "sq-dist"
    for entry in report:
        print(f"query: {printable(entry['query'])}")
        print(f"  {'rank':>4}  {score_name:>8}  {'id':>8}  path")
        for hit in entry["results"]:
            meta = hit["metadata"] or {}
            path = meta.get("path", "") + (f"#{meta['key']}" if meta.get("key") else "")  # tar members
            print(f"  {hit['rank']:>4}  {hit['score']:>8.4f}  {hit['id']:>8}  {printable(str(path))}")
    return 0


def _apply_search_options(args: argparse.Namespace, index) -> None:
    """Set --nprobe / --ef-search on the index, saying so when the index kind has no such setting."""
    from visreg_hub.retrieval.factory import IVF_KINDS

    if args.nprobe is not None:
        if index.kind in IVF_KINDS:
            index.nprobe = args.nprobe
        else:
            warn(f"--nprobe applies to IVF indexes; this index is {index.kind!r}, so it is ignored")
    if args.ef_search is not None:
        if index.kind == "hnsw":
            index.ef_search = args.ef_search
        else:
            warn(f"--ef-search applies to HNSW indexes; this index is {index.kind!r}, so it is ignored")


def cmd_convert(args: argparse.Namespace) -> int:
    from visreg_hub.hub.convert import convert_official_checkpoint

    source = Path(args.checkpoint)
    if not source.is_file():
        raise UserInputError(f"checkpoint not found: {str(source)!r}")
    if source.suffix.lower() not in (".pth", ".pt", ".bin"):
        raise UserInputError(
            f"{str(source)!r} is not an official .pth checkpoint (got suffix {source.suffix!r})"
        )
    output = Path(args.output)
    if output.is_dir() and any(output.iterdir()) and not args.overwrite:
        holds = (
            "a model"
            if (output / "config.json").exists() or (output / "model.safetensors").exists()
            else "files"
        )
        raise UserInputError(
            f"{str(output)!r} already holds {holds}; pass --overwrite to replace it, or choose another folder"
        )
    out = convert_official_checkpoint(source, args.output, arch=args.arch)
    print(f"converted {source} ({args.arch}) to {out or args.output}")
    return 0


# -------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    """The argparse tree of ``visreg-hub`` (exposed for documentation and tests)."""
    # SUPPRESS defaults: a sub-command's copy of these flags must not reset a value given before it
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS,
        help="info logging, full tracebacks",
    )
    common.add_argument(
        "--no-progress", action="store_true", default=argparse.SUPPRESS, help="never show progress bars"
    )

    parser = argparse.ArgumentParser(
        prog="visreg-hub",
        description="VISReg image embeddings: list models, embed images, build and search FAISS indexes.",
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"visreg-hub {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = commands.add_parser("list", parents=[common], help="list named models in the registry")
    p.add_argument("pattern", nargs="?", help="substring or glob (e.g. 'vit-l14*') to filter names")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_list)

    from visreg_hub.cli_embed import add_embed_parsers  # `embed` and `index build|inspect` live there

    add_embed_parsers(commands, common)

    p = commands.add_parser(
        "search", parents=[common], help="find the nearest indexed images of query images"
    )
    p.add_argument("index", type=user_path, help="index folder written by `visreg-hub index build`")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="query image files and/or folders")
    p.add_argument("-k", type=int_range(1), default=5, help="neighbours per query (default 5)")
    p.add_argument("--model", help="model to embed the queries (default: the one in the index manifest)")
    p.add_argument("--device", help="cpu, cuda, ...")
    p.add_argument("--nprobe", type=int_range(1), help="override the IVF nprobe")
    p.add_argument("--ef-search", type=int_range(1), help="override the HNSW ef_search")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument(
        "--on-error", choices=("raise", "skip"), default="raise",
        help="stop at an unreadable query (raise, default) or warn and search the others",
    )  # fmt: skip
    p.set_defaults(func=cmd_search)

    p = commands.add_parser(
        "convert", parents=[common], help="convert an official VISReg .pth to a model folder"
    )
    p.add_argument(
        "checkpoint", type=user_path, help="official .pth file (loaded with torch.load(weights_only=True))"
    )
    p.add_argument(
        "output", type=user_path, help="folder to write config.json + model.safetensors + README.md"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a model already in the output folder (default: refuse)",
    )
    p.add_argument("--arch", default="vit-b16", help="architecture of the checkpoint (vit-b16, vit-l14)")
    p.set_defaults(func=cmd_convert)
    from visreg_hub.cli_export import add_export_parser  # `export onnx` lives there: keeps this file short

    add_export_parser(commands, common)
    from visreg_hub.cli_serve import add_serve_parser

    add_serve_parser(commands, common)
    return parser


class _PrintableFormatter(logging.Formatter):
    """Log lines with control characters escaped (:func:`~visreg_hub.errors.printable`), as the CLI's own
    messages are: the file names and tar keys a warning names come from someone's folder, and an escape
    sequence in one would drive the terminal. A traceback (``-v``) keeps its lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        return printable(super().formatMessage(record))


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's flush at exit cannot raise BrokenPipeError again."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def main(argv: list[str] | None = None) -> int:
    """Run ``visreg-hub`` with ``argv`` (default ``sys.argv[1:]``) and return the exit code."""
    try:
        parser = build_parser()  # Ctrl-C here is an interrupt too
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version (0) and usage errors (2)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    except KeyboardInterrupt:
        print("visreg-hub: interrupted", file=sys.stderr)
        return 130
    verbose = getattr(args, "verbose", False)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_PrintableFormatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, handlers=[handler])
    # huggingface_hub logs through its own stderr handler; propagating too would print each of its
    # retry warnings twice (once bare, once through ours).
    logging.getLogger("huggingface_hub").propagate = False
    if progress(args) is None:  # a bulk job's progress lines where its bar cannot show (stderr no terminal)
        logging.getLogger("visreg_hub.bulk.progress").setLevel(logging.INFO)
    func = getattr(args, "func", None)
    if func is None:
        (getattr(args, "subparser", None) or parser).print_help(sys.stderr)
        return 2
    try:
        code = func(args)
        sys.stdout.flush()  # here, not at exit: a reader that closed the pipe is then handled below
        return code
    except KeyboardInterrupt:
        print("visreg-hub: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `visreg-hub ... | head`: the reader has what it wanted; stop quietly
        _silence_stdout()
        return 141  # 128 + SIGPIPE, what a shell tool the pipe killed reports
    except Exception as exc:  # one line for everything; --verbose shows where it came from
        if verbose:
            traceback.print_exc()
        hint = "" if is_expected(exc) else " (unexpected: rerun with -v and report the traceback)"
        print(f"visreg-hub: error: {one_line(exc)}{hint}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
