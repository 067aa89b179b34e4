"""Checks of a :class:`~training.config.TrainingConfig` that run before any work starts.

:func:`validate` checks ranges and consistency (called by every config constructor); :func:`batch_plan`
needs the number of processes; :func:`check_paths` touches the file system; :func:`model_config`
resolves the backbone's :class:`~visreg_hub.models.ModelConfig` (which validates it) without building it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from visreg_hub.errors import CheckpointError, ConfigError, shown

if TYPE_CHECKING:  # annotations only: training.config imports this module, never the other way round
    from training.config import TrainingConfig

#: Where the Debian package ``dataset-fashion-mnist`` installs Fashion-MNIST (default ``data.path``).
FMNIST_DIR = "/usr/share/datasets/fashion-mnist"

logger = logging.getLogger(__name__)


def _positive(key: str, value: float | int | None, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{key} must be {bound}, got {value!r}")


def _probability(key: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{key} must be a probability in [0, 1], got {value!r}")


def _scale(key: str, value: tuple[float, float]) -> None:
    if not 0.0 < value[0] <= value[1] <= 1.0:
        raise ConfigError(f"{key}={list(value)} must satisfy 0 < min <= max <= 1 (fractions of image area)")


def validate(config: TrainingConfig) -> None:
    """Range and consistency checks that do not touch the file system (see :func:`check_paths`)."""
    model, data, aug, loss, optim, train = (
        config.model,
        config.data,
        config.augment,
        config.loss,
        config.optim,
        config.train,
    )
    for key in ("img_size", "patch_size", "embed_dim", "depth", "num_heads"):
        _positive(f"model.{key}", getattr(model, key))
    _positive("model.num_reg_tokens", model.num_reg_tokens, allow_zero=True)
    for key, bound in (("hidden_dim", 65536), ("out_dim", 65536), ("num_hidden_layers", 16)):
        _positive(f"projector.{key}", getattr(config.projector, key))
        if getattr(config.projector, key) > bound:  # before anything allocates a (hidden x hidden) matrix
            raise ConfigError(
                f"projector.{key}={getattr(config.projector, key)} is over the limit of {bound}"
            )
    if len(data.mean) != data.channels or len(data.std) != data.channels:
        raise ConfigError(
            f"data.mean {list(data.mean)} and data.std {list(data.std)} need one value per channel "
            f"(data.channels={data.channels})"
        )
    if data.path is None and data.source != "fmnist":
        raise ConfigError(f"data.path is required for data.source={data.source!r}; set data.path=/my/images")
    if data.val_source is not None and data.val_path is None and data.val_source != "fmnist":
        raise ConfigError(f"data.val_path is required for data.val_source={data.val_source!r}")
    _positive("data.base_size", data.base_size)
    _positive("data.val_size", data.val_size, allow_zero=True)
    _positive("data.num_workers", data.num_workers, allow_zero=True)
    _positive("data.shuffle_buffer", data.shuffle_buffer)
    lt = data.long_tail
    if lt.imbalance_ratio < 1:
        raise ConfigError(f"data.long_tail.imbalance_ratio must be >= 1, got {lt.imbalance_ratio}")
    _positive("data.long_tail.alpha", lt.alpha)
    _positive("data.long_tail.max_per_class", lt.max_per_class)
    _positive("data.long_tail.min_per_class", lt.min_per_class)
    for count_key, size_key in (("global_count", "global_size"), ("local_count", "local_size")):
        _positive(f"augment.{count_key}", getattr(aug, count_key), allow_zero=count_key == "local_count")
        _positive(f"augment.{size_key}", getattr(aug, size_key))
    if aug.global_count + aug.local_count < 2:  # else the invariance term is 0 and nothing is learnt from it
        raise ConfigError(
            f"augment.global_count={aug.global_count} + augment.local_count={aug.local_count} is one view; "
            "every objective compares at least two views of an image: raise either count"
        )
    for size_key in ("global_size", "local_size"):
        if getattr(aug, size_key) > data.base_size:
            raise ConfigError(
                f"augment.{size_key}={getattr(aug, size_key)} exceeds data.base_size={data.base_size}; "
                "views are cut from base_size images, so raise data.base_size or shrink the views"
            )
    _scale("augment.global_scale", aug.global_scale)
    _scale("augment.local_scale", aug.local_scale)
    for key in ("flip_prob", "jitter_prob", "grayscale_prob", "blur_prob", "solarize_prob"):
        _probability(f"augment.{key}", getattr(aug, key))
    for key in ("brightness", "contrast", "saturation"):
        if not 0.0 <= getattr(aug, key) < 1.0:
            raise ConfigError(f"augment.{key} must be in [0, 1), got {getattr(aug, key)!r}")
    if not 0.0 <= loss.reg_weight <= 1.0:
        raise ConfigError(f"loss.reg_weight (lambda) must be in [0, 1], got {loss.reg_weight!r}")
    _positive("loss.num_slices", loss.num_slices)
    _positive("optim.lr", optim.lr)
    if not all(0.0 <= beta < 1.0 for beta in optim.betas):  # else AdamW refuses it after the run started
        raise ConfigError(
            f"optim.betas must both be in [0, 1), got {list(optim.betas)} (default: [0.9, 0.999])"
        )
    _positive("optim.weight_decay", optim.weight_decay, allow_zero=True)
    _positive("optim.probe_lr", optim.probe_lr)  # a negative one makes the online probe ascend its loss
    _positive("optim.probe_weight_decay", optim.probe_weight_decay, allow_zero=True)
    _positive("optim.warmup_epochs", optim.warmup_epochs, allow_zero=True)
    _positive("optim.warmup_steps", optim.warmup_steps, allow_zero=True)
    if not 0.0 < optim.min_lr_ratio <= 1.0:
        raise ConfigError(f"optim.min_lr_ratio must be in (0, 1], got {optim.min_lr_ratio!r} (paper: 0.001)")
    _positive("optim.clip_grad_norm", optim.clip_grad_norm, allow_zero=True)
    positive_keys = ("epochs", "max_steps", "stop_after", "global_batch_size", "per_device_batch_size")
    positive_keys += ("log_every",)
    for key in positive_keys:
        _positive(f"train.{key}", getattr(train, key))
    for key in ("checkpoint_every", "export_every"):
        _positive(f"train.{key}", getattr(train, key), allow_zero=True)
    _positive("train.keep_last", train.keep_last)
    if not 0 <= train.seed < 2**32:  # what numpy's and accelerate's seeding take
        raise ConfigError(f"train.seed must be an integer in [0, 2**32), got {train.seed!r}")
    if train.per_device_batch_size < 2:
        raise ConfigError(
            f"train.per_device_batch_size must be >= 2, got {train.per_device_batch_size}: every loss takes "
            "batch statistics (means, spreads, sorted projections) over each device's micro-batch"
        )
    if train.global_batch_size % train.per_device_batch_size:
        raise ConfigError(
            f"train.global_batch_size={train.global_batch_size} is not a multiple of "
            f"train.per_device_batch_size={train.per_device_batch_size}"
        )
    _positive("eval.knn_every", config.eval.knn_every, allow_zero=True)
    _positive("eval.knn_k", config.eval.knn_k)
    _positive("eval.knn_temperature", config.eval.knn_temperature)
    _positive("eval.knn_bank_size", config.eval.knn_bank_size, allow_zero=True)
    _positive("eval.batch_size", config.eval.batch_size)
    _positive("monitor.min_std", config.monitor.min_std, allow_zero=True)
    _positive("monitor.min_rank", config.monitor.min_rank, allow_zero=True)
    _positive("monitor.collapse_patience", config.monitor.collapse_patience)
    _positive("monitor.gaussianity_slices", config.monitor.gaussianity_slices)


def batch_plan(config: TrainingConfig, num_processes: int) -> int:
    """Gradient-accumulation steps so that per-device batch x processes x accumulation = global batch.

    Raises:
        ConfigError: the global batch is not divisible by per-device batch x number of processes.
    """
    per_step = config.train.per_device_batch_size * num_processes
    if config.train.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size={config.train.global_batch_size} is not divisible by "
            f"train.per_device_batch_size={config.train.per_device_batch_size} x {num_processes} processes "
            f"= {per_step}; change train.per_device_batch_size (or the number of processes) so it divides"
        )
    return config.train.global_batch_size // per_step


def model_config(config: TrainingConfig):
    """The :class:`visreg_hub.models.ModelConfig` of the backbone (validated; nothing is built).

    ``img_size`` defaults to the global view size, channels and normalisation come from ``data``. The
    same limits as loading a checkpoint apply (known ViT architecture, field bounds, the default
    parameter / activation budget of :mod:`visreg_hub.models.limits`).
    """
    from visreg_hub.models import ModelConfig
    from visreg_hub.models.limits import check_architecture, check_budget

    model = config.model
    overrides = {
        key: getattr(model, key)
        for key in ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio")
        if getattr(model, key) is not None
    }
    backbone = ModelConfig.from_name(
        model.size,
        img_size=model.img_size or config.augment.global_size,
        in_chans=config.data.channels,
        mean=config.data.mean,
        std=config.data.std,
        num_reg_tokens=model.num_reg_tokens,
        drop_path_rate=model.drop_path_rate,
        pooling=model.pooling,
        **overrides,
    )
    augment = config.augment
    views = [("augment.global_size", augment.global_size)]
    views += [("augment.local_size", augment.local_size)] if augment.local_count else []
    for key, size in views:  # found here, not after the first forward pass of a long start-up
        if size % backbone.patch_size:
            raise ConfigError(
                f"{key}={size} is not a multiple of the patch size {backbone.patch_size}; "
                f"use a multiple of {backbone.patch_size} or another model.patch_size"
            )
    check_architecture(backbone.architecture)
    check_budget(
        backbone, source="the model section", fix="shrink model.depth, model.embed_dim or model.img_size"
    )
    return backbone


def check_paths(config: TrainingConfig) -> None:
    """Fail early, before any folder is created, when a data path does not exist."""
    for source, path, key in (
        (config.data.source, config.data.path, "data.path"),
        (config.data.val_source, config.data.val_path, "data.val_path"),
    ):
        if source is None:
            continue
        resolved = Path(path if path is not None else FMNIST_DIR).expanduser()
        if source == "webdataset" and any(ch in str(path) for ch in "*?["):
            if not sorted(resolved.parent.glob(resolved.name)):
                raise ConfigError(f"{key}={path!r} matches no shard files")
            continue
        if resolved.exists() and source in ("npz", "filelist") and not resolved.is_file():
            raise ConfigError(f"{key}={str(resolved)!r} is a folder; data source {source!r} needs a file")
        if resolved.exists() and source == "folder" and not resolved.is_dir():
            raise ConfigError(f"{key}={str(resolved)!r} is a file; data source 'folder' needs a folder")
        if not resolved.exists():
            hint = (
                " (install it with `apt-get install dataset-fashion-mnist`, or use data.source=npz with "
                "tests/fixtures/fmnist_train_500.npz)"
                if source == "fmnist"
                else ""
            )
            raise ConfigError(f"{key}={str(resolved)!r} does not exist for data source {source!r}{hint}")


def check_output_dir(config: TrainingConfig) -> None:
    """Make sure ``train.output_dir`` is (or can become) a writable folder, creating it now.

    Raises:
        ConfigError: it is a file, lies under a file, or cannot be created or written (e.g. under /proc).
    """
    folder = Path(config.train.output_dir).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(
            f"train.output_dir={str(folder)!r} is not a writable folder ({exc.strerror or exc}); "
            "choose another train.output_dir"
        ) from None


# Settings a resume may change without a word: the run's length, and where it lives (a moved or copied
# run folder resumes as it is).
_RESUMABLE_CHANGES = frozenset(
    {"train.stop_after", "train.max_steps", "train.epochs", "train.progress_bar", "train.output_dir"}
)
# Settings a resume may not change: the exported model and its card would name them for the whole run.
_FIXED_ON_RESUME = ("loss.name", "data.channels", "data.mean", "data.std")


def check_resume_settings(saved: Any, current: dict, source: Path | None, checkpoint: Path) -> None:
    """Compare the settings that wrote ``checkpoint`` (``saved``, read from ``source``: see
    :func:`training.checkpoint.recorded_settings`) with this run's: refuse a change of objective or input
    normalisation, log every other change.

    why: the export's config.json and card describe the whole run by its last settings; a VISReg run
    resumed as SIGReg would be published as a SIGReg model whose steps were mostly VISReg.

    Raises:
        CheckpointError: a :data:`_FIXED_ON_RESUME` setting differs, naming both values.
    """
    if saved is None:
        logger.warning("%s records no settings (nor does its run's config.yaml); the resume cannot check "
                       "what changed", checkpoint)  # fmt: skip
        return
    if not (
        isinstance(saved, dict)
        and isinstance(saved.get("loss"), dict)
        and isinstance(saved.get("data"), dict)
    ):
        logger.warning(
            "%s: the recorded settings are malformed; the resume cannot check what changed", source
        )
        return
    try:
        old, new = _leaves(saved), _leaves(current)
    except RecursionError:  # nested deeper than any real setting
        logger.warning(
            "%s: the recorded settings are malformed; the resume cannot check what changed", source
        )
        return
    fixed = [key for key in _FIXED_ON_RESUME if old.get(key) != new.get(key)]
    if fixed and source is not None and source.name == "config.yaml":
        # the run folder's config.yaml holds the last settings any run (a resume too) wrote there, not
        # necessarily this checkpoint's: a hint, not grounds to refuse
        details = ", ".join(f"{key}={shown(old.get(key))} (now {shown(new.get(key))})" for key in fixed)
        logger.warning("%s (the run's last settings; %s records none of its own) says %s; a resume should "
                       "continue with the settings the checkpoint was written with", source, checkpoint.name,
                       details)  # fmt: skip
    elif fixed:
        details = ", ".join(f"{key}={shown(old.get(key))} (now {shown(new.get(key))})" for key in fixed)
        raise CheckpointError(
            f"{checkpoint} was written with {details}; a resume continues the same run, so pass the values "
            "it was written with (to train with other settings, start a new run without --resume)"
        )
    differ = {key for key in old.keys() | new.keys() if old.get(key) != new.get(key)}
    changed = sorted(differ - _RESUMABLE_CHANGES)
    if changed:
        details = ", ".join(
            f"{key[:80]}: {shown(old.get(key))} -> {shown(new.get(key))}" for key in changed[:20]
        )
        more = f" and {len(changed) - 20} more" if len(changed) > 20 else ""
        logger.warning(
            "resuming with changed settings (the run is no longer one recipe): %s%s", details, more
        )


def check_resume_position(step: int, total_steps: int, checkpoint: Path) -> None:
    """Refuse a checkpoint already past this run's last step (a resume with a smaller ``train.max_steps``
    was accepted, and its export recorded 40 steps of a 30-step run).

    Raises:
        CheckpointError: the restored position ``step`` exceeds ``total_steps``.
    """
    if step > total_steps:
        raise CheckpointError(
            f"{checkpoint} is at step {step}, past this run's {total_steps} steps; raise train.max_steps (or "
            f"train.epochs) to at least {step}, or resume an earlier checkpoint"
        )


def _leaves(tree: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": [1]}}`` -> ``{"a.b": [1]}``: the settings by dotted key, values as they are."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_leaves(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def flat_dict(tree: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; values that are not scalars or strings become strings
    (TensorBoard's hparams accept nothing else)."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flat_dict(value, f"{name}."))
        elif isinstance(value, bool | int | float | str):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat


# What a previous run leaves in train.output_dir (removed by --overwrite; config.yaml is rewritten anyway).
RUN_OUTPUTS = ("checkpoints", "final", "exports", "tensorboard", "metrics.jsonl")


def check_previous_run(config: TrainingConfig, resume: str | None, overwrite: bool) -> list[Path]:
    """Refuse to start a fresh run over a previous one unless asked; return what ``overwrite`` replaces.

    ``--resume auto`` over a folder with no checkpoint to resume starts a fresh run, so a run that got as
    far as ``final/`` or ``exports/`` (say, a finished run whose checkpoints were pruned) is not replaced
    without ``--overwrite`` either; a run stopped before its first checkpoint just starts again.

    Raises:
        ConfigError: ``train.output_dir`` holds a previous run's outputs, nothing is resumed, and
            ``--overwrite`` was not given.
    """
    from training.checkpoint import complete_checkpoints, linked_checkpoints

    output_dir = Path(config.train.output_dir).expanduser()
    if resume not in (None, "auto"):
        return check_resume_target(output_dir, resume, overwrite)
    checkpoints = output_dir / "checkpoints"
    # a step-* symlink is no checkpoint, but not "nothing" either: the Trainer refuses it as it does a
    # corrupt one, rather than a fresh start replacing the run
    nothing_to_resume = (
        resume == "auto" and not complete_checkpoints(checkpoints) and not linked_checkpoints(checkpoints)
    )
    if resume is not None and not nothing_to_resume:
        return []
    previous = _previous_outputs(output_dir)
    if nothing_to_resume and not any(path.name in ("final", "exports") for path in previous):
        return []
    if previous and not overwrite:
        found = ", ".join(path.name for path in previous)
        if nothing_to_resume:
            raise ConfigError(
                f"--resume auto: train.output_dir={str(output_dir)!r} has no checkpoint to resume but holds "
                f"a run ({found}), which a fresh start would replace; pass --overwrite to replace it, or "
                "choose another train.output_dir"
            )
        raise ConfigError(
            f"train.output_dir={str(output_dir)!r} already holds a run ({found}); "
            "continue it with --resume auto, replace it with --overwrite, or choose another train.output_dir"
        )
    return previous


def _previous_outputs(output_dir: Path) -> list[Path]:
    return [output_dir / name for name in RUN_OUTPUTS if (output_dir / name).exists()]


def check_resume_target(output_dir: Path, resume: str, overwrite: bool) -> list[Path]:
    """``--resume PATH``: refuse to continue a checkpoint of one run in a folder holding a different run.

    Resuming writes new checkpoints, ``latest``, ``best``, ``final/`` and metrics next to the folder's old
    ones, which would leave a mix of two runs. Allowed: a checkpoint inside ``output_dir`` itself, an
    output folder with no run in it, and a folder whose checkpoints all record the checkpoint's run id
    (a copy of the same run). Returns what ``overwrite`` replaces.

    Raises:
        ConfigError: ``output_dir`` holds a different run and ``--overwrite`` was not given.
    """
    from training.checkpoint import is_complete, resume_candidates, run_id_of, run_ids

    source = Path(resume).expanduser().resolve()
    if source.is_relative_to(output_dir.resolve()):
        return []
    candidates = resume_candidates(resume)
    previous = _previous_outputs(output_dir)
    if not previous or not any(is_complete(folder) for folder in candidates):
        return []  # an empty folder, or a bad PATH (the Trainer names what is wrong with it)
    theirs = {run_id_of(folder) for folder in candidates}
    ours = run_ids(output_dir / "checkpoints")
    if len(theirs) == 1 and theirs == ours and None not in ours:
        return []  # the same run
    if overwrite:
        return previous
    found = ", ".join(path.name for path in previous)
    raise ConfigError(
        f"--resume {resume!r} continues a checkpoint of the run in {str(source)!r}, but "
        f"train.output_dir={str(output_dir)!r} already holds a different run ({found}), whose checkpoints, "
        "best, final/ and metrics would be mixed with the resumed run's; pass a fresh train.output_dir, "
        "or --overwrite to replace the run in that folder"
    )


def check_extras(config: TrainingConfig) -> None:
    """The training extra's packages, before anything heavy is imported (``make demo`` lacks them).

    Raises:
        MissingExtraError: naming ``pip install 'visreg_hub[train]'``.
    """
    from visreg_hub.errors import require_extra

    require_extra("accelerate", "train")
    if config.train.log_with == "tensorboard":
        require_extra("tensorboard", "train")
