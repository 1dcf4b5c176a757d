"""The pretraining loop, shared by every recipe: ``pretrain(root, config, out=RUN_DIR)``.

One step: the recipe of ``config.method`` (:mod:`wsi_ssl.ssl.recipes`: DINO, DINOv2, MAE)
computes the loss on the crops of a batch; AdamW with the learning rate and weight decay of
:mod:`wsi_ssl.ssl.schedules` (per layer with ``layer_decay``, :mod:`wsi_ssl.ssl.optim`),
per-parameter gradient clipping as in DINO's code, the head's last layer frozen at first, then
the teacher (if the recipe has one) follows the student by EMA (lightly's
``update_momentum``). With ``init`` the backbone starts from an existing encoder
(:mod:`wsi_ssl.ssl.init`).

Runs on a CPU or a GPU (``bf16``/``fp16`` autocast, ``torch.compile``), and on N processes
under ``torchrun --nproc-per-node N``, where the student is wrapped in
``DistributedDataParallel`` (gloo on CPUs, NCCL on GPUs) and each process reads its slice of
every global batch.

The run directory::

    config.json            PretrainConfig, sources, world size (written at the start)
    metrics.jsonl          step, epoch, loss, lr, weight_decay, momentum, teacher_temp,
                           images_per_s, data_wait, seconds (every log_every steps)
    loss.png               loss and learning rate against step
    checkpoints/step_XXXXXXXX.pt   the newest keep_checkpoints (see wsi_ssl.ssl.checkpoint)
    encoder.pt             the teacher backbone alone, for load_encoder
    summary.json           the final state, with per-rank digests of the weights and centre

``resume=True`` continues from the newest checkpoint exactly: same step, optimizer moments,
schedules, teacher, loss centre and generator states; batches and augmentations are functions
of (seed, step), so the resumed run equals an uninterrupted one (bitwise on a CPU).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from lightly.models.utils import update_momentum
from torch import nn
from torch.utils.data import DataLoader

from wsi_ssl.errors import (
    CheckpointError,
    ConfigError,
    DeviceUnavailableError,
    TrainingDivergedError,
)
from wsi_ssl.ssl.backbones import get_spec
from wsi_ssl.ssl.batch_augment import BatchDINOAugment
from wsi_ssl.ssl.checkpoint import (
    ENCODER_FORMAT,
    FORMAT_VERSION,
    RUN_FORMAT,
    capture_rng,
    checkpoint_paths,
    latest_checkpoint,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
    step_path,
)
from wsi_ssl.ssl.config import RUNTIME_FIELDS, PretrainConfig
from wsi_ssl.ssl.data import (
    StepBatchSampler,
    TileDataset,
    _mix,
    describe_sources,
    scale_groups,
    scan_stores,
    select_tiles,
)
from wsi_ssl.ssl.encoder import ENCODER_FILE, describe_encoder
from wsi_ssl.ssl.init import apply_init, load_init
from wsi_ssl.ssl.metrics import MetricsLog, plot_loss
from wsi_ssl.ssl.optim import param_groups
from wsi_ssl.ssl.recipes import make_recipe
from wsi_ssl.ssl.schedules import Schedules
from wsi_ssl.ssl.transforms import HistoDINOTransform
from wsi_ssl.storage.atomic import atomic_write_text
from wsi_ssl.storage.locks import hold_lock

__all__ = [
    "PretrainRun",
    "Trainer",
    "clip_gradients",
    "pretrain",
    "resolve_device",
    "resolve_precision",
]

_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class PretrainRun:
    """What :func:`pretrain` did.

    Attributes:
        out_dir: the run directory.
        config: the run's configuration.
        step: optimiser steps done (the run resumes from here).
        total_steps: steps the run lasts.
        checkpoint: the newest step checkpoint.
        encoder_path: ``encoder.pt`` (the teacher backbone).
        metrics_path: ``metrics.jsonl``.
        loss_plot: ``loss.png``.
        final_loss: mean loss of the last logged window.
        images_per_s: tiles per second (global) over this invocation's steps.
        world_size: processes that trained.
        digests: sha256 of the teacher, student and DINO centre on this rank, and under DDP
            of every rank (``ranks``).
        sources: the slides trained on.
        history: the rows of ``metrics.jsonl``.
    """

    out_dir: Path
    config: PretrainConfig
    step: int
    total_steps: int
    checkpoint: Path | None
    encoder_path: Path | None
    metrics_path: Path
    loss_plot: Path | None
    final_loss: float | None
    images_per_s: float | None
    world_size: int
    digests: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.step >= self.total_steps

    def to_dict(self) -> dict[str, Any]:
        return {
            "out_dir": str(self.out_dir),
            "step": self.step,
            "total_steps": self.total_steps,
            "finished": self.finished,
            "checkpoint": None if self.checkpoint is None else str(self.checkpoint),
            "encoder_path": None if self.encoder_path is None else str(self.encoder_path),
            "metrics_path": str(self.metrics_path),
            "loss_plot": None if self.loss_plot is None else str(self.loss_plot),
            "final_loss": self.final_loss,
            "images_per_s": self.images_per_s,
            "world_size": self.world_size,
            "digests": self.digests,
            "sources": {k: v for k, v in self.sources.items() if k != "slides"},
            "config": self.config.to_dict(),
        }


# -- devices and processes -----------------------------------------------------------------
def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """``"auto"``: CUDA when present; ``"cuda"`` without CUDA is a ``DeviceUnavailableError``."""
    if device == "cpu":
        return torch.device("cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailableError(
            f"--device cuda asked for, but torch {torch.__version__} sees no CUDA device "
            f"(CUDA build: {torch.version.cuda or 'none'}); use --device cpu or --device auto"
        )
    if device in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return "bf16"
        return "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("precision 'fp16' needs CUDA; use bf16 or fp32 on the CPU")
    return precision


@dataclass(frozen=True)
class _Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device_name: str) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world <= 1 and not (dist.is_available() and dist.is_initialized()):
        return _Dist()
    if dist.is_initialized():
        return _Dist(dist.get_rank(), dist.get_world_size(), local_rank, False)
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return _Dist(dist.get_rank(), dist.get_world_size(), local_rank, True)


# -- public entry point --------------------------------------------------------------------
def pretrain(
    root: str | Path | Sequence[str | Path],
    config: PretrainConfig | None = None,
    *,
    out: str | Path | None = None,
    resume: bool = False,
    until_step: int | None = None,
) -> PretrainRun:
    """Train a DINO encoder on the tiles of an archive root (or stores); return the run.

    Args:
        root: archive root(s) written by ``wsi-ssl tile``, or slide stores.
        config: the run's settings (default: ``PretrainConfig()``, the ViT-S/16 recipe).
            When resuming, None means the checkpoint's; a config whose training settings
            differ from the checkpoint's is an error (runtime fields such as device or
            num_workers may change).
        out: run directory (default ``<root>/pretrain/<arch>``).
        resume: continue the run in ``out`` from its newest checkpoint (start afresh when it
            has none). Without it, a directory that already holds checkpoints is an error.
        until_step: stop after this step (with a checkpoint), e.g. to fit a time slot; the
            schedules still span the whole run.

    Raises:
        StoreNotFoundError, StoreIncompleteError, SchemaMismatchError: bad input stores.
        CheckpointError: unreadable checkpoint, another architecture, other slides.
        DeviceUnavailableError: CUDA asked for but absent.
        ConfigError: inconsistent settings. TrainingDivergedError: non-finite loss.
    """
    roots = [root] if isinstance(root, str | Path) else list(root)
    if out is None:
        arch = (config or PretrainConfig()).arch
        out = Path(roots[0]) / "pretrain" / arch.replace(":", "-").replace("/", "-")
    out = Path(out)
    if until_step is not None and until_step < 1:
        raise ConfigError(f"until_step must be >= 1; got {until_step}")
    device_name = (config or PretrainConfig()).device
    resolve_device(device_name)  # fail before starting processes' collectives
    ctx = _init_distributed(device_name)
    threads = torch.get_num_threads()
    # one writer per run directory (the main process writes it; a second run gets
    # StoreLockedError naming the holder)
    run_lock = hold_lock(out / ".lock", out) if ctx.main else contextlib.nullcontext()
    try:
        trainer = Trainer(roots, config, out, resume=resume, until_step=until_step, ctx=ctx)
        if trainer.config.num_threads is not None:
            torch.set_num_threads(trainer.config.num_threads)
        with run_lock:  # taken once the inputs are checked: a refused run writes nothing
            return trainer.run()
    finally:
        torch.set_num_threads(threads)
        if ctx.initialized_here:
            dist.destroy_process_group()


# -- the trainer ---------------------------------------------------------------------------
class Trainer:
    """One run: checks and settings at construction, :meth:`build` the models and optimiser,
    :meth:`train_step` one optimiser step on a list of crops, :meth:`run` the whole loop
    (used by :func:`pretrain`; the benchmark drives ``build`` and ``train_step`` directly)."""

    def __init__(
        self,
        roots: list[str | Path],
        config: PretrainConfig | None,
        out: Path,
        *,
        resume: bool,
        until_step: int | None,
        ctx: _Dist,
    ) -> None:
        self.ctx = ctx
        self.out = out
        self.checkpoint_data = self._existing_checkpoint(out, config, resume)
        if config is not None:
            config = apply_init(config)
        if self.checkpoint_data is not None:
            saved = PretrainConfig.from_dict(self.checkpoint_data["meta"]["config"])
            config = _merge_resumed(saved, config, self.checkpoint_path)
        self.config = config = config or PretrainConfig()
        self.device = resolve_device(config.device, ctx.local_rank)
        self.precision = resolve_precision(config.precision, self.device)
        self.augment_mode = config.augment
        if self.augment_mode == "auto":
            self.augment_mode = "batch" if self.device.type == "cuda" else "loader"
        self.entries = scan_stores(
            roots,
            tile_size=config.tile_size,
            mpp=config.mpp,
            skip_incomplete=config.skip_incomplete,
            mixed_scales=config.mixed_scales,
            mixed_sizes=self.augment_mode == "loader",  # per-tile crops make sizes uniform
        )
        self.keep = select_tiles(
            self.entries,
            min_tissue=config.min_tissue,
            min_tile_std=config.min_tile_std,
            curation=config.curation,
        )
        self.sources = describe_sources(self.entries, self.keep)
        self.global_batch = config.batch_size * ctx.world_size
        n_tiles = self.sources["n_selected"]
        steps_per_epoch = n_tiles // self.global_batch
        if steps_per_epoch < 1:
            raise ConfigError(
                f"the stores hold {n_tiles} tiles, fewer than one global batch "
                f"({config.batch_size} x {ctx.world_size} processes); lower --batch-size"
            )
        self.schedules = Schedules.from_config(
            config, steps_per_epoch=steps_per_epoch, global_batch=self.global_batch
        )
        self.stop_step = self.schedules.total_steps
        if until_step is not None:
            self.stop_step = min(self.stop_step, until_step)
        if self.checkpoint_data is not None:
            self._check_same_run(self.checkpoint_data["meta"])

    # -- setup -----------------------------------------------------------------------------
    def _existing_checkpoint(
        self, out: Path, config: PretrainConfig | None, resume: bool
    ) -> dict[str, Any] | None:
        self.checkpoint_path = latest_checkpoint(out)
        if self.checkpoint_path is None:
            return None
        if not resume:
            raise ConfigError(
                f"{out}: already holds a run (newest checkpoint {self.checkpoint_path.name}); "
                "pass --resume to continue it or choose another --out"
            )
        return load_checkpoint(
            self.checkpoint_path, kind=RUN_FORMAT, arch=None if config is None else config.arch
        )

    def _check_same_run(self, meta: dict[str, Any]) -> None:
        path = self.checkpoint_path
        saved = {(s["slide_id"], s["n_tiles"]) for s in meta["sources"]["slides"]}
        now = {(s["slide_id"], s["n_tiles"]) for s in self.sources["slides"]}
        if saved != now:
            raise CheckpointError(
                f"{path}: the run trained on {len(saved)} slides / {meta['sources']['n_tiles']} "
                f"tiles, but the stores now hold {len(now)} / {self.sources['n_tiles']} "
                f"(added: {sorted(i for i, _ in now - saved)[:5]}, gone or changed: "
                f"{sorted(i for i, _ in saved - now)[:5]}); resume needs the same tiles, start a "
                "new run with another --out"
            )
        if meta["global_batch"] != self.global_batch:
            raise ConfigError(
                f"{path}: the run used a global batch of {meta['global_batch']}, now "
                f"{self.global_batch} (batch size x processes); resume with the same number of "
                "processes"
            )

    def build(self) -> None:
        c = self.config
        torch.manual_seed(c.seed)
        np.random.seed(c.seed % 2**32)
        random.seed(c.seed)
        self.recipe = make_recipe(c)
        self.recipe.rank = self.ctx.rank
        student, teacher = self.recipe.build()
        if c.init is not None and self.checkpoint_data is None:
            load_init(_backbone(student), c)
            if teacher is not None:
                teacher.load_state_dict(student.state_dict())
        if self.ctx.enabled and self.device.type == "cuda" and get_spec(c.arch).batch_norm:
            student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
            if teacher is not None:
                teacher = nn.SyncBatchNorm.convert_sync_batchnorm(teacher)
        self.student: nn.Module = student.to(self.device)
        self.teacher: nn.Module | None = None if teacher is None else teacher.to(self.device)
        if self.teacher is not None:
            self.teacher.train()  # as in DINO: BatchNorm (if any) uses batch statistics
        self.student.train()
        self.recipe.to(self.device)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.benchmark = True
        groups = param_groups(
            self.student,
            _backbone(self.student),
            layer_decay=c.layer_decay,
            freeze_blocks=c.freeze_blocks,
        )
        self.backbone_params = [p for p in _backbone(self.student).parameters() if p.requires_grad]
        compile_ = c.compile if c.compile is not None else self.device.type == "cuda"
        if compile_:
            self.recipe.compile(self.student, self.teacher)
        self.model: nn.Module = self.student
        if self.ctx.enabled:
            self.model = nn.parallel.DistributedDataParallel(
                self.student,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
            )
        self.optimizer = torch.optim.AdamW(groups, lr=0.0)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.step = 0
        self.window_loss = torch.zeros((), device=self.device)
        self.window_steps = 0
        self.last_parts: dict[str, torch.Tensor] = {}
        if self.checkpoint_data is not None:
            self._restore(self.checkpoint_data)
            self.checkpoint_data = None  # free the memory

    def _restore(self, data: dict[str, Any]) -> None:
        try:
            self.student.load_state_dict(data["student"])
            if self.teacher is not None:
                self.teacher.load_state_dict(data["teacher"])
            self.optimizer.load_state_dict(data["optimizer"])
            if self.scaler.is_enabled() and data.get("scaler"):
                self.scaler.load_state_dict(data["scaler"])
            self.recipe.load_loss_state(data.get("loss_state") or {"center": data["center"]})
        except (RuntimeError, KeyError, ValueError) as err:
            raise CheckpointError(
                f"{self.checkpoint_path}: state does not fit a {self.config.arch} run "
                f"({str(err).splitlines()[0]}); the checkpoint is damaged"
            ) from err
        restore_rng(data["rng"])
        self.step = int(data["meta"]["step"])
        self.window_loss = data["window_loss"].to(self.device)
        self.window_steps = int(data["meta"]["window_steps"])

    def _loader(self) -> DataLoader:
        c = self.config
        transform = HistoDINOTransform(c) if self.augment_mode == "loader" else None
        dataset = TileDataset(self.entries, transform=transform, keep=self.keep)
        sampler = StepBatchSampler(
            dataset.slide_sizes,
            batch_size=c.batch_size,
            steps_per_epoch=self.schedules.steps_per_epoch,
            start_step=self.step,
            total_steps=self.stop_step,
            seed=c.seed,
            sampling=c.sampling,
            rank=self.ctx.rank,
            world_size=self.ctx.world_size,
            groups=scale_groups(self.entries) if c.mixed_scales else None,
        )
        workers = c.num_workers
        if workers is None:
            workers = max(0, min(8, (os.cpu_count() or 1) - 1))
        return DataLoader(
            dataset,
            batch_sampler=sampler,
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
            prefetch_factor=4 if workers > 0 else None,
            # an explicit generator: creating the loader must not draw from torch's global
            # generator, or a resumed run would diverge from an uninterrupted one
            generator=torch.Generator().manual_seed(c.seed),
        )

    # -- the loop --------------------------------------------------------------------------
    def run(self) -> PretrainRun:
        self.build()
        main = self.ctx.main
        c = self.config
        metrics = MetricsLog(self.out / "metrics.jsonl")
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            metrics.truncate_after(self.step)
            self._write_json("config.json", self._run_info())
        augment = BatchDINOAugment(c) if self.augment_mode == "batch" else None
        generator = torch.Generator(device=self.device)
        amp = _AMP_DTYPES.get(self.precision)
        start_step = self.step
        # the loss of the steps since the last metrics row (carried over by checkpoints, so
        # that a resumed run logs exactly what an uninterrupted one would)
        self.window_loss = self.window_loss.to(self.device)
        window_start = time.perf_counter()
        window_run_steps = 0
        run_start = window_start
        data_wait = 0.0
        final_loss: float | None = None
        from tqdm.auto import tqdm

        bar = tqdm(
            total=self.stop_step,
            initial=self.step,
            desc=f"{c.method} {c.arch}",
            unit="step",
            disable=not (c.progress and main),
            dynamic_ncols=True,
        )
        loader = self._loader()
        batches: Iterator[Any] = iter(loader)
        try:
            while self.step < self.stop_step:
                t0 = time.perf_counter()
                batch = next(batches)
                data_wait += time.perf_counter() - t0
                step = self.step
                if augment is not None:
                    tiles = batch.to(self.device, non_blocking=True)
                    generator.manual_seed(_mix(c.seed, step, self.ctx.rank, 0xA06))
                    views = augment(tiles, generator)
                else:
                    views = [v.to(self.device, non_blocking=True) for v in batch]
                loss = self.train_step(views, step, amp)
                self.window_loss += loss.detach()
                self.window_steps += 1
                window_run_steps += 1
                self.step += 1
                bar.update(1)
                at_end = self.step == self.stop_step
                if self.step % c.log_every == 0 or self.step == self.schedules.total_steps:
                    mean_loss = self._reduce_mean(self.window_loss / self.window_steps)
                    if not math.isfinite(mean_loss):
                        raise TrainingDivergedError(
                            f"{self.out}: loss became {mean_loss} by step {self.step}; lower "
                            "--lr or use --precision fp32, then resume from the last checkpoint"
                        )
                    now = time.perf_counter()
                    ips = window_run_steps * self.global_batch / max(now - window_start, 1e-9)
                    row = {
                        "step": self.step,
                        "epoch": round(self.schedules.epoch(self.step), 4),
                        "loss": mean_loss,
                        **self.schedules.values(step),
                        **{k: float(v) for k, v in self.last_parts.items()},
                        "images_per_s": round(ips, 2),
                        "data_wait": round(data_wait / max(now - window_start, 1e-9), 4),
                        "seconds": round(now - run_start, 3),
                    }
                    if main:
                        metrics.append(row)
                    bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{ips:.0f}")
                    final_loss = mean_loss
                    self.window_loss.zero_()
                    self.window_steps = 0
                    window_run_steps = 0
                    data_wait = 0.0
                    window_start = now
                if self.step % c.checkpoint_every == 0 or at_end:
                    self._save()
        finally:
            bar.close()
            del batches, loader
        elapsed = time.perf_counter() - run_start
        done = self.step - start_step
        return self._finish(
            metrics, final_loss, done * self.global_batch / elapsed if done else None
        )

    def train_step(
        self, views: list[torch.Tensor], step: int, amp: torch.dtype | None
    ) -> torch.Tensor:
        s = self.schedules
        lr = s.lr(step)
        weight_decay = s.weight_decay_at(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
            if group["apply_wd"]:
                group["weight_decay"] = weight_decay
        autocast = (
            torch.autocast(self.device.type, dtype=amp)
            if amp is not None
            else contextlib.nullcontext()
        )
        loss, self.last_parts = self.recipe.loss(self.model, self.teacher, views, step, s, autocast)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.config.clip_grad > 0:
            self.scaler.unscale_(self.optimizer)
            clip_gradients(self.student.parameters(), self.config.clip_grad)
        last_layer = self.recipe.last_layer(self.student)
        if s.last_layer_frozen(step) and last_layer is not None:
            for p in last_layer.parameters():
                p.grad = None
        warming = s.teacher_warming(step)
        if warming:  # the heads fit the (pretrained) backbone first; it does not move
            for p in self.backbone_params:
                p.grad = None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.teacher is not None:
            with torch.no_grad():
                update_momentum(self.student, self.teacher, m=0.0 if warming else s.momentum(step))
        return loss

    def _reduce_mean(self, value: torch.Tensor) -> float:
        if self.ctx.enabled:
            value = value.clone()
            dist.all_reduce(value)
            value /= self.ctx.world_size
        return float(value.item())

    # -- outputs ---------------------------------------------------------------------------
    def _meta(self) -> dict[str, Any]:
        from wsi_ssl import __version__

        return {
            "wsi_ssl_version": __version__,
            "torch_version": str(torch.__version__),
            "config": self.config.to_dict(),
            "sources": self.sources,
            "step": self.step,
            "epoch": self.schedules.epoch(self.step),
            "total_steps": self.schedules.total_steps,
            "steps_per_epoch": self.schedules.steps_per_epoch,
            "world_size": self.ctx.world_size,
            "global_batch": self.global_batch,
            "precision": self.precision,
            "augment": self.augment_mode,
            "window_steps": self.window_steps,
            "encoder": describe_encoder(self.config),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }

    def _run_info(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "sources": self.sources,
            "world_size": self.ctx.world_size,
            "global_batch": self.global_batch,
            "device": str(self.device),
            "precision": self.precision,
            "augment": self.augment_mode,
            "schedules": self.schedules.to_dict(),
        }

    def _broadcast_buffers(self) -> None:
        """Give every rank rank 0's BatchNorm statistics (the teacher is not DDP-wrapped, and
        without SyncBatchNorm, which needs CUDA, each rank updates its own)."""
        if self.ctx.enabled:
            for module in (self.student, self._encoder_model()):
                for buffer in module.buffers():
                    dist.broadcast(buffer, 0)

    def _save(self) -> None:
        self._broadcast_buffers()
        if self.ctx.main:
            loss_state = self.recipe.loss_state()
            payload = {
                "format": RUN_FORMAT,
                "format_version": FORMAT_VERSION,
                "meta": self._meta(),
                "student": _cpu_state(self.student),
                "teacher": _cpu_state(self._encoder_model()),
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                "center": loss_state.get("center", torch.zeros(0)),
                "loss_state": loss_state,
                "rng": capture_rng(),
                "window_loss": self.window_loss.detach().cpu(),
            }
            self.checkpoint_path = save_checkpoint(step_path(self.out, self.step), payload)
            for old in checkpoint_paths(self.out)[: -self.config.keep_checkpoints]:
                old.unlink(missing_ok=True)
        else:
            self.checkpoint_path = step_path(self.out, self.step)
        if self.ctx.enabled:
            dist.barrier()

    def _finish(
        self, metrics: MetricsLog, final_loss: float | None, images_per_s: float | None
    ) -> PretrainRun:
        self._broadcast_buffers()
        digests: dict[str, Any] = {
            "teacher": _digest(self._encoder_model().state_dict()),
            "student": _digest(self.student.state_dict()),
            "center": _digest(self.recipe.loss_state()),
        }
        if self.ctx.enabled:
            gathered: list[Any] = [None] * self.ctx.world_size
            dist.all_gather_object(gathered, digests)
            digests = {**digests, "ranks": gathered}
        encoder_path = self.out / ENCODER_FILE
        loss_png = self.out / "loss.png"
        loss_plot: Path | None = loss_png
        rows: list[dict[str, Any]] = []
        if self.ctx.main:
            save_checkpoint(
                encoder_path,
                {
                    "format": ENCODER_FORMAT,
                    "format_version": FORMAT_VERSION,
                    "meta": self._meta(),
                    "teacher_backbone": _cpu_state(_backbone(self._encoder_model())),
                },
            )
            rows = metrics.rows()
            loss_plot = (
                plot_loss(rows, loss_png, title=f"{self.config.method} {self.config.arch}")
                if rows
                else None
            )
        if final_loss is None and rows:
            final_loss = rows[-1].get("loss")
        run = PretrainRun(
            out_dir=self.out,
            config=self.config,
            step=self.step,
            total_steps=self.schedules.total_steps,
            checkpoint=self.checkpoint_path,
            encoder_path=encoder_path,
            metrics_path=metrics.path,
            loss_plot=loss_plot,
            final_loss=final_loss,
            images_per_s=None if images_per_s is None else round(images_per_s, 2),
            world_size=self.ctx.world_size,
            digests=digests,
            sources=self.sources,
            history=rows,
        )
        if self.ctx.main:
            self._write_json("summary.json", run.to_dict())
        if self.ctx.enabled:
            dist.barrier()
        return run

    def _encoder_model(self) -> nn.Module:
        """The network whose backbone is the encoder: the teacher, else the student."""
        return self.teacher if self.teacher is not None else self.student

    def _write_json(self, name: str, data: dict[str, Any]) -> None:
        atomic_write_text(self.out / name, json.dumps(data, indent=2))


def clip_gradients(parameters: Iterator[nn.Parameter], clip: float) -> None:
    """Scale each parameter's gradient to norm at most ``clip`` (DINO's ``clip_gradients``)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    norms = torch._foreach_norm(grads)
    for grad, norm in zip(grads, norms, strict=True):
        grad.mul_(torch.clamp(clip / (norm + 1e-6), max=1.0))


def _merge_resumed(
    saved: PretrainConfig, given: PretrainConfig | None, path: Path | None
) -> PretrainConfig:
    """The checkpoint's config, with the runtime fields of ``given`` (others must agree)."""
    if given is None:
        return saved
    a, b = saved.training_key(), given.training_key()
    diff = {k: (a[k], b[k]) for k in a if a[k] != b[k]}
    if diff:
        shown = ", ".join(f"{k}: {x!r} -> {y!r}" for k, (x, y) in sorted(diff.items())[:6])
        raise ConfigError(
            f"{path}: --resume with other training settings than the checkpoint ({shown}); "
            f"only {', '.join(sorted(RUNTIME_FIELDS))} may change; start a new run with another "
            "--out instead"
        )
    return given


def _backbone(model: nn.Module) -> nn.Module:
    backbone = model.backbone
    assert isinstance(backbone, nn.Module)
    return backbone


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def _digest(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(key.encode())
        h.update(str(t.dtype).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
