"""Pre-train a VISReg (or SIGReg / SWD / VICReg / Barlow Twins) ViT on your images.

    accelerate launch [--num_processes M] training/pretrain.py --config training/configs/<preset>.yaml \\
        [key=value ...] [--resume auto|PATH] [--overwrite] [--export-every N] [--push_to_hub org/name]
    python training/pretrain.py --config training/configs/fmnist-tiny-cpu.yaml     # one device or the CPU

Overrides use dotted keys and YAML values (``optim.lr=5e-4 loss.name=sigreg data.path=/data/train``).
The whole configuration (including the batch plan for the number of processes, the loss settings, the
model size and the data and output paths) is checked before anything is created; a configuration error
is one line on stderr with exit status 2, a failure while training one line with exit status 1 (``-v``
adds the traceback).
Outputs under ``train.output_dir``: ``config.yaml``, TensorBoard logs, ``checkpoints/`` (keep-last-k +
best, ``latest`` pointer) and ``final/`` (the backbone in the hub format, loadable with
``visreg_hub.from_pretrained``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import traceback
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Only light modules here, so configuration errors are reported in about a second.
from training.checks import (
    batch_plan,
    check_extras,
    check_output_dir,
    check_paths,
    check_previous_run,
    model_config,
)
from training.config import TrainingConfig, load_config
from visreg_hub.errors import ConfigError, one_line

logger = logging.getLogger("training.pretrain")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", help="YAML preset or config file (training/configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    parser.add_argument(
        "--resume", help="'auto' (latest checkpoint in the output folder) or a checkpoint folder"
    )
    parser.add_argument(
        "--push_to_hub", "--push-to-hub", dest="push_to_hub", help="upload the final model: org/name"
    )
    parser.add_argument("--export-every", "--export_every", dest="export_every", type=int, default=None)
    parser.add_argument("-v", "--verbose", action="store_true", help="print the traceback of an error")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a previous run in train.output_dir (default: refuse)",
    )
    # intermixed: overrides may stand on both sides of an option ("a=1 --overwrite b=2")
    return parser.parse_intermixed_args(argv)


def preflight(config: TrainingConfig, num_processes: int) -> None:
    """Every check that needs no model or data loading: batch plan, loss settings, backbone, paths."""
    batch_plan(config, num_processes)
    check_paths(config)
    stop_after, max_steps = config.train.stop_after, config.train.max_steps
    if stop_after is not None and max_steps is not None and stop_after > max_steps:
        raise ConfigError(f"train.stop_after={stop_after} is beyond train.max_steps={max_steps}")
    from training.build import build_loss  # imports torch and timm

    # every loss value, not only the key names (allocates nothing); the trainer's build warns
    check_loss_device(build_loss(config, warn_unused=False))
    check_precision_device(config.train.mixed_precision)
    model_config(config)


def check_precision_device(mixed_precision: str) -> None:
    """fp16 without CUDA is refused: accelerate would run it as fp32, with no gradient scaler, while the
    recipe recorded fp16."""
    import torch

    if mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError(
            "train.mixed_precision=fp16 needs a CUDA GPU (on a CPU it would silently run in float32); "
            "use train.mixed_precision=bf16 or no here"
        )


def check_loss_device(loss) -> None:
    """A loss option this machine cannot run is refused before training (and before --overwrite)."""
    import torch

    if getattr(loss, "sort_backend", None) == "triton" and not torch.cuda.is_available():
        raise ConfigError("sort_backend='triton' needs a CUDA GPU (and the triton package); use 'auto' here")


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, SLURM preemption): unwinds like Ctrl-C; checkpoints are written atomically."""


def _terminate(signum, frame) -> None:
    raise Terminated


def _fail(exc: BaseException, code: int, verbose: bool) -> int:
    """One line on stderr (the traceback too with ``-v``) and the exit status."""
    if verbose:
        traceback.print_exception(exc)
    print(f"error: {one_line(exc)}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # one line per saved file otherwise
    try:
        config = load_config(args.config, args.overrides)
        check_extras(config)
        preflight(config, int(os.environ.get("WORLD_SIZE", "1")))
        if args.export_every is not None and args.export_every < 0:
            raise ConfigError(f"--export-every must be >= 0, got {args.export_every}")
        replaced = check_previous_run(config, args.resume, args.overwrite)
        if rank == 0 and args.push_to_hub:
            from training.publish import check_push_target

            check_push_target(args.push_to_hub)  # before training, not after the last step
        for path in replaced if rank == 0 else []:  # --overwrite: the previous run's outputs go first
            logger.warning("--overwrite: removing %s", path)
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        output = Path(config.train.output_dir).expanduser().absolute()
        created = [folder for folder in (output, *output.parents) if not folder.exists()]  # leaf first
        check_output_dir(config)  # last: creates the folder, so only once everything else is right
    except (ConfigError, FileNotFoundError) as exc:
        return _fail(exc, 2, args.verbose)
    except Exception as exc:  # never a traceback, whatever a bad configuration raises
        return _fail(exc, 2, args.verbose)

    from training.engine import Trainer  # heavy imports only after the config is known to be good
    from training.publish import published_command

    signal.signal(signal.SIGTERM, _terminate)  # a scheduler's preemption ends like Ctrl-C, with a message
    trainer = None
    try:
        command = published_command("training/pretrain.py", sys.argv[1:] if argv is None else argv)
        trainer = Trainer(
            config, resume=args.resume, push_to_hub=args.push_to_hub, export_every=args.export_every,
            command=command,
        )  # fmt: skip
        summary = trainer.fit()
    except ConfigError as exc:  # found while opening the data (e.g. fewer images than one batch)
        if trainer is None:  # refused before anything was written: leave no folder this run created
            with contextlib.suppress(OSError):  # rmdir removes only empty folders; stop at the first other
                for folder in created:
                    folder.rmdir()
        return _fail(exc, 2, args.verbose)
    except KeyboardInterrupt as exc:
        how = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
        print(f"error: {how}; {_after_interrupt(config, trainer)}", file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130
    except Exception as exc:  # diverged, collapsed, bad checkpoint, I/O, out of memory
        return _fail(exc, 1, args.verbose)
    if trainer.accelerator.is_main_process:
        print(json.dumps(summary, indent=2))
    return 0


def _after_interrupt(config, trainer) -> str:
    """What an interrupted run can resume from: the newest complete checkpoint, and the steps after it
    that are lost (a checkpoint is written every ``train.checkpoint_every`` steps, not on Ctrl-C)."""
    from training.checkpoint import complete_checkpoints

    root = Path(config.train.output_dir) / "checkpoints"
    saved = complete_checkpoints(root) if root.is_dir() else []
    step = trainer.state.global_step if trainer is not None and hasattr(trainer, "state") else None
    at = f" at step {step}" if step is not None else ""
    if not saved:
        every = config.train.checkpoint_every
        return f"stopped{at} before its first checkpoint (train.checkpoint_every={every}): nothing to resume"
    last = saved[-1].name
    return f"stopped{at}; continue from its last checkpoint, {last}, with --resume auto (later steps redone)"


if __name__ == "__main__":
    sys.exit(main())
