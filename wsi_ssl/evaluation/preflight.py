"""Before any encoder is loaded: can every task's labels be used (and does every retrieval
task's ``mmv_k`` leave some labelled slides out of the vote)? Before any embeds anything: can
every encoder take the archive's tiles?

The embed job checks each slide's tile size (:meth:`Encoder.check_input_size`) and scale
(:meth:`Encoder.check_scale`) as it reaches the slide, so an evaluation of several encoders
learnt that one cannot take the tiles only after embedding with those before it. Here the same
checks run for every encoder and slide first, reading only the stores' metadata, and the advice
is one step that satisfies both checks (a resize that would then fail the scale check is not
offered alone). Messages name each encoder as the caller gave it (its spec, then the table
label when that differs: :func:`who`), so that two runs of one architecture are told apart.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from wsi_ssl.errors import (
    ConfigError,
    InputSizeMismatchError,
    MagnificationMismatchError,
    WsiSslError,
)
from wsi_ssl.evaluation.config import EvaluationConfig

if TYPE_CHECKING:
    from wsi_ssl.encoders import Encoder
    from wsi_ssl.evaluation.tasks import Task
    from wsi_ssl.storage import Archive

__all__ = [
    "check_archives",
    "check_encoders",
    "check_labels",
    "check_mmv_k",
    "tile_problem",
    "who",
]

Tiling = tuple[int, int, float | None]  # tile height, width (px), µm/px


def _scale_off(encoder: Encoder, tile_size: int, mpp: float | None) -> bool:
    """True when tiles of ``tile_size`` px at ``mpp``, resized to the encoder's input, reach
    it at a scale it was not trained at."""
    try:
        encoder.check_scale(mpp, tile_size)
    except MagnificationMismatchError:
        return True
    return False


def who(label: str, given: Mapping[str, str] | None = None) -> str:
    """How messages name the encoder labelled ``label``: quoted, and when ``given`` holds the
    spec it was given as (a run folder, a second seed), that spec first."""
    spec = (given or {}).get(label)
    return repr(label) if spec is None or spec == label else f"{spec!r} ({label})"


def tile_problem(
    encoder: Encoder, name: str, tiling: Tiling, check_mpp: bool
) -> tuple[str, bool] | None:
    """Why ``encoder`` (``name``: as :func:`who` words it) cannot embed tiles of ``tiling``
    and the one step that fixes it, and whether that step names ``check_mpp``; None when it
    can embed them."""
    height, width, mpp = tiling
    size = encoder.input_size
    try:
        encoder.check_input_size(height, width)
    except InputSizeMismatchError:
        text = (
            f"InputSizeMismatchError: tiles are {height} px but encoder {name} takes {size} "
            "px and its config says resize='never'"
        )
        if not (check_mpp and _scale_off(encoder, height, mpp)):
            return f"{text}; give the encoder as NAME,resize=bilinear", False
        seen = float(mpp or 0) * height / size
        trained = " or ".join(f"{m:g}" for m in encoder.config.mpp)
        best = min(encoder.config.mpp, key=lambda m: abs(seen - m))
        return (
            f"{text}, and resized they would reach it at {seen:.3g} µm/px, not the {trained} "
            f"µm/px it was trained at; re-tile with tile_size={size} and mpp={best:g} (its "
            "input size and scale), or give the encoder as NAME,resize=bilinear and pass "
            f"check_mpp=False to embed at {seen:.3g} µm/px anyway"
        ), True
    if not check_mpp:
        return None
    try:
        encoder.check_scale(mpp, height, f"encoder {name}")
    except MagnificationMismatchError as err:
        return f"MagnificationMismatchError: {err}", True
    return None


def _tilings(archive: Archive, slides: Sequence[str]) -> dict[str, Tiling]:
    """Each readable store's tile size and µm/px (the embed job reports the others)."""
    out: dict[str, Tiling] = {}
    for sid in slides:
        try:
            store = archive.slide(sid)
            shape = store.tiles.shape
            mpp = store.tiling.get("mpp")
            out[sid] = (int(shape[1]), int(shape[2]), None if mpp is None else float(mpp))
        except (WsiSslError, OSError, KeyError, ValueError):
            continue
    return out


def check_encoders(
    root: Path,
    encoders: Sequence[tuple[str, Encoder]],
    slides: Sequence[str],
    config: EvaluationConfig,
    given: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """``{slide id: why}`` of the slides some encoder cannot take (to leave out for every
    encoder), checked for every encoder before any embeds; ``given``: label -> the spec it
    was given as (see :func:`who`).

    Raises:
        ConfigError: an encoder can take none of ``slides``; the message says the one step
            that fixes it (re-tile, resize, or ``check_mpp=False``).
    """
    from wsi_ssl.storage import open_store

    tilings = _tilings(open_store(root), slides)
    failed: dict[str, str] = {}
    for label, encoder in encoders:
        name = who(label, given)
        problems = {
            t: tile_problem(encoder, name, t, config.check_mpp) for t in {*tilings.values()}
        }
        bad = {sid: p for sid, t in tilings.items() if (p := problems[t]) is not None}
        if bad and len(bad) == len(tilings):
            (text, scale), _ = Counter(bad.values()).most_common(1)[0]
            spec = (given or {}).get(label, label)
            raise ConfigError(
                f"{root}: encoder {spec!r} can take none of the {len(bad)} slide(s) to "
                f"evaluate (checked before embedding any): {text}",
                parameters=("check_mpp",) if scale else (),
            )
        for sid, (text, _) in bad.items():
            failed.setdefault(sid, text)
    return failed


def check_archives(
    tasks: Sequence[Task],
    encoders: Sequence[tuple[str, Encoder]],
    config: EvaluationConfig,
    given: Mapping[str, str] | None = None,
) -> None:
    """Refuse, before any task runs, an encoder that can take no complete slide of an
    archive task's root (slides are read until every encoder has one it can take)."""
    from wsi_ssl.evaluation.tasks import PatchTask
    from wsi_ssl.storage import open_store

    for root in sorted({Path(t.root) for t in tasks if not isinstance(t, PatchTask)}):
        archive = open_store(root)
        pending = list(encoders)
        for sid in archive.slide_ids:  # one store at a time: usually the first will do
            tiling = _tilings(archive, [sid]).get(sid)
            if tiling is None:
                continue
            pending = [
                (label, e)
                for label, e in pending
                if tile_problem(e, who(label, given), tiling, config.check_mpp) is not None
            ]
            if not pending:
                break
        if pending:  # says why, naming the encoder
            check_encoders(root, pending, archive.slide_ids, config, given)


def check_mmv_k(
    n: int, patients: Mapping[str, str] | None, config: EvaluationConfig, labels: Path
) -> None:
    """Refuse an ``mmv_k`` that lets every slide left to some query of ``n`` labelled slides
    vote (the vote would ignore similarity)."""
    from wsi_ssl.mil.retrieval import largest_voting_k

    largest = max(Counter(patients.values()).values()) if patients else 1
    others = n - largest
    most = largest_voting_k(others)
    if config.mmv_k > most:
        way = "leave-one-patient-out" if patients else "leave-one-slide-out"
        raise ConfigError(
            f"mmv_k={config.mmv_k} lets all {others} other labelled slides of {labels} vote in "
            f"mMV@k ({way}), so the vote ignores similarity; choose mmv_k <= {max(1, most)}",
            parameters=("mmv_k",),
        )


def check_labels(tasks: Sequence[Task], config: EvaluationConfig) -> None:
    """Refuse, before any encoder is loaded, a task whose labels cannot be used: a bad labels
    or regions CSV, an image folder of one class, per-tile labels no store holds, labelled
    slides matching no store, or too few of them for ``mmv_k`` (images are not read yet)."""
    from wsi_ssl.evaluation.regions import read_regions
    from wsi_ssl.evaluation.retrieval import patients_of
    from wsi_ssl.evaluation.tasks import (
        PatchTask,
        RegionLabelTask,
        RetrievalTask,
        TileLabelTask,
        check_tile_labels,
        image_items,
        load_slide_labels,
    )

    for task in tasks:
        if isinstance(task, PatchTask):
            image_items(task.source)
        elif isinstance(task, TileLabelTask):
            check_tile_labels(task)
        elif isinstance(task, RegionLabelTask):
            read_regions(task.regions)
        else:
            rows = load_slide_labels(task.root, task.labels).table.rows
            if isinstance(task, RetrievalTask):
                check_mmv_k(len(rows), patients_of(rows), config, task.labels)
