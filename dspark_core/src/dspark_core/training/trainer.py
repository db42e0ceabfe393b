"""The DSpark training loop: a target and a chat dataset in, a servable draft out.

:class:`Trainer` assembles a run from components (:mod:`setup` builds the target, data and draft;
:mod:`optim` the optimizer; :class:`~checkpoint.Checkpointer` saves and restores; :mod:`evaluate`
decodes held-out prompts; :mod:`health` stops a diverging run) and :meth:`Trainer.train` loops over
:meth:`Trainer.train_step`:

- every micro-batch, the frozen target's features are captured online and the draft's forward
  outputs go through :class:`~dspark_core.modeling.loss.DSparkObjective`, normalised across ranks so
  that N ranks equal one rank on N times the batch;
- AdamW with linear warmup and cosine decay, clipping and gradient accumulation (each micro-batch is
  normalised by its own supervised-token count and the step averages them); bf16 autocast and flex
  attention on CUDA, fp32 and SDPA on CPU;
- every rank has its own anchor generator and RNG streams, seeded from ``(seed, rank)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dspark_core.datagen.demo import DEMO_DATA_NAME
from dspark_core.modeling.loss import DSparkObjective
from dspark_core.options import resolve_attention, resolve_dtype
from dspark_core.training.checkpoint import Checkpointer, CheckpointInfo
from dspark_core.training.config import ConfigError, TrainConfig
from dspark_core.training.data import DataPosition, DatasetError, iter_batches
from dspark_core.training.distributed import DistributedContext, full_state_dicts, load_full_state_dicts
from dspark_core.training.evaluate import Evaluator, load_eval_prompts
from dspark_core.training.health import LossGuard, LossSpikeError, NonFiniteLossError
from dspark_core.training.metrics import MetricsLog, WindowMetrics
from dspark_core.training.optim import WarmupCosine, apply_learning_rate, build_optimizer, clip_gradients
from dspark_core.training.rng import RngStreams
from dspark_core.training.run_dir import RunDirectory, RunDirectoryError
from dspark_core.training.setup import build_draft, load_target, load_training_data
from dspark_core.training.tracking import Trackers, check_backends, open_trackers

__all__ = [
    "LossSpikeError",
    "NonFiniteLossError",
    "RunDirectoryError",
    "TrainResult",
    "Trainer",
    "WarmupCosine",
    "batch_target_features",
    "train",
]


@dataclass
class TrainResult:
    """What :meth:`Trainer.train` ends with."""

    run_dir: Path
    step: int
    checkpoint: Path | None
    export_dir: Path | None
    last_metrics: dict[str, Any] = field(default_factory=dict)


def normalise_paths(config: TrainConfig) -> TrainConfig:
    """``config`` with its paths absolute, as the run records them in ``run.json``."""

    # Resuming from another working directory must compare equal paths equal.
    def absolute(path: str) -> str:
        return str(Path(path).expanduser().resolve())

    data = [d if d == DEMO_DATA_NAME else absolute(d) for d in config.data]
    eval_data = config.eval_data
    if eval_data is not None and eval_data != DEMO_DATA_NAME:
        eval_data = absolute(eval_data)
    target = absolute(config.target) if Path(config.target).expanduser().exists() else config.target
    return dataclasses.replace(
        config, data=data, eval_data=eval_data, target=target, output_dir=absolute(config.output_dir)
    )


class Trainer:
    """One training run. Construction prepares everything (and resumes when asked); :meth:`train`
    runs the loop. Under ``torchrun`` every rank constructs its own ``Trainer``."""

    def __init__(self, config: TrainConfig, *, context: DistributedContext | None = None) -> None:
        config.validate()
        self.config = config = normalise_paths(config)
        self.ctx = ctx = context or DistributedContext.from_environment(config.device)
        self.run_dir = Path(config.output_dir)
        self.checkpointer = Checkpointer(self.run_dir, config.keep_last, ctx)
        self.metrics_log = MetricsLog(self.run_dir / "metrics.jsonl", active=ctx.is_main)
        # Every rank checks, so a missing tracker stops all of them before anything is loaded.
        check_backends(config.report_to)
        dtype = resolve_dtype(config.precision, ctx.device)
        self.autocast_dtype = torch.bfloat16 if dtype == torch.bfloat16 else None
        self.attention = resolve_attention(config.attn_implementation, ctx.device)
        self._bar: Any = None

        self.run_directory = run_directory = RunDirectory(config, self.checkpointer.manager, ctx)
        try:
            self._prepare(run_directory)
        except BaseException:
            run_directory.release()
            raise

    def _prepare(self, run_directory: RunDirectory) -> None:
        config, ctx = self.config, self.ctx
        resuming = run_directory.prepare(self.log)
        self.parts = load_target(config, ctx, resolve_dtype(config.precision, ctx.device), self.log)
        self.data = load_training_data(config, self.parts, ctx, self.run_dir, self.attention, self.log)
        self.drafting = build_draft(config, self.parts, self.data, ctx, self.attention, self.log)
        self.optimizer, self.scheduler = build_optimizer(
            self.model, config, fused=ctx.device.type == "cuda" and not self.drafting.fsdp
        )
        self.evaluator = Evaluator(
            config, load_eval_prompts(config, self.parts.tokenizer), ctx, fsdp=self.drafting.fsdp
        )
        # A reduced-vocabulary draft's teacher is the target's own lm_head (the draft's covers K tokens).
        reduced = getattr(self.draft, "has_reduced_vocabulary", False)
        teacher_head = self.target.get_output_embeddings().weight if reduced else None
        self.objective = DSparkObjective(config.loss, teacher_lm_head=teacher_head)
        self.guard = LossGuard(config.loss_spike_factor)
        self.window = WindowMetrics(ctx.device)
        self.step = 0
        self.position = DataPosition()
        self.last_checkpoint: CheckpointInfo | None = None
        self.rng = RngStreams(config.seed, ctx.rank, ctx.device)
        latest = self.checkpointer.newest_valid(self.log) if resuming else None
        if latest is not None:
            self.restore(latest)
        if not resuming:
            run_directory.claim()
        self.metrics_log.truncate_after(self.step)

    # -- the components, by the names the loop and the tests use ---------------------------------

    @property
    def target(self) -> Any:
        return self.parts.target

    @property
    def draft(self) -> Any:
        return self.drafting.draft

    @property
    def model(self) -> nn.Module:
        return self.drafting.model

    @property
    def layer_ids(self) -> list[int]:
        return self.drafting.layer_ids

    def log(self, message: str) -> None:
        """Print a line on rank 0, above the progress bar."""
        if not self.ctx.is_main:
            return
        if self._bar is not None:
            self._bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)

    # -- the loop -----------------------------------------------------------------------------

    def train(self, *, stop_at: int | None = None) -> TrainResult:
        """Train until ``max_steps`` (or until step ``stop_at``, default ``config.stop_at_step``).

        Checkpoints every ``save_every`` steps and at the end; at ``max_steps`` the final draft is
        also exported to ``RUN_DIR/draft``. Raises :class:`NonFiniteLossError` (or its
        :class:`LossSpikeError`) on a diverging loss, leaving the last checkpoint as it was.
        """
        config = self.config
        stop_at = config.stop_at_step if stop_at is None else stop_at
        end = config.max_steps if stop_at is None else min(stop_at, config.max_steps)
        batches = self._batches()
        self.model.train()
        last_metrics: dict[str, Any] = {}
        started = time.perf_counter()
        # The trackers get what metrics.jsonl gets, from rank 0, for this call of train().
        trackers = Trackers()
        if self.ctx.is_main:
            trackers = open_trackers(config.report_to, self.run_dir, config.to_dict())
        with self._progress_bar(), contextlib.closing(trackers):
            while self.step < end:
                lr, grad_norm = self.train_step(batches)
                paused = time.perf_counter()
                record = self._log_record(lr, grad_norm, time.perf_counter() - started)
                if record:
                    self.metrics_log.write(record)
                    trackers.log(record)
                    last_metrics = record
                if self.step % config.save_every == 0 or self.step in (end, config.max_steps):
                    self.save_checkpoint()
                self.window.exclude(time.perf_counter() - paused)
        export_dir = None
        if self.step >= config.max_steps and self.last_checkpoint is not None:
            export_dir = self.checkpointer.export_final(self.last_checkpoint)
            self.log(f"exported the trained draft to {export_dir}")
        checkpoint = self.last_checkpoint.path if self.last_checkpoint else None
        return TrainResult(self.run_dir, self.step, checkpoint, export_dir, last_metrics)

    def train_step(
        self, batches: Iterator[tuple[DataPosition, dict[str, torch.Tensor]]]
    ) -> tuple[float, float]:
        """One optimizer step over ``grad_accum`` micro-batches; returns (lr used, gradient norm)."""
        grad_accum = self.config.grad_accum
        self.optimizer.zero_grad(set_to_none=True)
        step_terms = torch.zeros(4, device=self.ctx.device)
        for micro in range(grad_accum):
            position, batch = next(batches)
            last = micro == grad_accum - 1
            with DistributedContext.fsdp_accumulating(self.model, accumulating=not last):
                terms, diagnostics, tokens = self._micro_step(batch, sync=last)
            step_terms += terms
            self.window.add_micro_batch(terms, diagnostics, tokens, grad_accum)
        grad_norm = clip_gradients(self.model, self.config.max_grad_norm)
        # One sync per step: the terms are global, so every rank takes the same branch.
        values = torch.cat([step_terms / grad_accum, grad_norm.reshape(1).float().to(step_terms.device)])
        *terms_list, norm = values.tolist()
        self.guard.check(self.step + 1, terms_list, norm, self._kept_checkpoint())
        lr = float(self.scheduler.get_last_lr()[0])
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        self.position = position
        self.window.end_step()
        if self._bar is not None:
            self._bar.update(1)
        return lr, norm

    def _micro_step(
        self, batch: dict[str, torch.Tensor], sync: bool
    ) -> tuple[torch.Tensor, Any, torch.Tensor]:
        device = self.ctx.device
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        features = batch_target_features(self.target, batch, self.layer_ids)
        autocast = (
            torch.autocast(device.type, dtype=self.autocast_dtype)
            if self.autocast_dtype is not None
            else contextlib.nullcontext()
        )
        with DistributedContext.no_sync(self.model, skip=not sync), warnings.catch_warnings():
            # FSDP2 warns that the output holds views; nothing here modifies them in place.
            warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
            with autocast:
                output = self.model(
                    batch["input_ids"],
                    features.features,
                    features.final_hidden,
                    batch["loss_mask"],
                    document_ids=batch.get("document_ids"),
                    generator=self.rng.anchors,
                )
                objective = self.objective(self.draft, output)
            (objective.loss / self.config.grad_accum).backward()
        terms = torch.stack([objective.total, objective.ce, objective.l1, objective.confidence])
        return terms.detach().float(), objective.diagnostics, batch["attention_mask"].sum()

    def _log_record(self, lr: float, grad_norm: float, elapsed: float) -> dict[str, Any]:
        """The metrics line of this step ({} when it logs nothing), evaluation included."""
        config = self.config
        record: dict[str, Any] = {}
        # Not at a stop_at step: a stopped and resumed run must log the lines of an uninterrupted one.
        if self.step % config.log_every == 0 or self.step == config.max_steps:
            summary = self.window.summary(self.ctx)
            record = {"step": self.step, "epoch": self.position.epoch, **summary, "lr": lr}
            record["grad_norm"] = grad_norm
            record["elapsed_s"] = elapsed
            self.window.reset()
            if self._bar is not None:
                # A teacher-forced proxy on training rows, not decoding on held-out prompts.
                self._bar.set_postfix(
                    loss=f"{summary['loss']:.4f}", tau_proxy=f"{summary.get('tau_proxy', 0.0):.3f}"
                )
        if config.eval_every and self.step % config.eval_every == 0:
            record = {"step": self.step, **record, **self.evaluator.run(self.target, self.draft)}
        return record

    def _batches(self) -> Iterator[tuple[DataPosition, dict[str, torch.Tensor]]]:
        return iter_batches(
            self.data.rows,
            batch_size=self.config.batch_size,
            seed=self.config.seed,
            start=self.position,
            collate_fn=self.data.collator,
            shuffle=self.config.shuffle,
            num_replicas=self.ctx.world_size,
            rank=self.ctx.rank,
        )

    @contextlib.contextmanager
    def _progress_bar(self) -> Iterator[None]:
        from tqdm.auto import tqdm

        self._bar = tqdm(
            total=self.config.max_steps,
            initial=self.step,
            desc="train",
            unit="step",
            disable=not (self.config.progress and self.ctx.is_main),
            dynamic_ncols=True,
        )
        try:
            yield
        finally:
            self._bar.close()
            self._bar = None

    def _kept_checkpoint(self) -> str:
        info = self.last_checkpoint
        if info is None:
            return "no checkpoint was saved yet"
        return (
            f"the last good checkpoint is {info.path} (step {info.step}); continue from it with --resume, "
            "e.g. with a lower --lr (lr, min_lr and max_grad_norm may change on resume)"
        )

    # -- checkpoints --------------------------------------------------------------------------

    def save_checkpoint(self) -> CheckpointInfo:
        """Write the checkpoint of the current step atomically (collective: every rank calls it)."""
        model_state, optim_state = full_state_dicts(self.model, self.optimizer)
        state = {
            "model": model_state,
            "optimizer": optim_state,
            "scheduler": self.scheduler.state_dict(),
            "loss_history": self.guard.state(),
            "first_loss": self.guard.first_loss,
        }
        manifest = {
            "data_position": self.position.to_dict(),
            "world_size": self.ctx.world_size,
            "dataset_fingerprint": self.data.fingerprint,
            "num_rows": len(self.data.rows),
            "config": self.config.to_dict(),
            "time": time.time(),
        }
        rank_state = {**self.rng.state(), "window": self.window.state()}
        info = self.checkpointer.save(
            self.step, state, rank_state, manifest, lambda d: self.drafting.export(d, model_state)
        )
        self.last_checkpoint = info
        self.log(f"step {self.step}: checkpoint {info.path}")
        return info

    def restore(self, info: CheckpointInfo) -> None:
        """Continue from ``info``: weights, optimizer, schedule, RNG, metrics window, data position."""
        manifest = info.manifest
        saved_config = manifest.get("config", {})
        differences = self.config.incompatibilities(saved_config)
        if differences:
            raise ConfigError(
                f"cannot resume from {info.path}: the config differs in " + "; ".join(differences)
            )
        if manifest.get("dataset_fingerprint") != self.data.fingerprint:
            raise DatasetError(
                f"cannot resume from {info.path}: the training data changed since it was saved "
                f"({manifest.get('num_rows')} rows then, {len(self.data.rows)} now, or different contents)"
            )
        saved_world = int(manifest.get("world_size", 1))
        loaded = self.checkpointer.load(info, saved_world_size=saved_world)
        load_full_state_dicts(self.model, self.optimizer, loaded.state["model"], loaded.state["optimizer"])
        self.scheduler.load_state_dict(loaded.state["scheduler"])
        adjusted = self.config.adjustments(saved_config)
        if adjusted:
            apply_learning_rate(self.scheduler, self.config)
            self.log(f"resuming with changed {'; '.join(adjusted)}")
        self.guard.restore(loaded.state.get("loss_history"), first_loss=loaded.state.get("first_loss"))
        if loaded.rank_state is not None:
            self.rng.restore(loaded.rank_state)
            if "window" in loaded.rank_state:
                self.window.restore(loaded.rank_state["window"])
        else:
            warnings.warn(
                f"{info.path} was saved by {saved_world} ranks and is resumed by {self.ctx.world_size}: the "
                "RNG streams restart from the seed, so the run continues, but not bit for bit",
                stacklevel=2,
            )
        self.step = int(manifest["step"])
        self.position = DataPosition.from_dict(manifest["data_position"])
        self.last_checkpoint = info
        self.log(f"resumed from {info.path} (step {self.step})")

    def close(self) -> None:
        """Give the run directory's lock back and leave the process group if this trainer joined it."""
        self.run_directory.release()
        self.ctx.shutdown()


def batch_target_features(target: nn.Module, batch: dict[str, torch.Tensor], layer_ids: Sequence[int]) -> Any:
    """The frozen target's :class:`~dspark_core.modeling.features.TargetFeatures` for a collated batch.

    Padded rows pass their attention mask. Packed rows (with ``position_ids``) pass no 2-D mask, so
    that transformers derives a per-document causal mask from the restarting positions: each
    document's features are then those of the document alone.
    """
    from dspark_core.modeling.features import capture_target_features

    packed = "position_ids" in batch
    return capture_target_features(
        target,
        batch["input_ids"],
        layer_ids,
        attention_mask=None if packed else batch["attention_mask"],
        position_ids=batch["position_ids"] if packed else None,
    )


def train(config: TrainConfig) -> TrainResult:
    """Build a :class:`Trainer` for ``config``, run it to ``max_steps`` and leave the process group."""
    context = DistributedContext.from_environment(config.device)
    try:
        trainer = Trainer(config, context=context)
        try:
            result = trainer.train()
        finally:
            trainer.run_directory.release()
    except BaseException:
        context.shutdown()
        raise
    del trainer  # its wrapped model holds the process group: release it before the group goes
    context.shutdown(wait_for_peers=True)
    return result
