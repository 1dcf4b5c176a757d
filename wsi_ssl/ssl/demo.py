"""A short CPU pretraining run for the demo: a minute or two on an archive root."""

from __future__ import annotations

from pathlib import Path

from wsi_ssl.ssl.config import PretrainConfig
from wsi_ssl.ssl.result import PretrainRun
from wsi_ssl.ssl.train import pretrain

__all__ = ["demo_pretrain"]


def demo_pretrain(
    root: str | Path,
    out: str | Path,
    *,
    steps: int = 200,
    batch_size: int = 32,
    progress: bool = False,
    resume: bool = True,
) -> PretrainRun:
    """Train the CPU preset for ``steps`` steps on ``root``'s tiles; return the run.

    ``run.loss_plot`` is the loss-curve PNG, ``run.encoder_path`` the encoder, and
    ``run.final_loss`` / ``run.images_per_s`` summarise it. Re-running with the same ``out``
    resumes (and returns at once when the run is finished). The batch is capped at the
    archive's tile count, so a slide or two of one's own still trains.
    """
    from wsi_ssl.storage import open_store

    archive = open_store(root)
    n_tiles = sum(archive.slide(s).n_tiles for s in archive.slide_ids)
    config = PretrainConfig.preset(
        "cpu-small",
        steps=steps,
        batch_size=max(2, min(batch_size, n_tiles)),
        device="cpu",
        num_workers=1,
        checkpoint_every=max(1, steps // 2),
        log_every=5,
        progress=progress,
    )
    return pretrain(root, config, out=out, resume=resume)
