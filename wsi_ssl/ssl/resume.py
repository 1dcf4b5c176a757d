"""Continuing a pretraining run from its newest checkpoint.

:func:`open_checkpoint` finds and reads it (a directory holding a run is refused unless
``resume``), :func:`merge_resumed` keeps the checkpoint's training settings (only the runtime
fields may change), and :func:`check_same_run` refuses other tiles or another global batch,
so that a resumed run computes exactly what an uninterrupted one would.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from wsi_ssl.errors import CheckpointError, ConfigError
from wsi_ssl.listing import first_few
from wsi_ssl.ssl.checkpoint import RUN_FORMAT, latest_checkpoint, load_checkpoint
from wsi_ssl.ssl.config import RUNTIME_FIELDS, PretrainConfig

__all__ = [
    "absolute_paths",
    "check_same_run",
    "merge_resumed",
    "open_checkpoint",
    "recorded_config",
    "resumed_config",
]


def open_checkpoint(
    out: Path, config: PretrainConfig | None, resume: bool
) -> tuple[Path | None, dict[str, Any] | None]:
    """``(path, contents)`` of the newest checkpoint in ``out`` (``(None, None)``: none).

    Raises:
        ConfigError: ``out`` holds a run and ``resume`` is false.
        CheckpointError: unreadable, or for another architecture than ``config``'s.
    """
    path = latest_checkpoint(out)
    if path is None:
        return None, None
    if not resume:
        raise ConfigError(
            f"{out}: already holds a run (newest checkpoint {path.name}); pass resume=True to "
            "continue it or choose another out",
            parameters=("resume", "out"),
        )
    data = load_checkpoint(path, kind=RUN_FORMAT, arch=None if config is None else config.arch)
    return path, data


def resumed_config(out: str | Path, arch: str | None = None) -> PretrainConfig | None:
    """The config of the run in ``out``: its newest checkpoint's, or, stopped before its
    first checkpoint, the one its ``config.json`` records; None when it has neither.

    Raises:
        CheckpointError: unreadable, or for another architecture than ``arch``.
    """
    path = latest_checkpoint(Path(out))
    if path is None:
        return recorded_config(Path(out))
    return PretrainConfig.from_dict(
        load_checkpoint(path, kind=RUN_FORMAT, arch=arch)["meta"]["config"]
    )


def recorded_config(out: Path) -> PretrainConfig | None:
    """The config ``out/config.json`` records (written when a run starts), or None.

    Raises:
        CheckpointError: the file is there but unreadable.
    """
    path = out / "config.json"
    if not path.is_file():
        return None
    try:
        return PretrainConfig.from_dict(json.loads(path.read_text())["config"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(
            f"{path}: cannot read the run's settings ({type(err).__name__}: {err}); start a new "
            "run with another out"
        ) from err


_FILE_FIELDS = ("curation", "init_weights", "stain_reference")


def absolute_paths(config: PretrainConfig) -> PretrainConfig:
    """``config`` with the files it reads as absolute paths (``curation``, ``init_weights``,
    ``stain_reference`` and an ``init`` that is a previous run), as the run records them: a
    resume from another working folder finds them."""
    from wsi_ssl.ssl.init import RUN_PREFIX, init_is_run

    changes = {
        name: _absolute(value)
        for name in _FILE_FIELDS
        if (value := getattr(config, name)) is not None
    }
    if config.init is not None and init_is_run(config.init):
        prefix = RUN_PREFIX if config.init.startswith(RUN_PREFIX) else ""
        changes["init"] = prefix + _absolute(config.init.removeprefix(RUN_PREFIX))
    changed = {k: v for k, v in changes.items() if v != getattr(config, k)}
    return config.replace(**changed) if changed else config


def _absolute(path: str) -> str:
    return str(Path(path).expanduser().resolve())


def merge_resumed(
    saved: PretrainConfig, given: PretrainConfig | None, path: Path | None
) -> PretrainConfig:
    """The checkpoint's config, with the runtime fields of ``given`` (others must agree)."""
    if given is None:
        return saved
    # a run recorded before its files were made absolute compares as they resolve here
    a, b = absolute_paths(saved).training_key(), absolute_paths(given).training_key()
    diff = {k: (a[k], b[k]) for k in a if a[k] != b[k]}
    if diff:
        changed = sorted(diff)[:6]
        shown = ", ".join(f"{k}: {diff[k][0]!r} -> {diff[k][1]!r}" for k in changed)
        raise ConfigError(
            f"{path}: resuming with other training settings than the checkpoint's ({shown}); "
            f"only {', '.join(sorted(RUNTIME_FIELDS))} may change; resume with the run's own "
            "settings, or start a new run with another out",
            parameters=(*changed, "out"),  # the CLI names their flags
        )
    return given


def check_same_run(
    meta: dict[str, Any], sources: dict[str, Any], global_batch: int, path: Path | None
) -> None:
    """Refuse to resume on other tiles or with another global batch than the checkpoint's."""
    saved = {s["slide_id"]: s["n_tiles"] for s in meta["sources"]["slides"]}
    now = {s["slide_id"]: s["n_tiles"] for s in sources["slides"]}
    if saved != now:
        changes = {
            "added": sorted(now.keys() - saved.keys()),
            "gone": sorted(saved.keys() - now.keys()),
            "with other tiles": sorted(i for i in saved.keys() & now.keys() if saved[i] != now[i]),
        }
        listed = "; ".join(f"{what}: {first_few(ids)}" for what, ids in changes.items() if ids)
        raise CheckpointError(
            f"{path}: the run trained on {len(saved)} slides / {meta['sources']['n_tiles']} "
            f"tiles, but the stores now hold {len(now)} / {sources['n_tiles']} ({listed}); "
            "resume needs the same tiles, start a new run with another out",
            parameters=("out",),
        )
    before, selected = meta["sources"].get("selected_sha256"), sources.get("selected_sha256")
    if before and selected and before != selected:
        raise CheckpointError(
            f"{path}: the run trained on {meta['sources']['n_selected']} selected tiles, the "
            f"selection now gives {sources['n_selected']} (other ones: its curation file, the QC "
            "flags or the tissue thresholds changed); resume needs the same tiles, start a new "
            "run with another out",
            parameters=("out",),
        )
    if meta["global_batch"] != global_batch:
        raise ConfigError(
            f"{path}: the run used a global batch of {meta['global_batch']}, now "
            f"{global_batch} (batch size x processes); resume with the same number of "
            "processes"
        )
