"""Per-step values of DINO's schedules, as in the paper's code (Caron et al., 2021).

- learning rate: linear warm-up from 0 to ``base_lr * global_batch / 256``, then cosine decay
  to ``min_lr`` (or stays at the peak when ``min_lr`` is above it: a small batch or a low
  ``base_lr`` with the CPU preset's floor);
- weight decay: cosine from ``weight_decay`` to ``weight_decay_end``;
- teacher EMA momentum: cosine from ``momentum_teacher`` to ``momentum_teacher_end`` (1);
- teacher temperature: linear from ``warmup_teacher_temp`` to ``teacher_temp``, then constant;
- the head's last layer is frozen for the first ``freeze_last_layer_epochs``;
- for ``teacher_warmup_epochs`` the backbone is held still and the teacher copies the student
  (continued pretraining, see :mod:`wsi_ssl.ssl.init`).

Every value is a pure function of the step, so a resumed run continues them exactly. The
cosine pieces are lightly's ``cosine_schedule``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from lightly.utils.scheduler import cosine_schedule

from wsi_ssl.ssl.config import PretrainConfig

__all__ = ["Schedules"]


@dataclass(frozen=True)
class Schedules:
    """The schedules of one run, in optimiser steps."""

    total_steps: int
    steps_per_epoch: int
    peak_lr: float
    min_lr: float
    warmup_steps: int
    weight_decay: float
    weight_decay_end: float
    momentum_teacher: float
    momentum_teacher_end: float
    warmup_teacher_temp: float
    teacher_temp: float
    teacher_temp_warmup_steps: int
    freeze_last_layer_steps: int
    teacher_warmup_steps: int = 0

    @classmethod
    def from_config(
        cls, config: PretrainConfig, *, steps_per_epoch: int, global_batch: int
    ) -> Schedules:
        total = config.steps if config.steps is not None else round(config.epochs * steps_per_epoch)
        total = max(1, total)

        def steps(epochs: float) -> int:  # cut to the run (wsi_ssl.ssl.notes says so)
            return min(total, round(epochs * steps_per_epoch))

        return cls(
            total_steps=total,
            steps_per_epoch=steps_per_epoch,
            peak_lr=config.lr_for(global_batch),
            min_lr=min(config.min_lr, config.lr_for(global_batch)),  # a decay never rises
            warmup_steps=steps(config.warmup_epochs),
            weight_decay=config.weight_decay,
            weight_decay_end=config.weight_decay_end,
            momentum_teacher=config.momentum_teacher,
            momentum_teacher_end=config.momentum_teacher_end,
            warmup_teacher_temp=config.warmup_teacher_temp,
            teacher_temp=config.teacher_temp,
            teacher_temp_warmup_steps=steps(config.warmup_teacher_temp_epochs),
            freeze_last_layer_steps=steps(config.freeze_last_layer_epochs),
            teacher_warmup_steps=steps(config.teacher_warmup_epochs),
        )

    def lr(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.peak_lr * step / self.warmup_steps
        return cosine_schedule(
            step - self.warmup_steps,
            self.total_steps - self.warmup_steps,
            self.peak_lr,
            self.min_lr,
        )

    def weight_decay_at(self, step: int) -> float:
        return cosine_schedule(step, self.total_steps, self.weight_decay, self.weight_decay_end)

    def momentum(self, step: int) -> float:
        return cosine_schedule(
            step, self.total_steps, self.momentum_teacher, self.momentum_teacher_end
        )

    def teacher_temperature(self, step: int) -> float:
        if step < self.teacher_temp_warmup_steps:
            frac = step / self.teacher_temp_warmup_steps
            return self.warmup_teacher_temp + frac * (self.teacher_temp - self.warmup_teacher_temp)
        return self.teacher_temp

    def last_layer_frozen(self, step: int) -> bool:
        return step < self.freeze_last_layer_steps

    def teacher_warming(self, step: int) -> bool:
        return step < self.teacher_warmup_steps

    def epoch(self, step: int) -> float:
        return step / self.steps_per_epoch

    def values(self, step: int, *, teacher: bool = True) -> dict[str, float]:
        """The values at ``step`` for a metrics row (without a teacher, e.g. MAE, those of
        the learning rate and weight decay only)."""
        values = {"lr": self.lr(step), "weight_decay": self.weight_decay_at(step)}
        if teacher:
            values["momentum"] = self.momentum(step)
            values["teacher_temp"] = self.teacher_temperature(step)
        return values

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
