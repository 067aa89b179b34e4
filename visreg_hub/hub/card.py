"""Model card (README.md) generation: YAML metadata for the Hub plus a human-readable body.

The template is ``hub/card.md`` (``$placeholders``, :class:`string.Template`). Metadata follows the
Hugging Face model card conventions: ``license``, ``library_name``, ``pipeline_tag``, ``tags``,
``datasets``, ``metrics`` and, when evaluation numbers are known, a ``model-index`` block.

Evaluation results are dicts ``{"task", "dataset", "metric", "value"}`` with optional ``"split"`` and
``"command"`` (the command that produced the number). They come from the ``eval_results`` argument or
``config.extra["eval_results"]``.
"""

from __future__ import annotations

import json
from importlib import resources
from string import Template
from typing import Any

import yaml

from visreg_hub.errors import ConfigError
from visreg_hub.hub.format import DEFAULT_LICENSE
from visreg_hub.models.config import ModelConfig

LICENSE_TEXT = {
    "cc-by-nc-4.0": (
        "Creative Commons Attribution-NonCommercial 4.0 (CC BY-NC 4.0), inherited from the official VISReg "
        "release: non-commercial use only, with attribution to the VISReg authors."
    ),
    "apache-2.0": "Apache License 2.0.",
}
BASE_TAGS = (
    "visreg_hub",
    "timm",
    "image-feature-extraction",
    "self-supervised",
    "vision-transformer",
    "visreg",
)
REQUIRED_RESULT_KEYS = ("task", "dataset", "metric", "value")


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


def _model_index(name: str, results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    entries = []
    for result in results:
        dataset = {"name": str(result["dataset"]), "type": str(result["dataset"])}
        if result.get("split"):
            dataset["split"] = str(result["split"])
        entries.append(
            {
                "task": {"type": "image-feature-extraction", "name": str(result["task"])},
                "dataset": dataset,
                "metrics": [
                    {"type": str(result["metric"]), "value": result["value"], "name": str(result["task"])}
                ],
            }
        )
    return [{"name": name, "results": entries}]


def card_metadata(
    config: ModelConfig,
    *,
    license: str,
    datasets: list[str],
    eval_results: list[dict[str, Any]],
    tags: list[str] | None = None,
) -> dict[str, Any]:
    """YAML front matter of the card, as a dict."""
    metadata: dict[str, Any] = {
        "license": license,
        "library_name": "visreg_hub",
        "pipeline_tag": "image-feature-extraction",
        "tags": list(dict.fromkeys([*BASE_TAGS, *(tags or [])])),
    }
    if datasets:
        metadata["datasets"] = list(datasets)
    if eval_results:
        metadata["metrics"] = sorted({str(r["metric"]) for r in eval_results})
        metadata["model-index"] = _model_index(config.name or config.architecture, eval_results)
    return metadata


def _evaluation_section(results: list[dict[str, Any]], command: str | None) -> str:
    if not results:
        return "No evaluation numbers were recorded with this checkpoint."
    lines = ["| task | dataset | split | metric | value | command |", "|---|---|---|---|---|---|"]
    for r in results:
        cmd = r.get("command") or command or ""
        lines.append(
            f"| {r['task']} | {r['dataset']} | {r.get('split', '')} | {r['metric']} | {r['value']} | "
            f"{'`' + cmd + '`' if cmd else ''} |"
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


def render_model_card(
    config: ModelConfig,
    *,
    embedding_dim: int,
    repo_id: str | None = None,
    license: str | None = None,
    datasets: list[str] | None = None,
    eval_results: list[dict[str, Any]] | None = None,
    eval_command: str | None = None,
    description: str | None = None,
    tags: list[str] | None = None,
) -> str:
    """README.md text for a checkpoint folder.

    Arguments override the corresponding ``config.extra`` entries (``license``, ``datasets``,
    ``eval_results``, ``eval_command``, ``description``).

    Args:
        config: the model's configuration (architecture, data config, extra metadata).
        embedding_dim: length of the default embedding.
        repo_id: Hub repository, used in the usage snippet (the folder name otherwise).
        license: license id for the metadata (default: ``config.extra["license"]`` or apache-2.0).
        datasets: training datasets for the metadata.
        eval_results: evaluation numbers (see module docstring).
        eval_command: command that produced the evaluation numbers.
        description: one paragraph under the title.
        tags: extra Hub tags.
    """
    extra = config.extra
    license = license or extra.get("license") or DEFAULT_LICENSE
    datasets = list(datasets if datasets is not None else extra.get("datasets", []))
    results = _validate_results(
        list(eval_results if eval_results is not None else extra.get("eval_results", []))
    )
    eval_command = eval_command or extra.get("eval_command")
    name = config.name or config.architecture
    load_name = repo_id or "path/to/this/folder"
    metadata = card_metadata(config, license=license, datasets=datasets, eval_results=results, tags=tags)
    details = {
        "architecture": f"timm `{config.architecture}`",
        "image size / patch": (
            f"{config.img_size} / {config.patch_size} (dynamic size: {config.dynamic_img_size})"
        ),
        "width / depth / heads": f"{config.embed_dim} / {config.depth} / {config.num_heads}",
        "register tokens": str(config.num_reg_tokens),
        "default pooling": f"`{config.pooling}` ({embedding_dim}-d)",
        "preprocessing": (
            f"resize {config.interpolation}, centre crop {config.crop_pct}, mean {list(config.mean)}, "
            f"std {list(config.std)}"
        ),
        "datasets": ", ".join(datasets) or "not recorded",
    }
    template = Template(resources.files("visreg_hub.hub").joinpath("card.md").read_text(encoding="utf-8"))
    return template.substitute(
        metadata=yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True).strip(),
        title=name,
        description=description or extra.get("description") or f"VISReg image encoder `{name}`.",
        architecture=config.architecture,
        load_name=load_name,
        timm_name=f"hf-hub:{repo_id}" if repo_id else "local-dir:/path/to/this/folder",
        embedding_dim_example=f"2, {embedding_dim}",
        details_table="\n".join(f"| {key} | {value} |" for key, value in details.items()),
        training=_training_section(extra),
        evaluation=_evaluation_section(results, eval_command),
        license_text=LICENSE_TEXT.get(license, f"`{license}`."),
    )
