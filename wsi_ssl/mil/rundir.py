"""Writing a MIL run directory (layout in :mod:`wsi_ssl.mil.training`).

Everything is written under ``.<name>.partial`` beside the run and renamed into place by
:func:`publish` once complete, so a run directory is never half-written.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wsi_ssl.errors import CheckpointError
from wsi_ssl.mil.config import MILConfig
from wsi_ssl.mil.matching import MatchReport, training_tilings
from wsi_ssl.mil.metrics import plot_roc
from wsi_ssl.storage.atomic import atomic_write_bytes, atomic_write_text, replace_directory

__all__ = [
    "CHECKPOINT_FORMAT",
    "FORMAT_VERSION",
    "RUN_FORMAT",
    "checkpoint_digests",
    "encoder_attrs",
    "partial_dir",
    "publish",
    "replaced_run_note",
    "verify_checkpoints",
    "write_csv",
    "write_fold",
    "write_predictions",
]

CHECKPOINT_FORMAT = "wsi-ssl-mil"
RUN_FORMAT = "wsi-ssl-mil-run"
FORMAT_VERSION = 1


def partial_dir(out: Path) -> Path:
    """A fresh ``.<name>.partial`` directory beside ``out`` (with its ``folds/``)."""
    partial = out.parent / f".{out.name}.partial"
    if partial.exists():
        shutil.rmtree(partial)
    (partial / "folds").mkdir(parents=True)
    return partial


def write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def write_fold(
    partial: Path, fold: int, checkpoint: dict[str, Any], history: list[dict[str, Any]]
) -> str:
    """``folds/fold_<f>/model.pt`` (and ``history.csv`` when there is one); returns the
    checkpoint's path relative to the run.

    The checkpoint is serialised in memory and written atomically, so a full disk is an
    ``OSError`` (ENOSPC), not torch's ``RuntimeError``."""
    fold_dir = partial / "folds" / f"fold_{fold}"
    fold_dir.mkdir()
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    atomic_write_bytes(fold_dir / "model.pt", buffer.getvalue())
    if history:
        keys = list(dict.fromkeys(k for row in history for k in row))
        write_csv(fold_dir / "history.csv", keys, [[row.get(k) for k in keys] for row in history])
    return f"folds/fold_{fold}/model.pt"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_digests(run: Path, checkpoints: list[str]) -> dict[str, str]:
    """The sha256 of each checkpoint (paths relative to ``run``), as ``run.json`` records
    them under ``checkpoint_sha256``."""
    return {rel: _sha256(run / rel) for rel in checkpoints}


def verify_checkpoints(run: Path, info: dict[str, Any], folds: list[int]) -> None:
    """Check the checkpoints of ``folds`` against the sha256 ``run.json`` (``info``) records;
    a run written before these records (none) passes.

    Raises:
        CheckpointError: a checkpoint is not the file training wrote (altered or damaged).
    """
    recorded = info.get("checkpoint_sha256") or {}
    for fold in folds:
        rel = info["checkpoints"][fold]
        if rel not in recorded:
            continue
        path = run / rel
        try:
            digest = _sha256(path)
        except OSError as err:
            raise CheckpointError(f"{path}: cannot read checkpoint ({err})") from err
        if digest != recorded[rel]:
            raise CheckpointError(
                f"{path}: checkpoint is damaged or was altered (its sha256 is not the one "
                f"{run / 'run.json'} recorded when it was trained); its predictions cannot be "
                "trusted: train the run again (`wsi-ssl mil train ... --overwrite`)"
            )


def checkpoint_header(
    config: MILConfig, report: MatchReport, fold: int, seed: int
) -> dict[str, Any]:
    """What every fold checkpoint records besides its learner's state."""
    return {
        "format": CHECKPOINT_FORMAT,
        "format_version": FORMAT_VERSION,
        "config": config.to_dict(),
        "encoder_id": report.encoder_id,
        "in_dim": report.in_dim,
        "classes": report.classes,
        "fold": fold,
        "seed": seed,
    }


def write_predictions(
    partial: Path,
    report: MatchReport,
    folds: np.ndarray,
    oof: np.ndarray,
    curves_title: str,
    fold_numbers: list[int],
) -> None:
    """``splits.csv``, ``predictions.csv`` (out-of-fold probabilities) and ``roc.png``."""
    classes, slides = report.classes, report.slides
    y = np.array([s.y for s in slides], dtype=np.int64)
    write_csv(
        partial / "splits.csv",
        ["slide_id", "name", "patient", "label", "fold", "line"],
        [
            [s.slide_id, s.name, s.patient, s.label, int(folds[i]), s.line]
            for i, s in enumerate(slides)
        ],
    )
    write_csv(
        partial / "predictions.csv",
        ["slide_id", "name", "patient", "label", "fold", "predicted"]
        + [f"prob_{c}" for c in classes],
        [
            [s.slide_id, s.name, s.patient, s.label, int(folds[i]), classes[int(oof[i].argmax())]]
            + [f"{p:.6f}" for p in oof[i]]
            for i, s in enumerate(slides)
        ],
    )
    curves = [(f"fold {f}", y[folds == f], oof[folds == f]) for f in fold_numbers]
    plot_roc(partial / "roc.png", [*curves, ("pooled", y, oof)], classes, curves_title)


def encoder_attrs(report: MatchReport) -> dict[str, Any]:
    """The encoder config, weights hash and stain normalisation recorded with the first
    slide's embeddings."""
    from wsi_ssl.storage import SlideStore
    from wsi_ssl.storage.embeddings import read_embeddings

    store = SlideStore.open(report.slides[0].store_path)
    attrs = read_embeddings(store, report.encoder_id, lazy=True).attrs
    return {
        "encoder": attrs.get("encoder", {}),
        "weights_sha256": attrs.get("weights_sha256"),
        "stain": attrs.get("stain"),
    }


def run_info(
    root: str | Path, config: MILConfig, report: MatchReport, device: torch.device, n_threads: int
) -> dict[str, Any]:
    """The provenance part of ``run.json``."""
    from wsi_ssl import __version__

    return {
        "format": RUN_FORMAT,
        "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "wsi_ssl_version": __version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "device": str(device),
        "torch_threads": n_threads,
        "config": config.to_dict(),
        "encoder_id": report.encoder_id,
        **encoder_attrs(report),
        "in_dim": report.in_dim,
        "classes": report.classes,
        "tilings": training_tilings(report),
        "root": str(Path(root).resolve()),
        "labels": report.labels_path,
    }


def write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=2))


def replaced_run_note(out: Path) -> str | None:
    """What overwriting the run at ``out`` replaces, for the report (None: no run there)."""
    try:
        created = json.loads((out / "run.json").read_text()).get("created", "?")
    except (OSError, ValueError, AttributeError):
        return None
    note = f"replaced the run at {out} (trained {created})"
    table = out / "predictions" / "predictions.csv"
    if table.is_file():
        with table.open(newline="") as f:
            n = sum(1 for _ in csv.DictReader(f))
        note += (
            f" and the {n} slide prediction(s) `wsi-ssl mil predict` had written in it "
            "(predictions/): predict them again with this run"
        )
    return note


def publish(partial: Path, out: Path) -> None:
    """Swap the complete ``partial`` directory in at ``out`` (an old run is replaced, never
    deleted first)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    replace_directory(partial, out)
