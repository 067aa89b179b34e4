"""Write checkpoint folders (config.json + model.safetensors + README.md) and push them to the Hub.

The folder format (file names, config.json layout, safetensors) is defined in :mod:`visreg_hub.hub.format`;
``timm.create_model("local-dir:<folder>", pretrained=True)`` and transformers'
``AutoModel.from_pretrained(folder)`` read the same folder.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from visreg_hub.durable import fsync_dir, fsync_file, remove_dead_staging
from visreg_hub.errors import UserInputError
from visreg_hub.hub import format as ckpt
from visreg_hub.hub.card import render_model_card

logger = logging.getLogger(__name__)


def save_pretrained(
    model,
    folder: str | Path,
    *,
    card: str | None = None,
    eval_results: list[dict[str, Any]] | None = None,
    eval_command: str | None = None,
    datasets: list[str] | None = None,
    license: str | None = None,
    repo_id: str | None = None,
    load_name: str | None = None,
    description: str | None = None,
    tags: list[str] | None = None,
    overwrite_card: bool = False,
) -> Path:
    """Write ``model`` as a checkpoint folder (see module docstring) and return the folder.

    Args:
        model: a :class:`~visreg_hub.models.VISRegEncoder`.
        folder: output directory (created; an existing config.json and model.safetensors are replaced,
            only once the new ones are written, so a failed save leaves the earlier files as they were).
            An existing README.md is kept, as huggingface_hub's ``save_pretrained`` does (it may hold the
            author's edits), unless ``card`` is given or ``overwrite_card`` is set.
        card: README.md text to write verbatim instead of the generated card.
        eval_results: evaluation numbers for the card (default: ``config.extra["eval_results"]``).
        eval_command: command that produced them.
        datasets: training datasets for the card metadata.
        license: license id; also stored in config.json (default: ``config.extra["license"]`` or apache-2.0).
        repo_id: Hub repository the folder is meant for (used in the card's usage snippets).
        load_name: ``from_pretrained`` name for the card's snippet when there is no repo_id (e.g. the
            registry name of a bundled model).
        description: one paragraph for the card.
        tags: extra Hub tags.
        overwrite_card: replace an existing README.md with the generated card.
    """
    from visreg_hub.models.encoder import VISRegEncoder

    if not isinstance(model, VISRegEncoder):
        raise TypeError(f"save_pretrained expects a VISRegEncoder, got {type(model).__name__}")
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{folder} exists and is not a directory; choose a folder path")
    folder.mkdir(parents=True, exist_ok=True)

    config = model.config
    # what the card shows is kept in config.json too, so loading and saving again keeps it
    given = {"license": license, "datasets": datasets, "eval_results": eval_results,
             "eval_command": eval_command, "description": description}  # fmt: skip
    kept = {key: value for key, value in given.items() if value is not None}
    if kept:
        config = config.replace(extra={**config.extra, **kept})
    if card is None and not overwrite_card and (folder / ckpt.CARD_NAME).exists():
        logger.info("kept the existing %s; pass overwrite_card=True to write the generated card",
                    folder / ckpt.CARD_NAME)  # fmt: skip
    elif card is None:
        card = render_model_card(
            config,
            embedding_dim=model.embedding_dim(),
            repo_id=repo_id,
            load_name=load_name,
            license=license,
            datasets=datasets,
            eval_results=eval_results,
            eval_command=eval_command,
            description=description,
            tags=tags,
        )
    _write_files(folder, config, model, card)
    logger.info("saved %s to %s", config.name or config.architecture, folder)
    return folder


STAGING_PREFIX = ".saving-"  # + the saving process's id: where a save writes before its renames


def interrupted_save(folder: Path) -> Path | None:
    """The staging folder of a save stopped between its renames (the weights renamed in, not yet the
    config.json), or None.

    why: only that state pairs one model's weights with another's config.json. Staging folders that hold
    every file (a save stopped while writing) or none (stopped after its renames) leave the folder as one
    consistent model, and so do hand edits and copied files: those are not refused. Nor is a staging
    folder older than the folder's config.json: a later save completed (the process id of the stopped
    save may belong to a live process by then, so its staging folder was left in place).
    """
    current = folder / ckpt.CONFIG_NAME
    for entry in folder.glob(f"{STAGING_PREFIX}*"):
        digits = entry.name[len(STAGING_PREFIX) :]
        if digits.isdigit() and entry.is_dir() and not entry.is_symlink():
            holds = {name for name in (ckpt.WEIGHTS_NAME, ckpt.CONFIG_NAME) if (entry / name).is_file()}
            pending = entry / ckpt.CONFIG_NAME
            if holds == {ckpt.CONFIG_NAME} and (
                not current.is_file() or pending.stat().st_mtime_ns >= current.stat().st_mtime_ns
            ):
                return entry
    return None


def _write_files(folder: Path, config, model, card: str | None) -> None:
    """Write the files (the card unless None) into a hidden staging folder inside ``folder``, then rename
    them in.

    why: a save that fails half way (disk full, an interrupted process) must not leave the new config.json
    beside the old weights: such a folder fails to load, or with the same architecture loads the old
    weights silently. Until the renames, ``folder`` keeps its earlier files untouched; the weights go in
    first, the card last. A kill between the two renames (microseconds) leaves the new weights beside the
    old config.json, and the new config.json in the staging folder: :func:`interrupted_save` finds that
    state, and loading the folder is refused rather than pairing one model's weights with another's
    settings. Staging folders of saves that were killed are removed by the next save into the folder.
    """
    names = (ckpt.WEIGHTS_NAME, ckpt.CONFIG_NAME) + ((ckpt.CARD_NAME,) if card is not None else ())
    remove_dead_staging(folder, STAGING_PREFIX)
    staging = folder / f"{STAGING_PREFIX}{os.getpid()}"
    staging.mkdir(exist_ok=True)
    try:
        try:
            ckpt.write_weights(staging, model)
            ckpt.write_config(staging, config, model.embedding_dim())
            if card is not None:
                (staging / ckpt.CARD_NAME).write_text(card, encoding="utf-8")
            for name in names:
                fsync_file(staging / name)
        except Exception as exc:  # safetensors raises its own SafetensorError on a failed write
            raise OSError(
                f"could not save the model to {folder} ({type(exc).__name__}: {exc}); the folder's earlier "
                "files are unchanged"
            ) from exc
        for name in names:
            os.replace(staging / name, folder / name)
        fsync_dir(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def push_to_hub(
    model,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload VISReg encoder with visreg_hub",
    revision: str | None = None,
    create_pr: bool = False,
    **card_kwargs: Any,
):
    """Save ``model`` to a temporary folder and upload it to the Hub in one commit.

    The repository is created if needed (``exist_ok``); a ``revision`` branch is created if missing.
    The token comes from ``token``, else ``HF_TOKEN`` / the stored login (huggingface_hub's rules).

    Args:
        model: a :class:`~visreg_hub.models.VISRegEncoder`.
        repo_id: ``"org/name"``.
        private: visibility of a newly created repository (None: the account default).
        token: Hub token.
        commit_message: the commit's summary line.
        revision: branch to commit to (default ``main``).
        create_pr: open a pull request instead of committing to the branch.
        **card_kwargs: forwarded to :func:`save_pretrained` (eval_results, eval_command, datasets,
            license, description, tags).

    Returns:
        huggingface_hub's ``CommitInfo`` (``.commit_url``, ``.oid``).

    Raises:
        HubRequestError: offline (``HF_HUB_OFFLINE``), no or a refused token, or the Hub unreachable.
    """
    from huggingface_hub import HfApi

    from visreg_hub.hub.remote import hub_request

    if not isinstance(repo_id, str) or repo_id.count("/") != 1 or repo_id.startswith("hf-hub:"):
        raise UserInputError(f"repo_id must look like 'org/name', got {repo_id!r}")
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:  # spaces, '?' and the like: refused here, before any request
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise UserInputError(f"repo_id {repo_id!r} is not a valid Hub repository id: {exc}") from None
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="visreg_hub_push_") as tmp:
        save_pretrained(model, tmp, repo_id=repo_id, **card_kwargs)  # local work first: no request yet

        def upload():
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            if revision is not None and revision != "main":
                api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
            return api.upload_folder(
                repo_id=repo_id,
                folder_path=tmp,
                commit_message=commit_message,
                revision=revision,
                create_pr=create_pr,
                repo_type="model",
            )

        fix = "or save_pretrained(folder) now and upload the folder later with `hf upload`"
        commit = hub_request(f"push_to_hub {repo_id}", upload, fix=fix)
    logger.info("pushed %s to %s", model.config.name or model.config.architecture, repo_id)
    return commit
