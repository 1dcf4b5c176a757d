"""What to know about a pretraining run before it trains: :func:`start_notes` (global crops
larger than the tiles, a warm-up that lasts the whole run). ``wsi-ssl pretrain`` prints them at
the start; ``summary.json`` records them (``PretrainRun.notes``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from wsi_ssl.ssl.config import PretrainConfig
from wsi_ssl.ssl.schedules import Schedules

__all__ = ["recorded_notes", "start_notes"]


def start_notes(config: PretrainConfig, sources: dict[str, Any], schedules: Schedules) -> list[str]:
    """The notes a run's settings, tiles and schedules give before its first step."""
    return [*_crop_notes(config, sources), *_schedule_notes(config, schedules)]


def recorded_notes(out: Path) -> list[str]:
    """The notes ``out/config.json`` recorded when the run started (none: an older run, or
    none written yet): a resumed run keeps those of the command that began it."""
    try:
        notes = json.loads((out / "config.json").read_text()).get("notes")
    except (OSError, ValueError, AttributeError):
        return []
    return [str(n) for n in notes] if isinstance(notes, list) else []


def _crop_notes(config: PretrainConfig, sources: dict[str, Any]) -> list[str]:
    """Global crops larger than the tiles: every crop is upsampled (blurred tissue)."""
    sizes = sources.get("tile_sizes") or [sources.get("tile_size")]
    small = [int(t) for t in sizes if t and int(t) < config.global_crop_size]
    if not small:
        return []
    crop = config.global_crop_size
    return [
        f"tiles of {min(small)} px are smaller than the {crop} px global crops: every crop "
        f"is upsampled; tile at tile_size >= {crop}, or set global_crop_size <= {min(small)}"
    ]


def _schedule_notes(config: PretrainConfig, s: Schedules) -> list[str]:
    """A heads-only phase or a learning-rate warm-up as long as the run (the schedules cut
    them to the run's length without a word)."""
    total = s.total_steps
    run = f"the whole run of {total} step{'s' if total > 1 else ''}"
    notes = []
    if s.teacher_warmup_steps >= total:
        asked = round(config.teacher_warmup_epochs * s.steps_per_epoch)
        kept = f"the weights of init {config.init}" if config.init else "its random weights"
        notes.append(
            f"teacher_warmup_epochs {config.teacher_warmup_epochs:g} ({asked} steps) covers "
            f"{run}: the backbone is frozen throughout and only the heads train, so encoder.pt "
            f"keeps {kept}; run more steps, or lower teacher_warmup_epochs"
        )
    if s.warmup_steps >= total:
        asked = round(config.warmup_epochs * s.steps_per_epoch)
        notes.append(
            f"the learning-rate warm-up (warmup_epochs {config.warmup_epochs:g}, {asked} steps) "
            f"covers {run}: the learning rate climbs from 0 throughout, "
            "never reaching its peak nor decaying; run more steps, or lower warmup_epochs"
        )
    return notes
