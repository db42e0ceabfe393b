"""The DSpark training loop: a target and a chat dataset in, a servable draft out.

:class:`Trainer` sets a run up (process group, run directory, target, data, draft, optimizer,
resumption) and :meth:`Trainer.train` runs it:

- every micro-batch, the frozen target's features are captured online
  (:func:`~dspark_core.modeling.features.capture_target_features`) and the draft's training forward
  returns the DSpark objective, normalised across ranks so that N ranks equal one rank on N times
  the batch;
- AdamW with linear warmup and cosine decay, gradient clipping and gradient accumulation; bf16
  autocast and flex attention on CUDA, fp32 and SDPA on CPU;
- every rank has its own anchor generator and RNG streams, seeded from ``(seed, rank)``;
- metrics go to ``metrics.jsonl`` (rank 0) and a progress bar; optional periodic evaluation decodes
  held-out prompts with the real speculative decoding loop;
- checkpoints are atomic (see :mod:`checkpoint`) and each exports a ``save_pretrained`` draft.

Nothing here is specific to a model family: the draft class comes from
``resolve_dspark_draft_spec(target_config.architectures)``.

With gradient accumulation each micro-batch is normalised by its own supervised-token count, and
the step averages the micro-batches (the usual convention); across ranks the normalisation is global.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import random
import shutil
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dspark_core.errors import DraftConfigError, DSparkError
from dspark_core.spec import TrainableDraftSpec
from dspark_core.training.checkpoint import (
    EXPORT_DIR,
    RUN_FILE,
    RUN_FORMAT,
    CheckpointInfo,
    CheckpointManager,
    atomic_write_text,
    read_json,
    replace_directory,
)
from dspark_core.training.config import ConfigError, TrainConfig
from dspark_core.training.data import (
    Collator,
    DataPosition,
    DatasetError,
    Example,
    PackedRow,
    TokenizedDataset,
    check_mask_token_unused,
    iter_batches,
    pack_examples,
    read_jsonl,
)
from dspark_core.training.demo import DEMO_DATA_NAME, demo_prompts
from dspark_core.training.distributed import (
    DistributedContext,
    full_state_dicts,
    load_full_state_dicts,
    rank_seed,
)
from dspark_core.training.metrics import MetricsLog, WindowMetrics

__all__ = [
    "NonFiniteLossError",
    "RunDirectoryError",
    "TrainResult",
    "Trainer",
    "WarmupCosine",
    "batch_target_features",
    "dataset_fingerprint",
    "resolve_mask_token_id",
    "train",
]

#: Generation settings of the built-in demo data (greedy, so the data is the target's mode).
DEMO_MAX_NEW_TOKENS = 48
DEMO_BATCH_SIZE = 16


class NonFiniteLossError(DSparkError, FloatingPointError):
    """The loss or the gradient norm became NaN or infinite; training stopped without saving."""


class RunDirectoryError(DSparkError, ValueError):
    """The output directory holds another run (or other files) and neither resume nor overwrite was given."""


@dataclass
class TrainResult:
    """What :meth:`Trainer.train` ends with."""

    run_dir: Path
    step: int
    checkpoint: Path | None
    export_dir: Path | None
    last_metrics: dict[str, Any] = field(default_factory=dict)


class WarmupCosine:
    """Learning-rate factor: linear warmup over ``warmup_steps``, then cosine decay to ``min_ratio``
    at ``total_steps``. Called with the number of optimizer steps already taken."""

    def __init__(self, warmup_steps: int, total_steps: int, min_ratio: float) -> None:
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_ratio = min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            # (step + 1): the first step already learns instead of running at lr 0.
            return (step + 1) / (self.warmup_steps + 1)
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def dataset_fingerprint(rows: Sequence[Example] | Sequence[PackedRow]) -> str:
    """A SHA-256 of every row's tokens and mask (and documents), to tell a changed dataset on resume."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(len(row.input_ids).to_bytes(8, "little"))
        digest.update(b"".join(int(t).to_bytes(4, "little", signed=True) for t in row.input_ids))
        digest.update(bytes(row.loss_mask))
        if isinstance(row, PackedRow):
            digest.update(b"".join(int(d).to_bytes(4, "little", signed=True) for d in row.document_ids))
    return digest.hexdigest()


def resolve_mask_token_id(
    config: TrainConfig, tokenizer: Any, vocab_size: int, reserved_ids: Sequence[int] = ()
) -> int:
    """The draft's ``mask_token_id``: ``config.mask_token_id``, or ``config.mask_token`` looked up in
    the tokenizer, or else, automatically, the first embedding row past the tokenizer's vocabulary
    (an id no text can produce; 151669 for Qwen3) or, when there is none, the first special token
    that is not bos/eos/pad/unk and does not occur in the chat template."""
    if config.mask_token_id is not None:
        return config.mask_token_id
    if tokenizer is None:
        raise DraftConfigError("without a tokenizer the mask token cannot be chosen: pass mask_token_id")
    if config.mask_token is not None:
        token_id = tokenizer.convert_tokens_to_ids(config.mask_token)
        if not isinstance(token_id, int) or token_id == tokenizer.unk_token_id or token_id < 0:
            raise DraftConfigError(
                f"mask_token {config.mask_token!r} is not a token of the target's tokenizer"
            )
        return token_id
    if vocab_size > len(tokenizer):
        return len(tokenizer)
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    excluded = set(reserved_ids) | {
        i
        for i in (
            tokenizer.bos_token_id,
            tokenizer.eos_token_id,
            tokenizer.pad_token_id,
            tokenizer.unk_token_id,
        )
        if i is not None
    }
    for token_id, added in sorted(tokenizer.added_tokens_decoder.items()):
        if (
            added.special
            and token_id not in excluded
            and added.content not in template
            and token_id < vocab_size
        ):
            return int(token_id)
    raise DraftConfigError(
        "cannot choose a mask token automatically: the embedding has no row past the tokenizer and no "
        "unused special token was found; pass mask_token_id (an id the data never uses) or mask_token"
    )


def _absolute(path: str) -> str:
    return str(Path(path).expanduser().resolve())


def _normalise_paths(config: TrainConfig) -> TrainConfig:
    # Resuming from another working directory must compare equal paths equal.
    data = [d if d == DEMO_DATA_NAME else _absolute(d) for d in config.data]
    eval_data = config.eval_data
    if eval_data is not None and eval_data != DEMO_DATA_NAME:
        eval_data = _absolute(eval_data)
    target = _absolute(config.target) if Path(config.target).expanduser().exists() else config.target
    return dataclasses.replace(
        config, data=data, eval_data=eval_data, target=target, output_dir=_absolute(config.output_dir)
    )


class Trainer:
    """One training run. Construction prepares everything (and resumes when asked); :meth:`train`
    runs the loop. Under ``torchrun`` every rank constructs its own ``Trainer``."""

    def __init__(self, config: TrainConfig, *, context: DistributedContext | None = None) -> None:
        config.validate()
        self.config = _normalise_paths(config)
        self.ctx = context or DistributedContext.from_environment(self.config.device)
        self.run_dir = Path(self.config.output_dir)
        self.checkpoints = CheckpointManager(self.run_dir / "checkpoints", self.config.keep_last)
        self.metrics_log = MetricsLog(self.run_dir / "metrics.jsonl", active=self.ctx.is_main)
        device = self.ctx.device
        precision = self.config.precision
        if precision == "auto":
            precision = "bf16" if device.type == "cuda" else "fp32"
        self.autocast_dtype = torch.bfloat16 if precision == "bf16" else None
        attention = self.config.attn_implementation
        if attention == "auto":
            attention = "flex_attention" if device.type == "cuda" else "sdpa"
        self.attention = attention
        self._bar: Any = None

        resuming = self._prepare_run_dir()
        self._load_target(torch.bfloat16 if precision == "bf16" else torch.float32)
        self._load_data()
        self._build_draft()
        self._build_optimizer()
        self._load_eval_prompts()
        self.step = 0
        self.position = DataPosition()
        self.last_checkpoint: CheckpointInfo | None = None
        self._seed_streams()
        latest = self.checkpoints.latest() if resuming else None
        if latest is not None:
            self._restore(latest)
        if not resuming:
            self._write_run_file()
        self.metrics_log.truncate_after(self.step)

    # -- setup --------------------------------------------------------------------------------

    def log(self, message: str) -> None:
        """Print a line on rank 0, above the progress bar."""
        if not self.ctx.is_main:
            return
        if self._bar is not None:
            self._bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)

    def _on_main(self, work: Any) -> Any:
        """Run ``work()`` on rank 0 and hand its result, or its error, to every rank."""
        outcome: tuple[str, Any] = ("ok", None)
        if self.ctx.is_main:
            try:
                outcome = ("ok", work())
            except Exception as exc:
                if not self.ctx.distributed:
                    raise
                outcome = ("error", f"{type(exc).__name__}: {exc}")
        outcome = self.ctx.broadcast_object(outcome)
        if outcome[0] == "error":
            raise DSparkError(f"rank 0 failed: {outcome[1]}")
        return outcome[1]

    def _prepare_run_dir(self) -> bool:
        """Apply the output-directory policy; returns whether an existing run is being resumed."""
        config = self.config
        run_file = self.run_dir / RUN_FILE
        existing = read_json(run_file) if run_file.is_file() else None
        if existing is not None:
            if existing.get("format") != RUN_FORMAT:
                raise RunDirectoryError(f"{run_file} is not a dspark training run file")
            if config.resume:
                differences = config.incompatibilities(existing.get("config", {}))
                if differences:
                    raise ConfigError(
                        f"cannot resume the run in {self.run_dir}: its config differs in "
                        + "; ".join(differences)
                        + ". Resume with the run's values, or pass --overwrite to start a new run"
                    )
            elif not config.overwrite:
                latest = self.checkpoints.latest()
                newest = f", newest checkpoint at step {latest.step}" if latest else ", no checkpoint yet"
                raise RunDirectoryError(
                    f"{self.run_dir} holds another training run ({RUN_FILE}{newest}); pass --resume to "
                    "continue it or --overwrite to replace it"
                )
        elif self._foreign_entries() and not config.overwrite:
            raise RunDirectoryError(
                f"{self.run_dir} is not empty and holds no dspark run (it has "
                f"{', '.join(self._foreign_entries()[:5])}); use a new or empty directory, or pass "
                "--overwrite to write the run into it"
            )
        # Every rank has decided before rank 0 changes anything.
        self.ctx.barrier()
        resuming = existing is not None and config.resume

        def prepare() -> None:
            if existing is not None and config.overwrite:
                for name in (RUN_FILE, "metrics.jsonl"):
                    (self.run_dir / name).unlink(missing_ok=True)
                for name in ("checkpoints", EXPORT_DIR, "data"):
                    shutil.rmtree(self.run_dir / name, ignore_errors=True)
            self.run_dir.mkdir(parents=True, exist_ok=True)
            for stale in self.checkpoints.remove_stale():
                self.log(f"removed an interrupted checkpoint save: {stale}")

        self._on_main(prepare)
        return resuming

    def _foreign_entries(self) -> list[str]:
        # A start that failed before run.json was written may leave only our own artefacts behind.
        if not self.run_dir.is_dir():
            return []
        ours = {RUN_FILE, "metrics.jsonl", "checkpoints", EXPORT_DIR, "data"}
        return sorted(p.name for p in self.run_dir.iterdir() if p.name not in ours)

    def _write_run_file(self) -> None:
        """Mark the directory as this run's, once the whole setup has succeeded."""
        record = {"format": RUN_FORMAT, "version": 1, "config": self.config.to_dict()}
        self._on_main(lambda: atomic_write_text(self.run_dir / RUN_FILE, json_dumps(record)))

    def _load_target(self, dtype: torch.dtype) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        from dspark_core.registry import resolve_dspark_draft_spec

        target_path = self.config.target
        target_config = AutoConfig.from_pretrained(target_path)
        architectures = list(getattr(target_config, "architectures", None) or [])
        spec = resolve_dspark_draft_spec(architectures)
        if not isinstance(spec, TrainableDraftSpec):
            raise DraftConfigError(
                f"the draft spec registered for {architectures} ({spec!r}) cannot build drafts from a target "
                "(it lacks build_draft_config/build_draft), so it cannot be trained"
            )
        self.spec: TrainableDraftSpec = spec
        target: Any = AutoModelForCausalLM.from_pretrained(target_path, dtype=dtype)
        self.target = target.to(self.ctx.device)
        # The target is a frozen teacher: no grad, no dropout.
        self.target.eval().requires_grad_(False)
        self.tokenizer: Any = None
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(target_path)
        except (OSError, ValueError) as exc:
            self.log(f"no tokenizer in {target_path} ({exc}); only pre-tokenised data can be used")

    def _text_config(self) -> Any:
        config = self.target.config
        get_text_config = getattr(config, "get_text_config", None)
        return get_text_config() if callable(get_text_config) else config

    def _load_data(self) -> None:
        config = self.config
        paths: list[str] = []
        for item in config.data:
            if item != DEMO_DATA_NAME:
                paths.append(item)
                continue
            demo_path = self.run_dir / "data" / "demo-train.jsonl"
            self._on_main(lambda path=demo_path: self._write_demo_data(path))
            paths.append(str(demo_path))
        vocab_size = int(self._text_config().vocab_size)
        dataset = TokenizedDataset.from_jsonl(
            paths,
            self.tokenizer,
            max_length=config.max_length,
            vocab_size=vocab_size,
            chat_template_kwargs=config.chat_template_kwargs,
        )
        stats = dataset.stats
        self.log(
            f"data: {stats.examples} examples, {stats.tokens} tokens ({stats.loss_tokens} supervised) from "
            f"{stats.rows_read} rows; skipped {stats.skipped_no_assistant} without an assistant turn and "
            f"{stats.skipped_no_loss} without supervised tokens; truncated {stats.truncated}"
        )
        self.rows: list[Example] | list[PackedRow] = (
            pack_examples(dataset, config.max_length) if config.pack else list(dataset.examples)
        )
        global_batch = config.batch_size * self.ctx.world_size
        if len(self.rows) < global_batch:
            raise DatasetError(
                f"the dataset has {len(self.rows)} {'packed rows' if config.pack else 'examples'}, "
                f"fewer than one global batch ({config.batch_size} x {self.ctx.world_size} ranks)"
            )
        self.fingerprint = dataset_fingerprint(self.rows)
        pad_id = getattr(self.tokenizer, "pad_token_id", None) if self.tokenizer is not None else None
        if pad_id is None:
            pad_id = getattr(self._text_config(), "pad_token_id", None) or 0
        # Flex attention compiles per shape: rounding lengths up to its 128 tile bounds the recompiles.
        multiple = 128 if self.attention == "flex_attention" else None
        self.collator = Collator(pad_token_id=int(pad_id), pad_to_multiple_of=multiple)

    def _write_demo_data(self, path: Path) -> None:
        from dspark_core.training.regenerate import SamplingConfig, chat_rows_from_prompts, regenerate

        if self.tokenizer is None:
            raise DatasetError("data 'demo' needs the target's tokenizer and chat template")
        prompts = demo_prompts("train")
        stats = regenerate(
            self.target,
            self.tokenizer,
            chat_rows_from_prompts(prompts),
            path,
            sampling=SamplingConfig(
                max_new_tokens=DEMO_MAX_NEW_TOKENS, temperature=0.0, seed=self.config.seed
            ),
            batch_size=DEMO_BATCH_SIZE,
            chat_template_kwargs=self.config.chat_template_kwargs,
            progress=self.config.progress,
        )
        if stats.rows_written:
            self.log(f"demo data: the target answered {stats.rows_written} built-in prompts into {path}")

    def _build_draft(self) -> None:
        config = self.config
        text_config = self._text_config()
        special = [
            int(i)
            for name in ("bos_token_id", "eos_token_id", "pad_token_id")
            for i in _as_list(getattr(text_config, name, None))
        ]
        mask_token_id = resolve_mask_token_id(config, self.tokenizer, int(text_config.vocab_size), special)
        check_mask_token_unused(self.rows, mask_token_id)
        options: dict[str, Any] = {
            "num_draft_layers": config.num_draft_layers,
            "block_size": config.block_size,
            "target_layer_ids": config.target_layer_ids,
            "num_feature_layers": config.num_feature_layers,
            "mask_token_id": mask_token_id,
            "num_anchors": config.num_anchors,
            "markov_rank": config.markov_rank,
            "markov_head_type": config.markov_head_type,
            "enable_confidence_head": config.confidence_head,
            # Without a Markov head there are no Markov features to feed the confidence head.
            "confidence_head_with_markov": config.confidence_head_with_markov and config.markov_rank > 0,
        }
        devices = [self.ctx.device] if self.ctx.device.type == "cuda" else []
        # Every rank draws the same initial weights, independent of the global RNG's history.
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(config.seed)
            draft: Any = self.spec.build_draft(self.target, **options)
        self.export_dtype = next(self.target.parameters()).dtype
        # Master weights in fp32; bf16 comes from autocast.
        draft = draft.to(device=self.ctx.device, dtype=torch.float32)
        draft.config._attn_implementation = self.attention
        draft.train()
        self.draft: nn.Module = draft
        self.draft_cls: type[Any] = type(draft)
        self.layer_ids = [int(i) for i in draft.config.target_layer_ids]
        self.trainable_names = [name for name, p in draft.named_parameters() if p.requires_grad]
        self._frozen_state: dict[str, torch.Tensor] = {}
        self.fsdp = self.ctx.distributed and config.parallelism == "fsdp"
        if self.fsdp:
            # The export needs the frozen weights in full; FSDP shards them, so keep a CPU copy.
            self._frozen_state = {
                k: v.detach().cpu().clone()
                for k, v in draft.state_dict().items()
                if k not in self.trainable_names
            }
        self.model = self.ctx.wrap(draft, config.parallelism)
        from dspark_core.modeling.loss import DSparkLossConfig

        self.loss_config = DSparkLossConfig(
            ce_weight=config.ce_weight,
            l1_weight=config.l1_weight,
            confidence_weight=config.confidence_weight,
            decay_gamma=config.loss_decay_gamma,
            chunk_size=config.loss_chunk_size,
        )
        trainable = sum(p.numel() for p in draft.parameters() if p.requires_grad)
        self.log(
            f"draft: {self.draft_cls.__name__}, {trainable:,} trainable parameters, "
            f"mask_token_id {mask_token_id}, target layers {self.layer_ids}, "
            f"{self.attention} attention, {'bf16 autocast' if self.autocast_dtype else 'fp32'}, "
            f"world size {self.ctx.world_size}"
        )

    def _build_optimizer(self) -> None:
        config = self.config
        decay: list[nn.Parameter] = []
        no_decay: list[nn.Parameter] = []
        for param in self.model.parameters():
            if param.requires_grad:
                # Norm weights and biases are not decayed.
                (decay if param.dim() >= 2 else no_decay).append(param)
        groups = [
            {"params": decay, "weight_decay": config.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        self.optimizer = torch.optim.AdamW(
            groups,
            lr=config.lr,
            betas=(config.adam_beta1, config.adam_beta2),
            eps=config.adam_eps,
            fused=self.ctx.device.type == "cuda" and not self.fsdp,
        )
        schedule = WarmupCosine(config.warmup_steps, config.max_steps, config.min_lr / config.lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)

    def _load_eval_prompts(self) -> None:
        config = self.config
        self.eval_prompts: list[list[int]] = []
        if not config.eval_every:
            return
        if self.tokenizer is None:
            raise DatasetError("evaluation needs the target's tokenizer and chat template")
        conversations: list[list[dict[str, str]]] = []
        if config.eval_data == DEMO_DATA_NAME:
            conversations = [[{"role": "user", "content": p}] for p in demo_prompts("eval")]
        elif config.eval_data is not None:
            for row in read_jsonl(config.eval_data):
                messages = getattr(row, "messages", None)
                if messages is None:
                    raise DatasetError(f"{row.origin}: evaluation prompts must be chat rows")
                prompt = list(_prompt_turns(messages))
                if any(m["role"] == "user" for m in prompt):
                    conversations.append(prompt)
                if len(conversations) == config.eval_prompts:
                    break
        for conversation in conversations[: config.eval_prompts]:
            ids: Any = self.tokenizer.apply_chat_template(
                conversation,
                tokenize=True,
                add_generation_prompt=True,
                return_dict=False,
                **config.chat_template_kwargs,
            )
            self.eval_prompts.append([int(t) for t in ids])
        if not self.eval_prompts:
            raise DatasetError(f"no evaluation prompt (a chat row with a user turn) in {config.eval_data}")

    # -- RNG ----------------------------------------------------------------------------------

    def _seed_streams(self) -> None:
        """Seed this rank's streams: anchors, Python and torch (per rank, so anchors differ)."""
        rank, seed = self.ctx.rank, self.config.seed
        self.anchor_generator = torch.Generator(device="cpu")
        self.anchor_generator.manual_seed(rank_seed(seed, rank, "anchors"))
        random.seed(rank_seed(seed, rank, "python"))
        torch.manual_seed(rank_seed(seed, rank, "torch"))

    def rng_state(self) -> dict[str, Any]:
        """This rank's RNG states, for a checkpoint."""
        state: dict[str, Any] = {
            "python": random.getstate(),
            "torch": torch.get_rng_state(),
            "anchors": self.anchor_generator.get_state(),
        }
        if self.ctx.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.ctx.device)
        return state

    def set_rng_state(self, state: dict[str, Any]) -> None:
        random.setstate(_as_tuple(state["python"]))
        torch.set_rng_state(state["torch"])
        self.anchor_generator.set_state(state["anchors"])
        if self.ctx.device.type == "cuda" and "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"], self.ctx.device)

    # -- checkpoints --------------------------------------------------------------------------

    def save_checkpoint(self) -> CheckpointInfo:
        """Write the checkpoint of the current step atomically (collective: every rank calls it)."""
        model_state, optim_state = full_state_dicts(self.model, self.optimizer)
        tmp = self.checkpoints.temporary_path(self.step)
        self._on_main(lambda: self.checkpoints.begin(self.step))
        rank_path = tmp / "rng" / f"rank-{self.ctx.rank:05d}.pt"
        torch.save(self.rng_state(), rank_path)
        self.ctx.barrier()

        def finish() -> CheckpointInfo:
            torch.save(
                {"model": model_state, "optimizer": optim_state, "scheduler": self.scheduler.state_dict()},
                tmp / "trainer_state.pt",
            )
            self._export(tmp / EXPORT_DIR, model_state)
            manifest = {
                "format": "dspark-checkpoint",
                "version": 1,
                "step": self.step,
                "data_position": self.position.to_dict(),
                "world_size": self.ctx.world_size,
                "dataset_fingerprint": self.fingerprint,
                "num_rows": len(self.rows),
                "config": self.config.to_dict(),
                "time": time.time(),
            }
            return self.checkpoints.commit(self.step, manifest)

        info: CheckpointInfo = self._on_main(finish)
        self.last_checkpoint = info
        return info

    def _export(self, directory: Path, model_state: dict[str, torch.Tensor]) -> None:
        """``save_pretrained`` the draft into ``directory``, in the target's dtype."""
        plain: Any = self.draft
        if self.fsdp or self.export_dtype != torch.float32:
            # A plain, unsharded module in the export dtype, built on the meta device and filled in.
            full = {**self._frozen_state, **model_state} if self.fsdp else self.draft.state_dict()
            full = {
                k: v.detach().to("cpu", self.export_dtype if v.is_floating_point() else v.dtype)
                for k, v in full.items()
            }
            with torch.device("meta"):
                plain = self.draft_cls(copy.deepcopy(self.draft.config))
            plain.load_state_dict(full, strict=False, assign=True)
        plain.save_pretrained(directory, safe_serialization=True)

    def _restore(self, info: CheckpointInfo) -> None:
        manifest = info.manifest
        differences = self.config.incompatibilities(manifest.get("config", {}))
        if differences:
            raise ConfigError(
                f"cannot resume from {info.path}: the config differs in " + "; ".join(differences)
            )
        if manifest.get("dataset_fingerprint") != self.fingerprint:
            raise DatasetError(
                f"cannot resume from {info.path}: the training data changed since it was saved "
                f"({manifest.get('num_rows')} rows then, {len(self.rows)} now, or different contents)"
            )
        state = torch.load(info.state_path, map_location="cpu", weights_only=True)
        load_full_state_dicts(self.model, self.optimizer, state["model"], state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        saved_world = int(manifest.get("world_size", 1))
        if saved_world == self.ctx.world_size:
            self.set_rng_state(
                torch.load(info.rng_path(self.ctx.rank), map_location="cpu", weights_only=True)
            )
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

    # -- the loop -----------------------------------------------------------------------------

    def _batches(self) -> Iterator[tuple[DataPosition, dict[str, torch.Tensor]]]:
        return iter_batches(
            self.rows,
            batch_size=self.config.batch_size,
            seed=self.config.seed,
            start=self.position,
            collate_fn=self.collator,
            shuffle=self.config.shuffle,
            num_replicas=self.ctx.world_size,
            rank=self.ctx.rank,
        )

    def _micro_step(
        self, batch: dict[str, torch.Tensor], sync: bool
    ) -> tuple[torch.Tensor, Any, torch.Tensor]:
        device = self.ctx.device
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        input_ids, loss_mask = batch["input_ids"], batch["loss_mask"]
        features = batch_target_features(self.target, batch, self.layer_ids)
        autocast = (
            torch.autocast(device.type, dtype=self.autocast_dtype)
            if self.autocast_dtype is not None
            else contextlib.nullcontext()
        )
        grad_accum = self.config.grad_accum
        with DistributedContext.no_sync(self.model, skip=not sync), warnings.catch_warnings():
            # FSDP2 warns that the output holds views; nothing here modifies them in place.
            warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
            with autocast:
                out = self.model(
                    input_ids,
                    features.features,
                    features.final_hidden,
                    loss_mask,
                    document_ids=batch.get("document_ids"),
                    generator=self.anchor_generator,
                    loss_config=self.loss_config,
                )
            (out.loss / grad_accum).backward()
        lc = self.loss_config
        total = lc.ce_weight * out.ce + lc.l1_weight * out.l1 + lc.confidence_weight * out.confidence_loss
        terms = torch.stack([total, out.ce, out.l1, out.confidence_loss]).detach().float()
        return terms, out.diagnostics, batch["attention_mask"].sum()

    def train(self, *, stop_at: int | None = None) -> TrainResult:
        """Train until ``max_steps`` (or until step ``stop_at``, default ``config.stop_at_step``).

        Checkpoints every ``save_every`` steps and at the end; at ``max_steps`` the final draft is
        also exported to ``RUN_DIR/draft``. Raises :class:`NonFiniteLossError` on a NaN/inf loss,
        leaving the last checkpoint as it was.
        """
        from tqdm.auto import tqdm

        config = self.config
        stop_at = config.stop_at_step if stop_at is None else stop_at
        end = config.max_steps if stop_at is None else min(stop_at, config.max_steps)
        window = WindowMetrics(self.ctx.device)
        last_metrics: dict[str, Any] = {}
        self._bar = tqdm(
            total=config.max_steps,
            initial=self.step,
            desc="train",
            unit="step",
            disable=not (config.progress and self.ctx.is_main),
            dynamic_ncols=True,
        )
        batches = self._batches()
        self.model.train()
        started = time.perf_counter()
        try:
            while self.step < end:
                self.optimizer.zero_grad(set_to_none=True)
                step_terms = torch.zeros(4, device=self.ctx.device)
                for micro in range(config.grad_accum):
                    position, batch = next(batches)
                    last = micro == config.grad_accum - 1
                    with DistributedContext.fsdp_accumulating(self.model, accumulating=not last):
                        terms, diagnostics, tokens = self._micro_step(batch, sync=last)
                    step_terms += terms
                    window.add_micro_batch(terms, diagnostics, tokens, config.grad_accum)
                grad_norm = self._clip_gradients()
                # One sync per step: the terms are global, so every rank takes the same branch.
                health = torch.cat([step_terms, grad_norm.reshape(1).float().to(step_terms.device)])
                if not bool(torch.isfinite(health).all()):
                    self._raise_non_finite(step_terms, grad_norm)
                lr = self.scheduler.get_last_lr()[0]
                self.optimizer.step()
                self.scheduler.step()
                self.step += 1
                self.position = position
                window.end_step()
                self._bar.update(1)
                record: dict[str, Any] = {}
                if self.step % config.log_every == 0 or self.step == end:
                    summary = window.summary(self.ctx)
                    record = {"step": self.step, "epoch": self.position.epoch, **summary, "lr": lr}
                    record["grad_norm"] = float(grad_norm)
                    record["elapsed_s"] = time.perf_counter() - started
                    window.reset()
                    self._bar.set_postfix(loss=f"{summary['loss']:.4f}", tau=f"{summary.get('tau', 0.0):.3f}")
                paused = time.perf_counter()
                if config.eval_every and self.step % config.eval_every == 0:
                    record = {"step": self.step, **record, **self.evaluate()}
                if record:
                    self.metrics_log.write(record)
                    last_metrics = record
                if self.step % config.save_every == 0 or self.step == end or self.step == config.max_steps:
                    info = self.save_checkpoint()
                    self.log(f"step {self.step}: checkpoint {info.path}")
                window.exclude(time.perf_counter() - paused)
            export_dir = None
            if self.step >= config.max_steps and self.last_checkpoint is not None:
                export_dir = self.run_dir / EXPORT_DIR
                checkpoint = self.last_checkpoint
                self._on_main(lambda: replace_directory(checkpoint.export_path, export_dir))
                self.log(f"exported the trained draft to {export_dir}")
        finally:
            self._bar.close()
            self._bar = None
        return TrainResult(
            run_dir=self.run_dir,
            step=self.step,
            checkpoint=self.last_checkpoint.path if self.last_checkpoint else None,
            export_dir=export_dir,
            last_metrics=last_metrics,
        )

    def _clip_gradients(self) -> torch.Tensor:
        params = [p for p in self.model.parameters() if p.requires_grad]
        max_norm = self.config.max_grad_norm if self.config.max_grad_norm > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        full_tensor = getattr(norm, "full_tensor", None)
        return full_tensor() if callable(full_tensor) else norm

    def _raise_non_finite(self, terms: torch.Tensor, grad_norm: torch.Tensor) -> None:
        grad_accum = self.config.grad_accum
        values = (terms / grad_accum).tolist()
        names = ("loss", "ce", "l1", "confidence_loss")
        detail = ", ".join(f"{n}={v:.6g}" for n, v in zip(names, values, strict=True))
        kept = (
            f"the last good checkpoint is {self.last_checkpoint.path} (step {self.last_checkpoint.step}); "
            "resume from it with --resume, e.g. with a lower lr"
            if self.last_checkpoint is not None
            else "no checkpoint was saved yet"
        )
        raise NonFiniteLossError(
            f"non-finite loss at step {self.step + 1} ({detail}, grad_norm={float(grad_norm):.6g}); "
            f"training stopped without saving: {kept}"
        )

    # -- evaluation ---------------------------------------------------------------------------

    def evaluate(self) -> dict[str, Any]:
        """Decode the held-out prompts with the real speculative loop; returns ``eval_*`` metrics.

        Collective: with DDP the prompts are split over ranks; with FSDP every rank decodes them all
        (a sharded forward needs every rank).
        """
        try:
            from dspark_core.decoding.speculative import combine_metrics, speculative_generate
        except ImportError as exc:
            self.log(f"evaluation skipped: the decoding loop is unavailable ({exc})")
            return {}
        prompts = self.eval_prompts
        if not self.fsdp:
            prompts = prompts[self.ctx.rank :: self.ctx.world_size]
        draft: Any = self.draft
        draft.eval()
        results = []
        if self.fsdp:
            # Decoding calls the layers directly, so the root's own parameters must be gathered first.
            draft.unshard()
        try:
            with torch.no_grad():
                for i, prompt in enumerate(prompts):
                    input_ids = torch.tensor([prompt], device=self.ctx.device)
                    result = speculative_generate(
                        self.target,
                        draft,
                        input_ids,
                        max_new_tokens=self.config.eval_max_new_tokens,
                        temperature=self.config.eval_temperature,
                        seed=rank_seed(self.config.seed, i, "eval"),
                    )
                    results.append(result.metrics)
        finally:
            if self.fsdp:
                draft.reshard()
            draft.train()
        gathered = [m for part in self.ctx.all_gather_objects(results) for m in part]
        if self.fsdp:
            gathered = results
        combined = combine_metrics(gathered)
        out: dict[str, Any] = {"eval_tau": combined.tau, "eval_tokens_per_s": combined.tokens_per_s}
        for i, rate in enumerate(combined.accept_rates()):
            out[f"eval_accept_rate@{i}"] = rate
        return out

    def close(self) -> None:
        """Leave the process group if this trainer joined it."""
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


def _prompt_turns(messages: Sequence[Any]) -> Iterator[dict[str, str]]:
    """The turns of a chat row before its first assistant turn, as template dicts."""
    for message in messages:
        if message.role == "assistant":
            return
        yield message.as_dict()


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


def _as_tuple(value: Any) -> Any:
    # random.setstate wants tuples; a state that went through a list-only format comes back as lists.
    if isinstance(value, list):
        return tuple(_as_tuple(v) for v in value)
    return value


def json_dumps(record: Any) -> str:
    """Indented, key-sorted JSON with a final newline."""
    return json.dumps(record, indent=2, sort_keys=True) + "\n"


def train(config: TrainConfig) -> TrainResult:
    """Build a :class:`Trainer` for ``config``, run it to ``max_steps`` and leave the process group."""
    context = DistributedContext.from_environment(config.device)
    try:
        return Trainer(config, context=context).train()
    finally:
        context.shutdown()
