"""One pretraining run, step by step: :class:`Trainer` (used by :func:`wsi_ssl.ssl.train.pretrain`).

Construction checks the inputs and settles the settings (stores, selected tiles, schedules,
device, precision, a checkpoint to resume); :meth:`Trainer.build` makes the recipe's networks
and the optimiser; :meth:`Trainer.train_step` is one optimiser step on a list of crops (the
benchmark drives ``build`` and ``train_step`` directly); :meth:`Trainer.run` is the loop, with
its metrics rows, checkpoints and final outputs (the run directory of
:mod:`wsi_ssl.ssl.train`).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from lightly.models.utils import update_momentum
from torch import nn
from torch.utils.data import DataLoader

from wsi_ssl.device import resolve_device
from wsi_ssl.errors import CheckpointError, ConfigError
from wsi_ssl.ssl.backbones import get_spec
from wsi_ssl.ssl.checkpoint import (
    ENCODER_FORMAT,
    FORMAT_VERSION,
    RUN_FORMAT,
    capture_rng,
    checkpoint_paths,
    restore_rng,
    save_checkpoint,
    step_path,
)
from wsi_ssl.ssl.config import PretrainConfig
from wsi_ssl.ssl.curation import curation_notes
from wsi_ssl.ssl.dataset import TileDataset
from wsi_ssl.ssl.encoder import ENCODER_FILE, describe_encoder
from wsi_ssl.ssl.init import apply_init, check_init_weights, load_init
from wsi_ssl.ssl.loop import run_loop
from wsi_ssl.ssl.metrics import MetricsLog, plot_loss
from wsi_ssl.ssl.notes import precision_note, recorded_notes, start_notes, store_notes
from wsi_ssl.ssl.optim import clip_gradients, param_groups
from wsi_ssl.ssl.recipes import make_recipe
from wsi_ssl.ssl.result import PretrainRun, cpu_state, state_digest
from wsi_ssl.ssl.resume import (
    absolute_paths,
    check_same_run,
    merge_resumed,
    open_checkpoint,
    recorded_config,
)
from wsi_ssl.ssl.runtime import (
    DistContext,
    broadcast_buffers,
    resolve_precision,
)
from wsi_ssl.ssl.sampler import StepBatchSampler
from wsi_ssl.ssl.schedules import Schedules
from wsi_ssl.ssl.selection import select_tiles
from wsi_ssl.ssl.stores import describe_sources, scale_groups, scan_stores
from wsi_ssl.ssl.transforms import HistoDINOTransform
from wsi_ssl.storage.atomic import atomic_write_text

__all__ = ["Trainer"]


class Trainer:
    """One run: checks and settings at construction, :meth:`build` the models and optimiser,
    :meth:`train_step` one optimiser step on a list of crops, :meth:`run` the whole loop."""

    def __init__(
        self,
        roots: list[str | Path],
        config: PretrainConfig | None,
        out: Path,
        *,
        resume: bool,
        until_step: int | None,
        ctx: DistContext,
    ) -> None:
        self.ctx = ctx
        self.out = out
        if config is not None:  # its files recorded absolute: a resume from elsewhere finds them
            config = apply_init(absolute_paths(config))  # init's arch: the checkpoint's check
        self.checkpoint_path, self.checkpoint_data = open_checkpoint(out, config, resume)
        self.output: str | None = None  # the encoder's pooling (None: its architecture's)
        if self.checkpoint_data is not None:
            meta = self.checkpoint_data["meta"]
            config = merge_resumed(
                PretrainConfig.from_dict(meta["config"]), config, self.checkpoint_path
            )
            # as it published it: runs from before ``output`` was recorded gave the class token
            self.output = meta.get("encoder", {}).get("output", "cls")
        elif resume and (recorded := recorded_config(out)) is not None:  # stopped before one
            config = merge_resumed(recorded, config, out / "config.json")
        self.config = config = config or PretrainConfig()
        if self.checkpoint_data is None:  # a missing init file refused before the run's lock
            check_init_weights(config)
        self.device = resolve_device(config.device, ctx.local_rank)
        self.precision = resolve_precision(config.precision, self.device)
        self.augment_mode = config.augment
        if self.augment_mode == "auto":
            self.augment_mode = "batch" if self.device.type == "cuda" else "loader"
        self._read_sources(roots)
        self.global_batch = config.batch_size * ctx.world_size
        n_tiles = self.sources["n_selected"]
        steps_per_epoch = n_tiles // self.global_batch
        if steps_per_epoch < 1:
            raise ConfigError(
                f"{n_tiles} tiles are selected for training (after any curation or QC "
                "selection), fewer than one global batch "
                f"({config.batch_size} x {ctx.world_size} processes); lower batch_size",
                parameters=("batch_size",),
            )
        self.schedules = Schedules.from_config(
            config, steps_per_epoch=steps_per_epoch, global_batch=self.global_batch
        )
        # what to know before it trains (a resumed run keeps those of the command that began it)
        earlier = recorded_notes(out) if resume else []
        found = [
            *store_notes(config, self.entries),
            *start_notes(config, self.sources, self.schedules),
        ]
        if self.checkpoint_data is not None:  # another precision than its saver's
            found += precision_note(
                self.checkpoint_data["meta"], self.precision, config, self.device.type
            )
        if config.curation is not None:  # the slides it leaves out
            found = [*curation_notes(config.curation, self.entries), *found]
        self.notes: list[str] = list(dict.fromkeys([*earlier, *found]))
        self.stop_step = self.schedules.total_steps
        if until_step is not None:
            self.stop_step = min(self.stop_step, until_step)
        if self.checkpoint_data is not None:
            check_same_run(
                self.checkpoint_data["meta"], self.sources, self.global_batch, self.checkpoint_path
            )

    # -- setup -----------------------------------------------------------------------------
    def _read_sources(self, roots: list[str | Path]) -> None:
        """The stores (:attr:`entries`), the tiles kept of each (:attr:`keep`), their
        description (:attr:`sources`) and the stain normaliser (:attr:`stain`, None: off)."""
        c = self.config
        self.entries = scan_stores(
            roots,
            tile_size=c.tile_size,
            mpp=c.mpp,
            skip_incomplete=c.skip_incomplete,
            mixed_scales=c.mixed_scales,
            mixed_sizes=self.augment_mode == "loader",  # per-tile crops make sizes uniform
        )
        self.keep = select_tiles(
            self.entries,
            min_tissue=c.min_tissue,
            min_tile_std=c.min_tile_std,
            curation=c.curation,
            skip_flagged=c.skip_flagged_tiles,
        )
        self.sources = describe_sources(self.entries, self.keep)
        self.stain: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.stain_record: dict[str, Any] = {}  # ``{"stain": provenance}`` for the encoder
        if c.stain_normalize is not None and c.stain_reference is not None:
            from wsi_ssl.stain import StainNormalizer
            from wsi_ssl.stain_settings import stain_provenance

            self.stain = StainNormalizer(c.stain_normalize, c.stain_reference)
            self.stain_record = {"stain": stain_provenance(c.stain_normalize, c.stain_reference)}

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
        self.window_parts: dict[str, torch.Tensor] = {}  # each loss term summed, like the loss
        self.window_part_steps = 0  # the steps those sums cover (fewer after an old checkpoint)
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
        self.window_parts = {k: v.to(self.device) for k, v in data.get("window_parts", {}).items()}
        self.window_steps = int(data["meta"]["window_steps"])
        counted = self.window_steps if "window_parts" in data else 0  # before the count was kept
        self.window_part_steps = int(data["meta"].get("window_part_steps", counted))

    def loader(self) -> DataLoader:
        c = self.config
        transform = HistoDINOTransform(c) if self.augment_mode == "loader" else None
        dataset = TileDataset(self.entries, transform=transform, keep=self.keep, stain=self.stain)
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
        """Train from the current step to the stop step; write the run directory."""
        return run_loop(self)

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
            "window_part_steps": self.window_part_steps,
            "encoder": describe_encoder(self.config, output=self.output, **self.stain_record),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }

    def run_info(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "sources": self.sources,
            "world_size": self.ctx.world_size,
            "global_batch": self.global_batch,
            "device": str(self.device),
            "precision": self.precision,
            "augment": self.augment_mode,
            "schedules": self.schedules.to_dict(),
            "notes": self.notes,
        }

    def _broadcast_buffers(self) -> None:
        broadcast_buffers(self.ctx, (self.student, self._encoder_model()))

    def save(self) -> None:
        self._broadcast_buffers()
        if self.ctx.main:
            loss_state = self.recipe.loss_state()
            payload = {
                "format": RUN_FORMAT,
                "format_version": FORMAT_VERSION,
                "meta": self._meta(),
                "student": cpu_state(self.student),
                "teacher": cpu_state(self._encoder_model()),
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                "center": loss_state.get("center", torch.zeros(0)),
                "loss_state": loss_state,
                "rng": capture_rng(),
                "window_loss": self.window_loss.detach().cpu(),
                "window_parts": {k: v.detach().cpu() for k, v in self.window_parts.items()},
            }
            self.checkpoint_path = save_checkpoint(step_path(self.out, self.step), payload)
            for old in checkpoint_paths(self.out)[: -self.config.keep_checkpoints]:
                old.unlink(missing_ok=True)
        else:
            self.checkpoint_path = step_path(self.out, self.step)
        if self.ctx.enabled:
            dist.barrier()

    def finish(
        self, metrics: MetricsLog, final_loss: float | None, images_per_s: float | None
    ) -> PretrainRun:
        """Write ``encoder.pt``, ``loss.png`` and ``summary.json`` (last) for the current step;
        a call that trained nothing keeps those an earlier call wrote for this step."""
        self._broadcast_buffers()
        loss_state = self.recipe.loss_state()  # empty: no centre (DINOv2's Sinkhorn-Knopp, MAE)
        digests: dict[str, Any] = {
            "teacher": state_digest(self._encoder_model().state_dict()),
            "student": state_digest(self.student.state_dict()),
            "center": state_digest(loss_state) if loss_state else None,
        }
        if self.ctx.enabled:
            gathered: list[Any] = [None] * self.ctx.world_size
            dist.all_gather_object(gathered, digests)
            digests = {**digests, "ranks": gathered}
        encoder_path = self.out / ENCODER_FILE
        loss_png = self.out / "loss.png"
        loss_plot: Path | None = loss_png
        rows: list[dict[str, Any]] = metrics.rows() if self.ctx.main else []
        written = images_per_s is None and self._finished_before()  # None: nothing trained
        if written:
            loss_plot = loss_png if loss_png.is_file() else None
        elif self.ctx.main:
            save_checkpoint(
                encoder_path,
                {
                    "format": ENCODER_FORMAT,
                    "format_version": FORMAT_VERSION,
                    "meta": self._meta(),
                    "teacher_backbone": cpu_state(_backbone(self._encoder_model())),
                },
            )
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
            notes=self.notes,
        )
        if self.ctx.main and not written:
            self.write_json("summary.json", run.to_dict())
        if self.ctx.enabled:
            dist.barrier()
        return run

    def _finished_before(self) -> bool:
        """An earlier call wrote this step's outputs (``summary.json`` is written last)."""
        try:
            summary = json.loads((self.out / "summary.json").read_text())
        except (OSError, ValueError):
            return False
        return summary.get("step") == self.step and (self.out / ENCODER_FILE).is_file()

    def _encoder_model(self) -> nn.Module:
        """The network whose backbone is the encoder: the teacher, else the student."""
        return self.teacher if self.teacher is not None else self.student

    def write_json(self, name: str, data: dict[str, Any]) -> None:
        atomic_write_text(self.out / name, json.dumps(data, indent=2))


def _backbone(model: nn.Module) -> nn.Module:
    backbone = model.backbone
    assert isinstance(backbone, nn.Module)
    return backbone
