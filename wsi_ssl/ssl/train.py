"""Pretraining, shared by every recipe: ``pretrain(root, config, out=RUN_DIR)``.

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
every global batch. The step and the loop are :class:`~wsi_ssl.ssl.trainer.Trainer`'s;
devices and processes :mod:`wsi_ssl.ssl.runtime`'s; resuming :mod:`wsi_ssl.ssl.resume`'s.

The run directory::

    config.json            PretrainConfig, sources, world size, notes (written at the start)
    metrics.jsonl          step, epoch, loss, lr, weight_decay, momentum and teacher_temp
                           (recipes with a teacher), the loss terms, images_per_s,
                           data_wait, seconds (every log_every steps)
    loss.png               loss and learning rate against step
    checkpoints/step_XXXXXXXX.pt   the newest keep_checkpoints (see wsi_ssl.ssl.checkpoint)
    encoder.pt             the teacher backbone alone, for load_encoder
    summary.json           the final state (absolute paths), per-rank digests of the weights
                           and centre, the notes

``resume=True`` continues from the newest checkpoint exactly: same step, optimizer moments,
schedules, teacher, loss centre and generator states; batches and augmentations are functions
of (seed, step), so the resumed run equals an uninterrupted one (bitwise on a CPU).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.distributed as dist

from wsi_ssl.device import resolve_device
from wsi_ssl.errors import ConfigError
from wsi_ssl.listing import one_or_many
from wsi_ssl.ssl.config import PretrainConfig
from wsi_ssl.ssl.result import PretrainRun
from wsi_ssl.ssl.runtime import init_distributed
from wsi_ssl.ssl.trainer import Trainer
from wsi_ssl.storage.locks import hold_lock

__all__ = ["PretrainRun", "pretrain"]


def pretrain(
    root: str | Path | Sequence[str | Path],
    config: PretrainConfig | None = None,
    *,
    out: str | Path | None = None,
    resume: bool = False,
    until_step: int | None = None,
    on_start: Callable[[PretrainConfig, list[str]], Sequence[str]] | None = None,
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
        on_start: called on every process once the inputs are checked and the run's settings
            settled, before the first step, with the run's config (an init's arch adopted, a
            resumed run's settings) and its notes (crops larger than the tiles, a warm-up as
            long as the run, a slide given twice, QC asked of stores without scores, a resume
            in another precision); what it returns are the notes recorded (``PretrainRun.notes``,
            ``summary.json``), so a caller can print them at once and add its own.

    Raises:
        StoreNotFoundError, StoreIncompleteError, SchemaMismatchError: bad input stores.
        CheckpointError: unreadable checkpoint, another architecture, other slides.
        DeviceUnavailableError: CUDA asked for but absent.
        ConfigError: inconsistent settings. TrainingDivergedError: non-finite loss.
    """
    roots = one_or_many(root)
    if out is None:
        arch = (config or PretrainConfig()).arch
        out = Path(roots[0]) / "pretrain" / arch.replace(":", "-").replace("/", "-")
    out = Path(os.path.abspath(out))  # recorded paths read right from any folder
    if until_step is not None and until_step < 1:
        raise ConfigError(f"until_step must be >= 1; got {until_step}", parameters=("until_step",))
    device_name = (config or PretrainConfig()).device
    resolve_device(device_name)  # fail before starting processes' collectives
    ctx = init_distributed(device_name)
    threads = torch.get_num_threads()
    # one writer per run directory (the main process writes it; a second run gets
    # StoreLockedError naming the holder); its file goes with it, as a MIL run's does
    made = _new_dirs(out) if ctx.main else []
    run_lock = hold_lock(out / ".lock", out, remove=True) if ctx.main else contextlib.nullcontext()
    try:
        trainer = Trainer(roots, config, out, resume=resume, until_step=until_step, ctx=ctx)
        if trainer.config.num_threads is not None:
            torch.set_num_threads(trainer.config.num_threads)
        with run_lock:  # taken once the inputs are checked: a refused run writes nothing
            if on_start is not None:
                trainer.notes = list(on_start(trainer.config, list(trainer.notes)))
            return trainer.run()
    except BaseException:
        _remove_empty(made)  # refused before its first file (init weights missing, say)
        raise
    finally:
        torch.set_num_threads(threads)
        if ctx.initialized_here:
            dist.destroy_process_group()


def _new_dirs(path: Path) -> list[Path]:
    """``path`` and those of its parents that do not exist yet, deepest first."""
    made = []
    while not path.exists() and path != path.parent:
        made.append(path)
        path = path.parent
    return made


def _remove_empty(dirs: list[Path]) -> None:
    """Remove ``dirs`` (deepest first) while they are empty: the folders a refused run made
    for itself and left as it found them (a run that wrote something keeps them all)."""
    for path in dirs:
        try:
            path.rmdir()
        except OSError:  # not empty (the run wrote in it, or another run did), or not there
            return
