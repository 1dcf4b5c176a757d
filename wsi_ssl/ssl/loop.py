"""The pretraining loop: :func:`run_loop` drives a :class:`~wsi_ssl.ssl.trainer.Trainer` from its
step to its stop step, with the progress bar, the metrics rows (mean loss of the steps since the
last row, throughput, data wait) and the checkpoints, then writes the run's final files.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from wsi_ssl.errors import TrainingDivergedError
from wsi_ssl.ssl.batch_augment import BatchDINOAugment
from wsi_ssl.ssl.metrics import MetricsLog
from wsi_ssl.ssl.runtime import AMP_DTYPES, reduce_mean
from wsi_ssl.ssl.sampler import mix_seed

if TYPE_CHECKING:
    from wsi_ssl.ssl.result import PretrainRun
    from wsi_ssl.ssl.trainer import Trainer

__all__ = ["run_loop"]


@dataclass
class _Window:
    """The steps since the last metrics row: when it began, steps run, time spent waiting."""

    start: float
    steps: int = 0
    data_wait: float = 0.0

    def reset(self, now: float) -> None:
        self.start, self.steps, self.data_wait = now, 0, 0.0


def run_loop(trainer: Trainer) -> PretrainRun:
    """Train from the trainer's step to its stop step; write the run directory."""
    trainer.build()
    c = trainer.config
    metrics = MetricsLog(trainer.out / "metrics.jsonl")
    seconds_before = 0.0  # training time logged before a resume
    if trainer.ctx.main:
        trainer.out.mkdir(parents=True, exist_ok=True)
        seconds_before = metrics.truncate_after(trainer.step)
        trainer.write_json("config.json", trainer.run_info())
    augment = BatchDINOAugment(c) if trainer.augment_mode == "batch" else None
    generator = torch.Generator(device=trainer.device)
    amp = AMP_DTYPES.get(trainer.precision)
    start_step = trainer.step
    # the loss of the steps since the last metrics row (carried over by checkpoints, so
    # that a resumed run logs exactly what an uninterrupted one would)
    trainer.window_loss = trainer.window_loss.to(trainer.device)
    window = _Window(time.perf_counter())
    run_start = window.start
    final_loss: float | None = None
    bar = _progress_bar(trainer)
    loader = trainer.loader()
    batches: Iterator[Any] = iter(loader)
    try:
        while trainer.step < trainer.stop_step:
            t0 = time.perf_counter()
            batch = next(batches)
            window.data_wait += time.perf_counter() - t0
            loss = trainer.train_step(_views(trainer, batch, augment, generator), trainer.step, amp)
            trainer.window_loss += loss.detach()
            for name, part in trainer.last_parts.items():
                total = trainer.window_parts.get(name)
                part = torch.as_tensor(part, device=trainer.device).detach().float()
                trainer.window_parts[name] = part if total is None else total + part
            trainer.window_part_steps += 1
            trainer.window_steps += 1
            window.steps += 1
            trainer.step += 1
            bar.update(1)
            if trainer.step % c.log_every == 0 or trainer.step == trainer.schedules.total_steps:
                clock_zero = run_start - seconds_before
                final_loss = _log_window(trainer, metrics, window, clock_zero, bar)
            if trainer.step % c.checkpoint_every == 0 or trainer.step == trainer.stop_step:
                trainer.save()
    finally:
        bar.close()
        del batches, loader
    elapsed = time.perf_counter() - run_start
    done = trainer.step - start_step
    return trainer.finish(
        metrics, final_loss, done * trainer.global_batch / elapsed if done else None
    )


def _progress_bar(trainer: Trainer) -> Any:
    from tqdm.auto import tqdm

    c = trainer.config
    return tqdm(
        total=trainer.stop_step,
        initial=trainer.step,
        desc=f"{c.method} {c.arch}",
        unit="step",
        disable=not (c.progress and trainer.ctx.main),
        dynamic_ncols=True,
    )


def _views(
    trainer: Trainer, batch: Any, augment: BatchDINOAugment | None, generator: torch.Generator
) -> list[torch.Tensor]:
    """The crops of this step on the device: made by the loader, or here from the tiles."""
    if augment is None:
        return [v.to(trainer.device, non_blocking=True) for v in batch]
    tiles = batch.to(trainer.device, non_blocking=True)
    generator.manual_seed(mix_seed(trainer.config.seed, trainer.step, trainer.ctx.rank, 0xA06))
    return augment(tiles, generator)


def _log_window(
    trainer: Trainer, metrics: MetricsLog, window: _Window, clock_zero: float, bar: Any
) -> float:
    """Append the metrics row of the steps since the last one (the loss and each of its
    terms as their mean over those steps; ``seconds`` since ``clock_zero``, the run's start
    less the training time logged before a resume); return their mean loss."""
    mean_loss = reduce_mean(trainer.ctx, trainer.window_loss / trainer.window_steps)
    if not math.isfinite(mean_loss):
        raise TrainingDivergedError(
            f"{trainer.out}: loss became {mean_loss} by step {trainer.step}; resume from the "
            "last checkpoint with precision='fp32' (pass resume=True), or start a new run with "
            "another out and a lower base_lr (a resumed run keeps its base_lr)",
            parameters=("precision", "resume", "out", "base_lr"),
        )
    now = time.perf_counter()
    elapsed = max(now - window.start, 1e-9)
    ips = window.steps * trainer.global_batch / elapsed
    row = {
        "step": trainer.step,
        "epoch": round(trainer.schedules.epoch(trainer.step), 4),
        "loss": mean_loss,
        **trainer.schedules.values(trainer.step - 1, teacher=trainer.teacher is not None),
        **{
            k: reduce_mean(trainer.ctx, v / trainer.window_part_steps)
            for k, v in sorted(trainer.window_parts.items())
        },
        "images_per_s": round(ips, 2),
        "data_wait": round(window.data_wait / elapsed, 4),
        "seconds": round(now - clock_zero, 3),
    }
    if trainer.ctx.main:
        metrics.append(row)
    bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{ips:.0f}")
    trainer.window_loss.zero_()
    trainer.window_parts = {}
    trainer.window_part_steps = 0
    trainer.window_steps = 0
    window.reset(now)
    return mean_loss
