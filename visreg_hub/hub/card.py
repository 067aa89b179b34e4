"""Model card (README.md): Hub metadata built with huggingface_hub's ModelCardData/EvalResult, plus a body.

Metadata: ``library_name: timm`` with a ``visreg_hub`` tag. The folder *is* a timm checkpoint (and loads
in transformers), so the Hub's timm integration gives users a "Use this model" snippet that works with
the library they already have, the timm widget, and download counts; ``library_name: visreg_hub`` is
unknown to the Hub and would show none of these. The body's usage section shows visreg_hub, timm and
transformers. ``datasets`` holds Hub dataset ids only (:func:`hub_dataset_id`): local folders, file
lists and unknown names are left out of the metadata (never a local path) and described in the body.

Evaluation results are dicts ``{"task", "dataset", "metric", "value"}`` with optional ``"split"`` and
``"command"`` (the command that produced the number), from the ``eval_results`` argument or
``config.extra["eval_results"]``. Those on a Hub dataset also become ``model-index`` entries
(:class:`huggingface_hub.EvalResult`); all of them are in the body's table. The body's text is
``hub/card.md`` (``$placeholders``, :class:`string.Template`).
"""

from __future__ import annotations

import json
import logging
import re
from importlib import resources
from string import Template
from typing import Any

from visreg_hub.errors import ConfigError
from visreg_hub.models.config import DEFAULT_LICENSE, ModelConfig

logger = logging.getLogger(__name__)

LIBRARY_NAME = "timm"
LICENSE_TEXT = {
    "cc-by-nc-4.0": (
        "Creative Commons Attribution-NonCommercial 4.0 (CC BY-NC 4.0), inherited from the official VISReg "
        "release: non-commercial use only, with attribution to the VISReg authors."
    ),
    "apache-2.0": "Apache License 2.0.",
}
BASE_TAGS = ("visreg_hub", "self-supervised", "vision-transformer", "image-feature-extraction")
REQUIRED_RESULT_KEYS = ("task", "dataset", "metric", "value")
# The names this project uses for public datasets -> their Hugging Face Hub dataset ids.
HUB_DATASETS = {
    "fashion-mnist": "zalando-datasets/fashion_mnist",
    "fashion_mnist": "zalando-datasets/fashion_mnist",
    "fmnist": "zalando-datasets/fashion_mnist",
    "imagenet-1k": "ILSVRC/imagenet-1k",
    "imagenet1k": "ILSVRC/imagenet-1k",
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}$")
PLACEHOLDER_FOLDER = "path/to/this/folder"


def hub_dataset_id(name: str) -> str | None:
    """The Hub dataset id for a dataset name, or None when it is not one (a local path, a source tag).

    Known names map through :data:`HUB_DATASETS`; otherwise only ``org/name`` ids are accepted.
    """
    name = str(name).strip()
    if name.lower() in HUB_DATASETS:
        return HUB_DATASETS[name.lower()]
    if _HUB_ID.match(name) and ".." not in name and not name.endswith((".", "-")):
        return name
    return None


def _validate_results(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    checked = []
    for position, result in enumerate(results):
        if not isinstance(result, dict):
            raise ConfigError(f"eval_results[{position}] must be a dict, got {type(result).__name__}")
        missing = [key for key in REQUIRED_RESULT_KEYS if key not in result]
        if missing:
            raise ConfigError(
                f"eval_results[{position}] lacks {missing}; "
                "give task, dataset, metric, value (+ split, command)"
            )
        checked.append(dict(result))
    return checked


def _task_type(task: str) -> str:
    """The Hub task id at the start of a task description ("image-classification (kNN, k=20)")."""
    return str(task).split(" ", 1)[0].split("(", 1)[0] or "image-feature-extraction"


def _protocol(task: str) -> str:
    """The part of a task description in parentheses ("kNN, k=20"), or the description."""
    match = re.search(r"\((.*)\)", str(task))
    return match.group(1) if match else str(task)


def card_data(
    config: ModelConfig,
    *,
    license: str,
    datasets: list[str],
    eval_results: list[dict[str, Any]],
    tags: list[str] | None = None,
):
    """The card's metadata as a :class:`huggingface_hub.ModelCardData`."""
    from huggingface_hub import EvalResult, ModelCardData

    hub_ids = list(dict.fromkeys(i for i in map(hub_dataset_id, datasets) if i))
    dropped = [name for name in datasets if hub_dataset_id(name) is None]
    if dropped:
        logger.info("datasets %s are not Hub dataset ids; left out of the card metadata", dropped)
    name = config.name or config.architecture
    # the objective's own tag after the library's: a VICReg model is not tagged "visreg"
    base_tags = [BASE_TAGS[0], OBJECTIVE_TAGS[objective_key(config.extra)], *BASE_TAGS[1:]]
    hub_results = []
    for result in eval_results:
        dataset_id = hub_dataset_id(result["dataset"])
        if dataset_id is None:
            continue  # model-index entries must name a Hub dataset; the body's table has every result
        split = str(result.get("split") or "").split(" ", 1)[0] or None
        hub_results.append(
            EvalResult(
                task_type=_task_type(result["task"]),
                task_name=_task_type(result["task"]),
                dataset_type=dataset_id,
                dataset_name=dataset_id.split("/")[-1],
                dataset_split=split,
                metric_type=str(result["metric"]),
                metric_value=result["value"],
                metric_name=f"{result['metric']} ({_protocol(result['task'])})",
            )
        )
    return ModelCardData(
        license=license,
        library_name=LIBRARY_NAME,
        # the pipeline converts every image to RGB, so it cannot feed a 1-channel model: no tag, no widget
        # that would fail
        pipeline_tag="image-feature-extraction" if config.in_chans == 3 else None,
        tags=list(dict.fromkeys([*base_tags, *(tags or [])])),
        datasets=hub_ids or None,
        metrics=sorted({str(r["metric"]) for r in eval_results}) or None,
        model_name=name if hub_results else None,
        eval_results=hub_results or None,
    )


def _dataset_label(name: str) -> str:
    """A dataset name fit to publish: its Hub id, a plain name, or "own data" (never a local path)."""
    hub_id = hub_dataset_id(name)
    if hub_id:
        return hub_id
    return "own data" if any(char in str(name) for char in "/\\:~") else str(name)


def _evaluation_section(results: list[dict[str, Any]], command: str | None) -> str:
    if not results:
        return "No evaluation numbers were recorded with this checkpoint."
    lines = ["| task | dataset | split | metric | value | command |", "|---|---|---|---|---|---|"]
    for r in results:
        cmd = r.get("command") or command or ""
        lines.append(
            f"| {r['task']} | {_dataset_label(r['dataset'])} | {r.get('split', '')} | {r['metric']} | "
            f"{r['value']} | {'`' + cmd + '`' if cmd else ''} |"
        )
    if command:
        lines += ["", "Produced by:", "", "```bash", command, "```"]
    return "\n".join(lines)


def _training_section(extra: dict[str, Any]) -> str:
    parts = []
    for key, title in (("recipe", "Recipe"), ("loss", "Loss")):
        if extra.get(key):
            parts.append(f"{title}:\n\n```json\n{json.dumps(extra[key], indent=2, sort_keys=True)}\n```")
    if extra.get("source"):
        parts.insert(0, f"Source: {extra['source']}")
    if extra.get("train_command"):
        parts.append(f"Command:\n\n```bash\n{extra['train_command']}\n```")
    return "\n\n".join(parts) if parts else "Training details were not recorded with this checkpoint."


OBJECTIVES = {"visreg": "VISReg", "sigreg": "SIGReg (LeJEPA)", "swd": "sliced-Wasserstein (SWD)",
              "vicreg": "VICReg", "barlow": "Barlow Twins"}  # fmt: skip


OBJECTIVE_TAGS = {"visreg": "visreg", "sigreg": "sigreg", "swd": "sliced-wasserstein", "vicreg": "vicreg",
                  "barlow": "barlow-twins"}  # fmt: skip


def objective_key(extra: dict[str, Any]) -> str:
    """The loss name (a key of :data:`OBJECTIVES`) a checkpoint was trained with, from its recipe or loss
    block ("visreg" when neither says: converted official releases)."""
    for block, key in (("recipe", "method"), ("loss", "name")):
        value = extra.get(block, {}).get(key) if isinstance(extra.get(block), dict) else None
        if isinstance(value, str) and value.lower() in OBJECTIVES:
            return value.lower()
    return "visreg"


def training_objective(extra: dict[str, Any]) -> str:
    """The objective a checkpoint was trained with, as the card names it (``"VICReg"``, ...)."""
    return OBJECTIVES[objective_key(extra)]


def render_model_card(
    config: ModelConfig,
    *,
    embedding_dim: int,
    repo_id: str | None = None,
    load_name: str | None = None,
    license: str | None = None,
    datasets: list[str] | None = None,
    eval_results: list[dict[str, Any]] | None = None,
    eval_command: str | None = None,
    description: str | None = None,
    tags: list[str] | None = None,
) -> str:
    """README.md text for a checkpoint folder (YAML metadata checked by ``huggingface_hub.ModelCard``).

    Arguments override the corresponding ``config.extra`` entries (``license``, ``datasets``,
    ``eval_results``, ``eval_command``, ``description``).

    Args:
        config: the model's configuration (architecture, data config, extra metadata).
        embedding_dim: length of the default embedding.
        repo_id: Hub repository ``org/name``; the usage snippets load it by that id.
        load_name: what the visreg_hub snippet passes to ``from_pretrained`` when there is no repo_id
            (e.g. a registry name); default: a ``path/to/this/folder`` placeholder.
        license: license id for the metadata (default: ``config.extra["license"]`` or apache-2.0).
        datasets: training datasets (Hub ids or known names; others stay out of the metadata).
        eval_results: evaluation numbers (see module docstring).
        eval_command: command that produced the evaluation numbers.
        description: one paragraph under the title.
        tags: extra Hub tags.
    """
    from huggingface_hub import ModelCard

    extra = config.extra
    license = license or extra.get("license") or DEFAULT_LICENSE
    datasets = [str(d) for d in (datasets if datasets is not None else extra.get("datasets", []))]
    results = _validate_results(
        list(eval_results if eval_results is not None else extra.get("eval_results", []))
    )
    eval_command = eval_command or extra.get("eval_command")
    name = config.name or config.architecture
    data = card_data(config, license=license, datasets=datasets, eval_results=results, tags=tags)
    hub_ids = data.datasets or []
    local = len(datasets) > len([d for d in datasets if hub_dataset_id(d)])
    data_row = [f"[{d}](https://huggingface.co/datasets/{d})" for d in hub_ids]
    data_row += ["own data, not on the Hugging Face Hub"] if local else []
    details = {
        "architecture": f"timm `{config.architecture}`",
        "image size / patch": (
            f"{config.img_size} / {config.patch_size} (dynamic size: {config.dynamic_img_size})"
        ),
        "input channels": f"{config.in_chans} ({'RGB' if config.in_chans == 3 else 'grayscale'})",
        "width / depth / heads": f"{config.embed_dim} / {config.depth} / {config.num_heads}",
        "register tokens": str(config.num_reg_tokens),
        "default pooling": f"`{config.pooling}` ({embedding_dim}-d)",
        "preprocessing": (
            f"resize {config.interpolation}, crop mode {config.crop_mode} (crop_pct {config.crop_pct}), "
            f"mean {list(config.mean)}, std {list(config.std)}"
        ),
        "training data": ", ".join(data_row) or "not recorded",
    }
    objective = training_objective(extra)
    folder = repo_id or PLACEHOLDER_FOLDER
    template = Template(resources.files("visreg_hub.hub").joinpath("card.md").read_text(encoding="utf-8"))
    body = template.substitute(
        title=name,
        description=description or extra.get("description") or f"{objective} image encoder `{name}`.",
        objective=objective,
        architecture=config.architecture,
        backbone_shape=(
            f"width {config.embed_dim}, {config.depth} blocks, {config.patch_size} px patches at "
            f"{config.img_size} px"
        ),
        load_name=repo_id or load_name or PLACEHOLDER_FOLDER,
        timm_name=f"hf-hub:{repo_id}" if repo_id else f"local-dir:{PLACEHOLDER_FOLDER}",
        transformers_name=folder,
        mode="RGB" if config.in_chans == 3 else "L",
        embedding_dim=embedding_dim,
        embed_dim=config.embed_dim,
        pooling=config.pooling,
        pipeline_note=(
            ""
            if config.in_chans == 3
            else ' This model takes 1-channel images: give `AutoImageProcessor` grayscale (`"L"`) images; '
            '`pipeline("image-feature-extraction")` converts inputs to RGB and cannot feed it.'
        ),
        details_table="\n".join(f"| {key} | {value} |" for key, value in details.items()),
        training=_training_section(extra),
        evaluation=_evaluation_section(results, eval_command),
        license_text=LICENSE_TEXT.get(license, f"`{license}`."),
    )
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}"))
