"""The training engine: one accelerate run from a :class:`TrainingConfig` to checkpoints and an export.

One optimiser step consumes ``train.global_batch_size`` images: ``per_device_batch_size`` on each of M
processes for ``accumulation`` micro-steps (gradient sync only on the last). Per micro-step: views (cut in
the workers or here on the device), one forward of backbone + projector, the loss on the projections, the
online probe on detached features, a cross-rank finiteness check of every term (NaN/inf stops every rank
before any optimiser step), backward. Then clipping, AdamW, the per-step LR schedule. Every
``train.log_every`` steps the terms and health statistics (:mod:`training.monitor`) go to TensorBoard and
the progress bar; kNN accuracy on the validation split every ``eval.knn_every`` steps and at checkpoints.

State that makes a resume exact: models, optimiser, scheduler, GradScaler, every rank's RNGs, the loss
module (its slice seed and step), the health monitor counters and the :class:`TrainState` (global step,
epoch, step within the epoch), all as safetensors + JSON (:mod:`training.state_io`; never a pickle).
The data order is a function of (seed, epoch) and each micro-batch's crops of (seed, epoch, step,
micro-step, rank), so no data-loader state is needed beyond the position.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from tqdm.auto import tqdm

from training import checkpoint as ckpt
from training.build import build_loss, build_model, build_probe, build_scheduler, param_groups
from training.checks import check_resume_position, check_resume_settings, flat_dict
from training.config import TrainingConfig
from training.data import build_data, cut_views, epoch_steps, train_loader
from training.evaluate_online import OnlineEvaluator
from training.monitor import HealthMonitor, nonfinite_flag, raise_if_flagged
from training.plan import build_run_plan
from training.publish import export_encoder, model_extra, push_encoder
from training.state_io import TrainingParts, load_training_state
from visreg_hub.durable import write_atomic

logger = logging.getLogger(__name__)
_BATCH_NORMS = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)


class TrainState:
    """Position and bookkeeping of a run (checkpointed; its ``state_dict`` is plain numbers)."""

    def __init__(self) -> None:
        self.global_step = 0
        self.epoch = 0
        self.step_in_epoch = 0
        self.best_metric: float | None = None
        self.last_knn: float | None = None

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def epochs_covered(steps_by_epoch: list[int], total_steps: int) -> float:
    """Epochs a run of ``total_steps`` goes through (``train.max_steps`` may end it mid-epoch), 2 decimals."""
    done = 0.0
    remaining = total_steps
    for steps in steps_by_epoch:
        if remaining <= 0 or steps <= 0:
            break
        done += min(1.0, remaining / steps)
        remaining -= steps
    return round(done, 2)


class Trainer:
    """Build everything for ``config`` and train with :meth:`fit`.

    Args:
        config: the validated training configuration.
        resume: None, ``"auto"`` or a checkpoint folder.
        push_to_hub: ``"org/name"`` to upload the final export.
        export_every: also export the backbone every this many steps (overrides ``train.export_every``).
        command: the command recorded in exported model cards (see ``publish.published_command``).
    """

    def __init__(
        self,
        config: TrainingConfig,
        resume: str | None = None,
        push_to_hub: str | None = None,
        export_every: int | None = None,
        command: str | None = None,
    ) -> None:
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        self.config, self.push_to_hub, self.command = config, push_to_hub, command
        self.export_every = config.train.export_every if export_every is None else export_every
        train = config.train
        self.output_dir = Path(train.output_dir).expanduser().resolve()
        self.accelerator = accelerator = Accelerator(
            mixed_precision=train.mixed_precision,
            log_with=None if train.log_with == "none" else train.log_with,
            project_dir=str(self.output_dir),
            step_scheduler_with_optimizer=False,
        )
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        self.data = build_data(config)
        self.plan = build_run_plan(config, self.data, self.world)

        set_seed(train.seed)  # the same initial weights on every rank
        model = build_model(config)
        self.use_probe = train.online_probe and self.data.has_labels and self.data.num_classes > 1
        probe = build_probe(model.probe_dim, self.data.num_classes) if self.use_probe else None
        if self.world > 1 and accelerator.device.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        elif self.world > 1 and any(isinstance(m, _BATCH_NORMS) for m in model.modules()):
            logger.warning(
                "%d CPU processes: BatchNorm layers (the projector's) normalise each process's own samples "
                "(torch's SyncBatchNorm is CUDA-only), not the global batch; the loss sees the global batch, "
                "but the objective differs slightly from one process with the same global batch",
                self.world,
            )
        self.loss_fn = build_loss(config).to(accelerator.device)
        optimizer = torch.optim.AdamW(param_groups(model, probe, config), betas=tuple(config.optim.betas))
        self.scheduler = build_scheduler(
            optimizer, self.plan.warmup_steps, self.plan.total_steps, config.optim.min_lr_ratio
        )
        if probe is not None:
            self.model, self.probe, self.optimizer = accelerator.prepare(model, probe, optimizer)
        else:
            (self.model, self.optimizer), self.probe = accelerator.prepare(model, optimizer), None
        self.forward = torch.compile(self.model) if train.compile else self.model
        torch.manual_seed(train.seed + 1 + self.rank)  # per-rank stream for stochastic layers
        self.state = TrainState()
        self.monitor = HealthMonitor(config.monitor, seed=train.seed)
        self.parts = TrainingParts(
            model=accelerator.unwrap_model(self.model),
            probe=None if self.probe is None else accelerator.unwrap_model(self.probe),
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            scaler=accelerator.scaler,
            loss_fn=self.loss_fn,
            monitor=self.monitor,
            state=self.state,
        )
        self.encoder = accelerator.unwrap_model(self.model).encoder
        mean = torch.tensor(config.data.mean, device=accelerator.device).view(1, -1, 1, 1)
        std = torch.tensor(config.data.std, device=accelerator.device).view(1, -1, 1, 1)
        self.normalize = lambda x: (x - mean) / std
        self.evaluator = OnlineEvaluator(
            accelerator,
            accelerator.unwrap_model(self.model),
            None if self.probe is None else self.probe,
            self.data,
            config.eval,
            num_workers=config.data.num_workers,
        )
        self.checkpoint_root = self.output_dir / "checkpoints"
        # Resolved before anything is written, so a bad --resume path creates nothing.
        resolved = ckpt.resolve_resume(self.checkpoint_root, resume)
        self.resumed_from = folder = None if resolved is None else resolved[0]
        self.run_id = self._run_identity(folder)

        if resolved is not None:
            # before anything is written: a checkpoint refused here (another loss, other data statistics,
            # a damaged file) must leave the run's config.yaml and logs as they were, and a new output
            # folder uncreated, or the refused settings would describe the run (and its export) from now on
            self._restore(folder, resolved[1])
        self._prepare_output(resumed=resume is not None)
        self.start_step = self.state.global_step
        self._loss_sum = torch.zeros((), device=accelerator.device)
        self._loss_count = 0
        self._evaluated_at: int | None = None

    def _restore(self, folder: Path, names: set[str]) -> None:
        """Load the checkpoint ``folder`` (its verified files ``names``) into the live objects, after
        checking it was written with this run's objective and normalisation and is not past its end."""
        saved, source = ckpt.recorded_settings(folder)  # the settings the checkpoint was written with
        check_resume_settings(saved, self.config.to_dict(), source, folder)
        notes = load_training_state(folder, self.parts, self.rank, names, self.plan.steps_by_epoch)
        # (the live objects are changed by now, but nothing is written: a refusal still leaves no trace)
        check_resume_position(self.state.global_step, self.plan.total_steps, folder)
        for note in notes:
            logger.warning(note)
        logger.info("resumed from %s at step %d (epoch %d)", folder, self.state.global_step, self.state.epoch)
        # a finished run resumed again: its last checkpoint is this one, not to be saved (and evaluated,
        # logging the final metrics line a second time) again
        self._last_saved_step, self._last_saved_path = self.state.global_step, folder

    def _prepare_output(self, resumed: bool) -> None:
        """The output folder (created), its config.yaml, the trackers, and on a resume metrics.jsonl
        without the lines of the steps about to run again."""
        accelerator, config = self.accelerator, self.config
        if accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            ckpt.remove_stale_temporaries(self.checkpoint_root)
            # for people (what ran); a resume compares against the checkpoint's own copy, never this file
            text = yaml.safe_dump(config.to_dict(), sort_keys=False)
            write_atomic(self.output_dir / "config.yaml", lambda tmp: tmp.write_text(text, encoding="utf-8"))
        accelerator.wait_for_everyone()
        if accelerator.trackers == [] and config.train.log_with != "none":
            accelerator.init_trackers("tensorboard", config=flat_dict(config.to_dict()))
        if accelerator.is_main_process and resumed:
            # the steps after the checkpoint are run again: drop their old lines (or a fresh start's)
            trim_metrics(self.output_dir / "metrics.jsonl", self.state.global_step)

    def _run_identity(self, resumed_from: Path | None) -> str:
        """The run id this run's checkpoints record: the output folder's run keeps its id across resumes.

        A checkpoint from this output folder (or from a copy of its run: same id) passes its id on;
        a fresh start, or a branch resumed into a new folder from another run's checkpoint, is a new run
        (so ``--resume`` of the old run into this folder later is refused, see ``check_previous_run``).
        """
        saved = None if resumed_from is None else ckpt.run_id_of(resumed_from)
        if saved is None:
            return ckpt.new_run_id()
        inside = resumed_from.resolve().is_relative_to(self.output_dir)
        return saved if inside or ckpt.run_ids(self.checkpoint_root) == {saved} else ckpt.new_run_id()

    # ------------------------------------------------------------------------------------------ loop
    def fit(self) -> dict:
        """Train until ``total_steps`` (or ``train.stop_after``); return a summary dict."""
        train, state = self.config.train, self.state
        bar = tqdm(
            total=self.plan.total_steps,
            initial=state.global_step,
            disable=not (self.accelerator.is_main_process and train.progress_bar),
            dynamic_ncols=True,
            desc="train",
        )
        logger.info(
            "training %d steps: %d process(es) x %d images x %d accumulation = global batch %d, %s epochs",
            self.plan.total_steps, self.world, train.per_device_batch_size, self.plan.accumulation,
            train.global_batch_size, f"{epochs_covered(self.plan.steps_by_epoch, self.plan.total_steps):g}",
        )  # fmt: skip
        if self.plan.accumulation > 1:
            # why: the loss runs once per micro-batch, so its batch statistics (VISReg's centre, scale and
            # sorted shape term; VICReg's and Barlow's covariances) see fewer samples than the global batch
            logger.warning(
                "the loss's batch statistics cover %d samples per micro-step (%d process(es) x %d), not the "
                "global batch of %d: a run with accumulation optimises a different objective than one that "
                "fits the global batch in one micro-step (more processes or a larger "
                "train.per_device_batch_size close the gap)",
                self.world * train.per_device_batch_size, self.world, train.per_device_batch_size,
                train.global_batch_size,
            )  # fmt: skip
        stopped_early = train.stop_after is not None and state.global_step >= train.stop_after
        if stopped_early:
            logger.info("already at step %d >= train.stop_after; nothing to do", state.global_step)
        try:
            while state.global_step < self.plan.total_steps and not stopped_early:
                stopped_early = self._run_epoch(bar)
        finally:
            bar.close()
        summary = {
            "steps": state.global_step,
            "stopped_early": stopped_early,
            "output_dir": str(self.output_dir),
        }
        if not stopped_early:
            summary.update(self._finish())
        self.accelerator.end_training()
        return summary

    def _epoch_length(self, epoch: int) -> int:
        if epoch < len(self.plan.steps_by_epoch):
            return self.plan.steps_by_epoch[epoch]
        return epoch_steps(self.data, self.config, self.world, self.plan.accumulation, epoch)

    def _run_epoch(self, bar) -> bool:
        """Train from the current position to the end of its epoch; True when ``stop_after`` was reached."""
        state, train = self.state, self.config.train
        length = self._epoch_length(state.epoch)
        loader = train_loader(
            self.data,
            self.config,
            self.rank,
            self.world,
            self.plan.accumulation,
            state.epoch,
            state.step_in_epoch,
        )
        batches = iter(loader)
        started, steps_since_log = time.perf_counter(), 0
        while state.global_step < self.plan.total_steps:
            metrics = self._train_step([next(batches) for _ in range(self.plan.accumulation)])
            state.global_step += 1
            state.step_in_epoch += 1
            epoch_done = state.step_in_epoch >= length
            if epoch_done:
                state.epoch, state.step_in_epoch = state.epoch + 1, 0
            bar.update(1)
            step, steps_since_log = state.global_step, steps_since_log + 1
            if step % train.log_every == 0 or step == self.plan.total_steps:
                elapsed, started = time.perf_counter() - started, time.perf_counter()
                # Includes evaluation and checkpoint time since the last log: the rate a run really gets.
                rate = train.global_batch_size * steps_since_log / elapsed
                metrics["throughput/images_per_s"], steps_since_log = rate, 0
                self._log(metrics, bar)
            knn_due = self.config.eval.knn_every and step % self.config.eval.knn_every == 0
            if knn_due and self.evaluator.enabled:
                self._evaluate(bar)
            if self.export_every and step % self.export_every == 0 and step < self.plan.total_steps:
                self._export(self.output_dir / "exports" / ckpt.step_dir_name(step))
            stop = train.stop_after is not None and step >= train.stop_after and step < self.plan.total_steps
            if (train.checkpoint_every and step % train.checkpoint_every == 0) or stop:
                self.save()
            if stop:
                logger.info("stopped after %d steps (train.stop_after); continue with --resume auto", step)
                return True
            if epoch_done:
                break
        return False

    def _views(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        device = self.accelerator.device
        if "images" in batch:  # augment_on: device
            return cut_views(
                batch["images"].to(device, non_blocking=True), batch["seed"], self.config.augment
            )
        local = batch["local_views"]
        return batch["global_views"].to(device, non_blocking=True), (
            None if local is None else local.to(device, non_blocking=True)
        )

    def _train_step(self, micro_batches: list[dict]) -> dict:
        """One optimiser step over ``accumulation`` micro-batches; returns the last micro-batch's metrics."""
        accelerator, step = self.accelerator, self.state.global_step
        modules = [m for m in (self.model, self.probe) if m is not None]
        metrics: dict = {}
        # Non-finite counts stay on the device: one all-reduce and one sync per optimiser step, not per micro.
        nonfinite: dict[str, torch.Tensor] = {}
        for micro, batch in enumerate(micro_batches):
            global_views, local_views = self._views(batch)
            num_global, batch_size = global_views.shape[:2]
            sync = micro == len(micro_batches) - 1
            with contextlib.ExitStack() as stack:
                if not sync:
                    for module in modules:
                        stack.enter_context(accelerator.no_sync(module))
                probe_features, projections = self.forward(
                    self.normalize(global_views.flatten(0, 1)),
                    None if local_views is None else self.normalize(local_views.flatten(0, 1)),
                )
                projections = projections.float().view(-1, batch_size, projections.shape[-1])
                debug = self.config.debug
                if debug.nan_at_step == step and debug.nan_rank in (None, self.rank):
                    projections = projections * float("nan")  # test hook: a diverging projector
                if hasattr(self.loss_fn, "set_step"):  # sliced losses: directions of (seed, micro-step)
                    self.loss_fn.set_step(step * self.plan.accumulation + micro)
                with accelerator.autocast():
                    out = self.loss_fn(
                        projections[:num_global],
                        projections[num_global:] if local_views is not None else None,
                    )
                terms = {f"loss/{name}": value for name, value in out._asdict().items()}
                total = out.total
                if self.probe is not None:
                    labels = batch["labels"].to(accelerator.device).repeat(projections.shape[0])
                    logits = self.probe(probe_features.detach().float())
                    terms["probe/loss"] = F.cross_entropy(logits, labels)
                    total = total + terms["probe/loss"]
                    # percent, like probe/val_acc and knn/accuracy
                    metrics["probe/train_acc"] = 100.0 * (logits.argmax(1) == labels).float().mean().detach()
                for name, value in terms.items():
                    nonfinite[name] = nonfinite.get(name, 0) + nonfinite_flag(value)
                accelerator.backward(total / len(micro_batches))  # NaN gradients are never applied
            metrics.update({name: value.detach() for name, value in terms.items()})
        grad_norm = None
        if self.config.optim.clip_grad_norm:
            grad_norm = accelerator.clip_grad_norm_(self.model.parameters(), self.config.optim.clip_grad_norm)
            if accelerator.scaler is None:  # with fp16's GradScaler, inf steps are skipped by the scaler
                nonfinite["gradient norm"] = nonfinite_flag(grad_norm)
        # step + 1: steps are counted from 1 wherever a user reads them (checkpoints, metrics.jsonl)
        raise_if_flagged(nonfinite, step + 1, reduce=accelerator.reduce if self.world > 1 else None)
        metrics["optim/lr"] = self.scheduler.get_last_lr()[0]  # the rate this step uses, read before stepping
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._loss_sum += metrics["loss/total"]
        self._loss_count += 1
        if (step + 1) % self.config.train.log_every == 0 or step + 1 == self.plan.total_steps:
            metrics.update(self._health(probe_features, projections, num_global, batch_size))
        if grad_norm is not None:
            metrics["optim/grad_norm"] = grad_norm.detach()
        return metrics

    def _health(self, probe_features, projections, num_global: int, batch_size: int) -> dict:
        """Health statistics of the first global view, gathered over ranks; runs the collapse alarm."""
        embed_dim = self.encoder.embed_dim
        embeddings = probe_features[:batch_size, -embed_dim:].detach().float()
        proj = projections[0].detach().float()
        embeddings, proj = self.accelerator.gather(embeddings), self.accelerator.gather(proj)
        stats = self.monitor.statistics(embeddings, proj)
        alarm = self.monitor.check_collapse(stats, self.state.global_step + 1)
        out = {f"health/{name}": value for name, value in stats.items()}
        out["health/collapse_alarm"] = float(alarm)
        out["health/collapse_alarms"] = self.monitor.collapse_alarms
        return out

    def _evaluate(self, bar=None) -> None:
        results = self.evaluator.run()
        self.state.last_knn = results["knn/accuracy"]
        logger.info("step %d: %s", self.state.global_step, results)
        self._log(results, bar)
        self._evaluated_at = self.state.global_step

    def _log(self, metrics: dict, bar=None) -> None:
        values = {}
        for name, value in metrics.items():
            if isinstance(value, torch.Tensor):
                value = self.accelerator.reduce(value.detach().float(), "mean") if self.world > 1 else value
                value = float(value)
            values[name] = value
        self.accelerator.log(values, step=self.state.global_step)
        if self.accelerator.is_main_process:  # a grep-able copy of what TensorBoard gets
            with open(self.output_dir / "metrics.jsonl", "a", encoding="utf-8") as handle:
                handle.write(json.dumps({"step": self.state.global_step, **values}) + "\n")
        if bar is not None and self.accelerator.is_main_process:
            shown = {"loss": "loss/total", "std": "health/proj_std_mean", "rank": "health/embed_rank"}
            shown.update({"knn": "knn/accuracy", "lr": "optim/lr"})
            bar.set_postfix({k: f"{values[v]:.3g}" for k, v in shown.items() if v in values}, refresh=False)
        logger.debug("step %d: %s", self.state.global_step, values)
        self.last_metrics = {**getattr(self, "last_metrics", {}), **values}

    # ------------------------------------------------------------------------------------------ saving
    def save(self) -> Path:
        """Checkpoint now (all ranks); evaluates kNN first so ``best`` can be chosen by it."""
        state = self.state
        if self.evaluator.enabled:
            if self._evaluated_at != state.global_step:
                self._evaluate()
            metric = state.last_knn
        else:
            mean_loss = float(self.accelerator.reduce(self._loss_sum, "mean")) / max(self._loss_count, 1)
            metric = -mean_loss
        self._loss_sum.zero_()
        self._loss_count = 0
        is_best = state.best_metric is None or metric > state.best_metric
        if is_best:
            state.best_metric = metric
        record = {**state.state_dict(), "metric": metric, "total_steps": self.plan.total_steps}
        record["metric_name"] = "knn_accuracy" if self.evaluator.enabled else "negative_mean_loss"
        record[ckpt.RUN_ID_KEY] = self.run_id
        record["config"] = self.config.to_dict()  # what a resume of this checkpoint is compared with
        self._last_saved_step, self._last_saved_path = state.global_step, None
        return ckpt.save_checkpoint(
            self.accelerator,
            self.checkpoint_root,
            state.global_step,
            record,
            self.config.train.keep_last,
            is_best,
            self.parts,
        )

    def _export(self, folder: Path) -> Path:
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            export_encoder(self.encoder, folder, self._model_extra())
        self.accelerator.wait_for_everyone()
        return folder

    def _model_extra(self) -> dict:
        return model_extra(
            self.config,
            self.plan,
            base=self.encoder.config.extra,
            data=self.data.describe(),
            global_step=self.state.global_step,
            last_knn=self.state.last_knn,
            command=self.command,
        )

    def _finish(self) -> dict:
        """Final checkpoint, evaluation, export (and push)."""
        if getattr(self, "_last_saved_step", None) == self.state.global_step:
            path = getattr(self, "_last_saved_path", None)
            path = path or ckpt.read_pointer(self.checkpoint_root, "latest")
        else:
            path = self.save()
        final = self._export(self.output_dir / "final")
        summary = {"checkpoint": str(path), "export": str(final), "knn_accuracy": self.state.last_knn}
        if self.push_to_hub and self.accelerator.is_main_process:
            summary["push"] = str(push_encoder(self.encoder, self.push_to_hub, self._model_extra()))
        self.accelerator.wait_for_everyone()
        return summary


def trim_metrics(path: Path, step: int) -> None:
    """Keep the lines of ``metrics.jsonl`` logged at or before ``step`` (atomically).

    A resumed run logs the steps after its checkpoint again; without this, the file would hold them
    twice, out of order. A line that is not a JSON object with an integer step (a torn last write) goes.
    """
    if not path.is_file():
        return
    kept = []
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
    write_atomic(path, lambda target: target.write_text("".join(kept), encoding="utf-8"))
