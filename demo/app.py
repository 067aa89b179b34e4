"""The visreg_hub Gradio demo: feature extraction and gallery retrieval with a VISReg ViT, offline.

Launch::

    python -m demo.app [--model PATH_OR_NAME] [--gallery DIR] [--host 127.0.0.1] [--port 7860]
                       [--cache-dir DIR] [--device auto] [--max-file-size 10mb] [--max-pixels N]

Without ``--model``/``--gallery`` it serves the bundled sets of ``demo.service.BUNDLED_SETS``: the
colour-photo model ``vit-tiny-p8-colour`` with the photo gallery (``demo/assets/photo-gallery``) by default,
then ``vit-tiny-p4-fmnist`` with the Fashion-MNIST gallery (models shipped in visreg_hub/assets).
Both flags can be repeated; the first one is
the default in the UI menus and the bundled assets are always offered too. Users pick among what the
operator named, never a path of their own. The UI logic lives in :mod:`demo.service`; this module only
lays out the page and wires events.

One process serves both the UI (at ``/``) and the HTTP inference API of ``visreg-hub serve``
(``/v1/embeddings``, ``/v1/models``, ``/health``, ``/metrics``, ``/openapi.json``; see
:mod:`demo.server`): each model is loaded once and the UI's embeddings go through the API's batcher.

Serving safety: uploads are limited in bytes (``--max-file-size``, enforced by Gradio's upload route) and
pixels (``--max-pixels``), must have an image extension and decode in one of the library's
``DEFAULT_FORMATS`` (PNG/JPEG/GIF/BMP/DIB/TIFF/WebP/PPM/ICO);
errors reach the user as a message (no traceback); the queue is bounded; Gradio may serve only its
own cache, the galleries and the bundled examples; only the ``search`` and ``extract`` events are
callable by name (``/gradio_api/call/...``); JPEGs much larger than the model's input are decoded at a
reduced size, freed memory goes back to the OS when idle; the per-run temporary folder (uploads, Gradio's
cache, ``.npy`` downloads) is removed when the server stops (Ctrl-C or SIGTERM).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import functools
import html
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no phoning home

from demo.cache import scan_gallery
from demo.menus import BUNDLED_SETS, example_set
from demo.server import combined_app, mount_ui
from demo.service import MAX_K, DemoService, UserInputError
from demo.uploads import DEMO_MAX_PIXELS
from visreg_hub.argtypes import file_size, float_range, int_range, port_number
from visreg_hub.errors import MissingExtraError, VisregHubError
from visreg_hub.inference import IMAGE_EXTENSIONS
from visreg_hub.models.config import POOLINGS
from visreg_hub.serving.config import Limits
from visreg_hub.serving.memory import bound_allocator
from visreg_hub.serving.server import listening_sockets, run_app

try:
    import gradio as gr
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise MissingExtraError(
        "the demo needs gradio, which is not installed; install it with: pip install 'visreg_hub[demo]'"
    ) from exc

logger = logging.getLogger("demo")

DEFAULT_POOLING = "model default"
CSS = """
#examples img, #results img, #query-preview img { image-rendering: pixelated; }
#view-image img, #pca-image img, #overlay-image img { image-rendering: pixelated; }
"""
INTRO = """\
# visreg_hub: VISReg image embeddings

Upload an image (or click an example), then **search** the gallery for the most similar images or
**extract** its embedding and see its patch tokens' first three principal components as colours.
Everything runs locally; no image leaves this server.
"""


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/visreg_hub/demo`` (``~/.cache/visreg_hub/demo`` by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "visreg_hub" / "demo"


def user_errors(fn: Callable) -> Callable:
    """Turn errors into a message in the UI: the user's own mistakes as is, anything else as a short
    notice with the details in the server log (never a traceback in the browser)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UserInputError as exc:
            logger.info("refused request: %s", exc)
            raise gr.Error(html.escape(str(exc)), print_exception=False) from None
        except VisregHubError as exc:  # model or gallery problems: the operator's, but worth showing
            logger.warning("request failed: %s", exc)
            raise gr.Error(html.escape(str(exc)), print_exception=False) from None
        except gr.Error:
            raise
        except Exception:
            logger.exception("unexpected error in %s", fn.__name__)
            message = "Something went wrong on the server; the error was logged."
            raise gr.Error(message, print_exception=False) from None

    return wrapper


def chosen(items: Sequence[Any], index: Any, what: str) -> Any:
    """``items[index]`` for a click event's index, which a script (not the page) may send as anything."""
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(items):
        raise UserInputError(f"there is no {what} number {index!r}; pick one of the {len(items)} shown")
    return items[index]


def display(image, size: int = 224):
    """Upscale small images by an integer factor (crisp pixels) and shrink large ones, for display."""
    from PIL import Image

    longest = max(image.size)
    if longest < size:
        factor = max(1, size // longest)
        return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)
    if longest > 2 * size:
        image = image.copy()
        image.thumbnail((2 * size, 2 * size))
    return image


# no "share": it only says "Must be on Spaces to share" (and no image should leave the server)
IMAGE_BUTTONS = ["download", "fullscreen"]
RETRIEVAL_CLEARED = (None, None, [])  # results, scores, hit paths
FEATURES_CLEARED = ("", None, None, None, None, None)  # stats, plot, .npy, model input, PCA, overlay


def build_app(service: DemoService, *, top_k: int = 8) -> gr.Blocks:
    """Lay out the page and wire its events to ``service``.

    Named API endpoints (for ``gradio_client``): ``/search`` (model, gallery, image, k) -> (gallery,
    results JSON) and ``/extract`` (model, image, pooling, normalize) -> (stats, plot, .npy,
    model view, PCA, overlay). The other events (previews, picks, menus) are private to the page.
    """
    import pandas as pd

    examples = [(str(p), p.stem) for p in service.examples()]

    @user_errors
    def preview(path: str | None):
        return None if path is None else display(service.check_query(path))

    @user_errors
    def search(model_key: str, gallery_key: str, path: str | None, k: float):
        outcome = service.search(model_key, gallery_key, path, k)  # the service refuses a k like 2.5
        # the score first: a narrow caption cuts the label, not the number
        items = [(str(hit.path), f"{hit.score:.3f} · {hit.label}") for hit in outcome.hits]
        return items, [hit.as_dict() for hit in outcome.hits], [str(hit.path) for hit in outcome.hits]

    gallery_keys = {choice.key for choice in service.gallery_choices}
    bundled_keys = {bundled.key for bundled in BUNDLED_SETS}

    def status(model_key: str, gallery_key: str) -> str:
        """The status line of a model and gallery, or what keeps them from being used.

        why not an error: a raised one leaves every output as it was, so the results of the previous
        gallery stayed on the page under the name of the one that failed to load.
        """
        try:
            return service.describe(model_key, gallery_key)
        except VisregHubError as exc:
            logger.warning("cannot use model %r with gallery %r: %s", model_key, gallery_key, exc)
            return f"**Cannot search this gallery:** {html.escape(str(exc))}"

    @user_errors
    def switch_model(model_key: str, gallery_key: str):
        """A new model: its bundled gallery when the gallery shown is another bundled one; old outputs go."""
        if model_key in bundled_keys & gallery_keys and gallery_key in bundled_keys:
            gallery_key = model_key
        return (gallery_key, *RETRIEVAL_CLEARED, *FEATURES_CLEARED)

    def clear_retrieval():
        return RETRIEVAL_CLEARED

    @user_errors
    def extract(model_key: str, path: str | None, pooling: str, normalize: bool):
        pooling = None if pooling in (None, "", DEFAULT_POOLING) else pooling
        result = service.extract(model_key, path, pooling=pooling, normalize=bool(normalize))
        values = result.embedding
        stats = (
            f"| dimension | L2 norm | pooling | normalised | min | max | mean | patch grid |\n"
            f"|---|---|---|---|---|---|---|---|\n"
            f"| {values.shape[0]} | {result.norm:.4f} | {result.pooling} | {'yes' if normalize else 'no'} "
            f"| {values.min():.4f} | {values.max():.4f} | {values.mean():.4f} | "
            f"{result.grid[0]}x{result.grid[1]} |"
        )
        frame = pd.DataFrame({"dimension": range(values.shape[0]), "value": values.astype(float)})
        return stats, frame, str(result.npy_path), result.model_view, result.pca, result.overlay

    @user_errors
    def pick(paths: list[str] | None, evt: gr.SelectData) -> str:
        return chosen(paths or [], evt.index, "result")

    @user_errors
    def pick_example(gallery_key: str, evt: gr.SelectData) -> str:
        """The clicked example becomes the query; a note when it belongs to another bundled set than the
        gallery shown (a garment searched among photos finds clipart at cosine 0.98, which means nothing)."""
        path = chosen(examples, evt.index, "example")[0]
        own = example_set(Path(path))
        if own is not None and own.key in gallery_keys and gallery_key in bundled_keys - {own.key}:
            label = next(c.label for c in service.gallery_choices if c.key == own.key)
            gr.Warning(f"This example comes with the {html.escape(label)} set; choose that set in the menus "
                       "to search it among its own kind (it is searched in the gallery shown).")  # fmt: skip
        return path

    with gr.Blocks(title="visreg_hub demo", analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        gr.Markdown(INTRO)
        with gr.Row():
            model = gr.Dropdown(
                [(c.label, c.key) for c in service.model_choices], value=service.default_model,
                label="Model", elem_id="model-choice",
            )  # fmt: skip
            gallery = gr.Dropdown(
                [(c.label, c.key) for c in service.gallery_choices], value=service.default_gallery,
                label="Gallery", elem_id="gallery-choice",
            )  # fmt: skip
        info = gr.Markdown(service.describe(), elem_id="status")
        with gr.Row():
            with gr.Column(scale=1):
                query = gr.File(
                    label="Query image",
                    file_types=list(IMAGE_EXTENSIONS),
                    type="filepath",
                    elem_id="query-file",
                )
                example_gallery = gr.Gallery(
                    examples, label="Examples (click one)", columns=3, height=260, allow_preview=False,
                    elem_id="examples",
                )  # fmt: skip
                query_view = gr.Image(
                    label="Query", interactive=False, format="png", height=240, elem_id="query-preview",
                    buttons=IMAGE_BUTTONS,
                )  # fmt: skip
            with gr.Column(scale=2), gr.Tabs():
                with gr.Tab("Retrieval", id="retrieval"):
                    with gr.Row():
                        k = gr.Slider(1, MAX_K, value=top_k, step=1, label="k (results)", elem_id="k")
                        search_button = gr.Button("Search", variant="primary", elem_id="search-button")
                    results = gr.Gallery(
                        label="Most similar gallery images (click one to search from it)", columns=4,
                        height=420, allow_preview=False, elem_id="results",
                    )  # fmt: skip
                    with gr.Accordion("Scores (JSON)", open=False):
                        table = gr.JSON(label="Cosine similarities", elem_id="results-json")
                    hit_paths = gr.State([])
                with gr.Tab("Feature extraction", id="features"):
                    with gr.Row():
                        pooling = gr.Dropdown(
                            [DEFAULT_POOLING, *POOLINGS],
                            value=DEFAULT_POOLING,
                            label="Pooling",
                            elem_id="pooling",
                        )
                        normalize = gr.Checkbox(value=True, label="L2-normalise", elem_id="normalize")
                        extract_button = gr.Button("Extract", variant="primary", elem_id="extract-button")
                    stats = gr.Markdown(elem_id="embedding-stats")
                    plot = gr.LinePlot(
                        x="dimension", y="value", label="Embedding values by dimension", height=220,
                        elem_id="embedding-plot",
                    )  # fmt: skip
                    download = gr.File(label="Embedding (.npy)", interactive=False, elem_id="embedding-npy")
                    with gr.Row():
                        view = gr.Image(
                            label="Model input",
                            interactive=False,
                            format="png",
                            height=260,
                            elem_id="view-image",
                            buttons=IMAGE_BUTTONS,
                        )
                        pca = gr.Image(
                            label="PCA of patch tokens",
                            interactive=False,
                            format="png",
                            height=260,
                            elem_id="pca-image",
                            buttons=IMAGE_BUTTONS,
                        )
                        overlay = gr.Image(
                            label="Overlay",
                            interactive=False,
                            format="png",
                            height=260,
                            elem_id="overlay-image",
                            buttons=IMAGE_BUTTONS,
                        )

        private = {"api_visibility": "private"}
        retrieval_outputs = [results, table, hit_paths]
        feature_outputs = [stats, plot, download, view, pca, overlay]
        search_io = {"fn": search, "inputs": [model, gallery, query, k], "outputs": retrieval_outputs}
        query.change(preview, query, query_view, **private)
        work = [search_button.click(**search_io, api_name="search")]
        # picking an example or a result makes it the query and searches from it
        for picked in (example_gallery.select(pick_example, gallery, query, **private),
                       results.select(pick, hit_paths, query, **private)):  # fmt: skip
            work += [picked, picked.success(**search_io, **private)]
        work.append(extract_button.click(extract, [model, query, pooling, normalize], feature_outputs,
                                         api_name="extract"))  # fmt: skip
        # a menu change clears the outputs of the other model or gallery and cancels the work still running
        # for them. why .change: .input also fires when a menu loses the focus unchanged (a click on Search
        # after opening one), and its cancel then swallowed that search. The paired gallery that
        # switch_model sets fires the gallery's change too, which clears the same outputs again.
        # why the status line in a step of its own: it may wait for the gallery's index to be built, and
        # a clearing answered after that wait wiped the results of a search made meanwhile (probe)
        model.change(switch_model, [model, gallery], [gallery, *retrieval_outputs, *feature_outputs],
                     cancels=work, **private).then(status, [model, gallery], info, **private)  # fmt: skip
        gallery.change(clear_retrieval, None, retrieval_outputs, cancels=work, **private).then(
            status, [model, gallery], info, **private
        )
        # a page opened later shows the galleries as they are now, not as they were at start-up
        demo.load(status, [model, gallery], info, **private)
    return demo


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m demo.app", description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", default=[], metavar="PATH_OR_NAME",
                        help="model folder, registry name or org/repo (repeatable; the first is the default; "
                             "the bundled models are always offered)")  # fmt: skip
    parser.add_argument(
        "--gallery",
        action="append",
        default=[],
        metavar="DIR",
        help="folder of images to search (repeatable; the bundled gallery is always offered)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0: all)")
    parser.add_argument(  # GRADIO_SERVER_PORT: gradio's own variable for the default port
        "--port", type=port_number, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860"))
    )
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir(),
                        help="where gallery indexes are cached (default: %(default)s)")  # fmt: skip
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--max-file-size", type=file_size, default="10mb",
                        help="upload size limit (e.g. 5mb, 500kb)")  # fmt: skip
    parser.add_argument("--max-pixels", type=int_range(1), default=DEMO_MAX_PIXELS,
                        help="upload pixel limit, width*height (default: %(default)s)")  # fmt: skip
    parser.add_argument("--request-timeout-s", type=float_range(0.0, low_open=True),
                        default=Limits.request_timeout_s,
                        help="seconds a request body may take to arrive, and an API request to be "
                             "answered, before 408 (default: %(default)s)")  # fmt: skip
    parser.add_argument("--queue-size", type=int_range(1), default=16, help="requests waiting at most")
    parser.add_argument("--concurrency", type=int_range(1), default=2,
                        help="requests running at once per event")  # fmt: skip
    parser.add_argument("--top-k", type=int_range(1, MAX_K), default=8,
                        help=f"default number of results (1-{MAX_K}, the slider's range)")  # fmt: skip
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser.parse_args(argv)


def _stop_on_sigterm(_signum, _frame) -> None:
    # why: SIGTERM would end Python without atexit; as KeyboardInterrupt, main() closes the server and
    # the temporary folder is removed
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Start the server (blocks until Ctrl-C or SIGTERM). Returns the exit status."""
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("httpx", "faiss.loader"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:  # first: a port already taken is reported before the models load
        sockets = listening_sockets(args.host, args.port)
    except VisregHubError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        return _serve(args, sockets)
    finally:
        for sock in sockets:
            sock.close()


def _serve(args: argparse.Namespace, sockets: list) -> int:
    """Load the models and galleries, build the page and serve it with the API on ``sockets``."""
    workspace = Path(tempfile.mkdtemp(prefix="visreg-demo-"))
    atexit.register(shutil.rmtree, workspace, ignore_errors=True)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    # uploads and Gradio's cache of served files live in the workspace, so they go with it
    os.environ.setdefault("GRADIO_TEMP_DIR", str(workspace / "gradio"))
    try:
        service = DemoService(
            args.model, args.gallery, cache_dir=args.cache_dir, download_dir=workspace / "downloads",
            device=args.device, max_pixels=args.max_pixels,
        )  # fmt: skip
        # loads every model once; the UI uses them and the API's batcher, within the UI's limits
        app = combined_app(
            service, max_image_bytes=args.max_file_size, request_timeout_s=args.request_timeout_s
        )
        logger.info("%s", service.describe())  # builds/loads the default gallery's index now
        for choice in service.gallery_choices[1:]:  # the others are indexed when picked; listed now
            scan_gallery(choice.source)
    except (VisregHubError, OSError, ValueError) as exc:
        shutil.rmtree(workspace, ignore_errors=True)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    demo = build_app(service, top_k=args.top_k)
    demo.queue(max_size=args.queue_size, default_concurrency_limit=args.concurrency)
    app = mount_ui(app, demo, service, max_file_size=args.max_file_size, css=CSS)
    logger.info("temporary files in %s (removed at exit); index cache in %s", workspace, args.cache_dir)
    logger.info("UI at http://%s:%d/ , HTTP API under /v1 (schema: /openapi.json)", args.host, args.port)
    bound_allocator()
    try:
        # uvicorn handles SIGTERM/SIGINT (closing Gradio first ends the event streams browser tabs hold
        # open), then re-raises it: _stop_on_sigterm turns that into KeyboardInterrupt, caught below
        # requests in flight get request_timeout_s + 5 s, as under `visreg-hub serve`, and at least the
        # 15 s Gradio's own connections (event streams, queue joins) take to wind down
        grace = max(15.0, args.request_timeout_s + 5.0)
        run_app(app, args.host, args.port, log_level="warning", graceful_s=grace,
                before_shutdown=functools.partial(demo.close, verbose=False), sockets=sockets)  # fmt: skip
    except KeyboardInterrupt:
        logger.info("stopped")
    except SystemExit as exc:  # uvicorn exits when it cannot bind (e.g. the port is taken)
        if exc.code not in (0, None):
            print(f"error: cannot serve on {args.host}:{args.port} (see the log above)", file=sys.stderr)
            return 2
    finally:
        with contextlib.suppress(Exception):
            demo.close(verbose=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
