"""What to know about a pretraining run before it trains: :func:`start_notes` (global crops
larger than the tiles, a warm-up that lasts the whole run), :func:`store_notes` (a slide given
twice, QC asked of stores without QC scores) and :func:`precision_note` (a resumed run that
goes on in another precision). ``wsi-ssl pretrain`` prints them at the start;
``summary.json`` records them (``PretrainRun.notes``)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from wsi_ssl.listing import first_few
from wsi_ssl.ssl.config import PretrainConfig
from wsi_ssl.ssl.schedules import Schedules
from wsi_ssl.ssl.stores import SlideEntry, scale_groups

__all__ = ["precision_note", "recorded_notes", "start_notes", "store_notes"]


def start_notes(config: PretrainConfig, sources: dict[str, Any], schedules: Schedules) -> list[str]:
    """The notes a run's settings, tiles and schedules give before its first step."""
    return [*_crop_notes(config, sources), *_schedule_notes(config, schedules)]


def store_notes(config: PretrainConfig, entries: Sequence[SlideEntry]) -> list[str]:
    """The notes the stores give: a slide in several of them at one scale (trained on once
    per copy), and, with ``skip_flagged_tiles``, the stores without QC scores (nothing of
    them is skipped)."""
    return [
        *_duplicate_notes(entries),
        *(_unscored_notes(entries) if config.skip_flagged_tiles else []),
    ]


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
        f"is upsampled; re-tile at a tile size of {crop} px or more, or set "
        f"global_crop_size={min(small)} (or less)"
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


def _duplicate_notes(entries: Sequence[SlideEntry]) -> list[str]:
    """A slide (its source file's fingerprint) in more than one store at one scale: an
    archive copied, or a slide tiled into two roots, each given to the run."""
    copies: dict[tuple[str, int], list[SlideEntry]] = {}
    for entry, scale in zip(entries, scale_groups(entries), strict=True):
        copies.setdefault((entry.fingerprint or entry.slide_id, scale), []).append(entry)
    twice = [group for group in copies.values() if len(group) > 1]
    if not twice:
        return []
    most = max(len(group) for group in twice)
    times = "twice" if most == 2 else f"up to {most} times"
    roots = sorted({e.root for group in twice for e in group})
    n = len(twice)
    return [
        f"{n} slide{'s are' if n > 1 else ' is'} in more than one of the stores given at one "
        f"scale ({first_few(group[0].slide_id for group in twice)}; in {', '.join(roots)}): "
        f"{'their' if n > 1 else 'its'} tiles are trained on once per copy, counted {times}; "
        "give each slide's store once to count them once"
    ]


def _unscored_notes(entries: Sequence[SlideEntry]) -> list[str]:
    """The stores tiled without QC (or before it): skip_flagged_tiles skips none of theirs."""
    bare = [e for e in entries if not _has_qc_scores(e)]
    if not bare:
        return []
    n, k = len(entries), len(bare)
    which = f"{k} of the {n} stores ha{'s' if k == 1 else 've'} no"
    if k == n:
        which = "the store has no" if n == 1 else f"none of the {n} stores has"
    its, it = ("its", "it") if k == 1 else ("their", "them")
    return [
        f"{which} QC scores (tiled without QC: {first_few(e.path for e in bare)}): "
        f"skip_flagged_tiles skips none of {its} tiles; tile {it} again with QC on to leave "
        f"{its} flagged tiles out"
    ]


def _has_qc_scores(entry: SlideEntry) -> bool:
    """Whether ``entry``'s store holds ``qc/<metric>`` arrays, from their metadata alone (the
    scores, a chunk file per metric and store, are not read)."""
    import zarr

    from wsi_ssl.storage import SlideStore
    from wsi_ssl.storage.per_tile import QC_GROUP

    qc = SlideStore.open(entry.path).group.get(QC_GROUP)
    return isinstance(qc, zarr.Group) and any(True for _ in qc.array_keys())


def precision_note(
    meta: dict[str, Any], now: str, config: PretrainConfig, device: str
) -> list[str]:
    """A resumed run that goes on in another precision than the run that saved its checkpoint
    (``precision='auto'`` on another device, or a precision changed on resuming). Only that
    checkpoint's precision is recorded, not that of the steps before it (a run resumed in
    another precision before)."""
    before = meta.get("precision")
    if before is None or before == now:
        return []
    keep = before != "fp16" or device == "cuda"  # fp16 needs CUDA
    why = f" (precision auto on {device})" if config.precision == "auto" else ""
    return [
        f"the checkpoint it resumes from (step {int(meta['step'])}) was saved by a run in "
        f"{before}, this run goes on in {now}{why}: the run mixes the two, not what a run in one "
        "precision computes" + (f"; set precision={before!r} to go on in {before}" if keep else "")
    ]
