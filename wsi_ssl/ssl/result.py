"""What a pretraining run produced: :class:`PretrainRun`, and the weight digests in it.

The digests (sha256 of every tensor, in key order) let a test or a user check that two runs,
or the ranks of one run, hold the same weights without loading both.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wsi_ssl.ssl.config import PretrainConfig

__all__ = ["PretrainRun", "cpu_state", "state_digest"]


@dataclass
class PretrainRun:
    """What :func:`pretrain` did.

    Attributes:
        out_dir: the run directory (absolute, as are the paths below).
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
        digests: sha256 of the teacher, student and DINO centre (None: a recipe without one)
            on this rank, and under DDP of every rank (``ranks``).
        sources: the slides trained on.
        history: the rows of ``metrics.jsonl``.
        notes: what to know about the run, known before it trained
            (:mod:`wsi_ssl.ssl.notes`, and any its caller added).
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
    notes: list[str] = field(default_factory=list)

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
            "notes": self.notes,
        }


def cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of a module's state dict (what checkpoints store)."""
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over the keys, dtypes and bytes of a state dict, in key order."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(key.encode())
        h.update(str(t.dtype).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
