"""Checkpoints: tensors plus JSON-able metadata, written atomically, read without unpickling.

A checkpoint is a ``torch.save`` file of a dict that holds only tensors, numbers, strings,
lists, dicts and None, so it loads with ``torch.load(weights_only=True)``: no arbitrary
object is ever unpickled. Two kinds:

``"wsi_ssl.dino"`` (``<run>/checkpoints/step_XXXXXXXX.pt``), everything a run needs to
continue exactly::

    format, format_version
    meta        {wsi_ssl_version, torch_version, config (PretrainConfig.to_dict()),
                 sources (the slides trained on), step, epoch, total_steps, steps_per_epoch,
                 world_size, global_batch, encoder (see wsi_ssl.ssl.encoder), created}
    student     state dict (backbone.* and head.*)
    teacher     state dict
    optimizer   AdamW state dict
    scaler      GradScaler state dict (fp16) or None
    center      the DINO loss centre (1, 1, K)
    rng         {torch, cuda: [...], numpy: {...}, python: {...}} generator states
    window_loss sum of the losses since the last metrics row (meta.window_steps of them)
    window_parts  the same sum of each loss term, over meta.window_part_steps steps (absent
                  in checkpoints from before)

``"wsi_ssl.encoder"`` (``<run>/encoder.pt``): ``format``, ``format_version``, ``meta`` and
``teacher_backbone`` only, for :func:`wsi_ssl.ssl.load_encoder`.

Files are written with ``wsi_ssl.storage.atomic`` (a temporary name beside the target that
carries the pid and host, fsync, rename, directory fsync), so a killed job never leaves a
half-written checkpoint under the final name; the temp files of killed runs are removed by the
next save in that folder. Anything that does not load, or loads but is not one of the two formats, is a
:class:`~wsi_ssl.errors.CheckpointError`.
"""

from __future__ import annotations

import json
import pickle
import random
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from wsi_ssl.errors import CheckpointError
from wsi_ssl.storage.atomic import atomic_write_with, sweep_temp_files

__all__ = [
    "ENCODER_FORMAT",
    "FORMAT_VERSION",
    "RUN_FORMAT",
    "capture_rng",
    "checkpoint_paths",
    "latest_checkpoint",
    "load_checkpoint",
    "restore_rng",
    "save_checkpoint",
]

RUN_FORMAT = "wsi_ssl.dino"
ENCODER_FORMAT = "wsi_ssl.encoder"
FORMAT_VERSION = 1
_REQUIRED = {
    RUN_FORMAT: ("meta", "student", "teacher", "optimizer", "center", "rng", "window_loss"),
    ENCODER_FORMAT: ("meta", "teacher_backbone"),
}
_STEP_FILE = re.compile(r"^step_(\d{8})\.pt$")


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` atomically to ``path``; ``meta`` must be JSON-able."""
    path = Path(path)
    try:  # plain JSON types only (a str subclass such as torch.__version__ would be pickled)
        payload = {**payload, "meta": json.loads(json.dumps(payload.get("meta", {})))}
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: checkpoint metadata is not JSON-able ({err})") from err
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_temp_files(path.parent)  # checkpoint-sized leftovers of killed runs
    return atomic_write_with(path, lambda tmp: torch.save(payload, tmp))


def load_checkpoint(
    path: str | Path, *, kind: str | None = None, arch: str | None = None
) -> dict[str, Any]:
    """Load and check a checkpoint (tensors on the CPU).

    Args:
        path: the checkpoint file.
        kind: require this format (``RUN_FORMAT`` or ``ENCODER_FORMAT``); None accepts both.
        arch: require a checkpoint of this backbone architecture.

    Raises:
        CheckpointError: missing, truncated or corrupt file, not a wsi-ssl checkpoint, a
            newer format version, another architecture, or objects other than tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4" on foreign files
            warnings.simplefilter("ignore", UserWarning)
            data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        detail = _weights_only_detail(str(err))
        if "Unsupported global" in detail:
            raise CheckpointError(
                f"{path}: holds objects other than tensors and plain data; refusing to unpickle "
                f"it (only wsi-ssl checkpoints load here): {detail}"
            ) from err
        raise CheckpointError(
            f"{path}: not a readable checkpoint, truncated or corrupt ({detail}); use an "
            "earlier checkpoint of the run or start again"
        ) from err
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError) as err:
        raise CheckpointError(
            f"{path}: not a readable checkpoint, truncated or corrupt "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
            "use an earlier checkpoint of the run or start again"
        ) from err
    fmt = data.get("format") if isinstance(data, dict) else None
    if fmt not in _REQUIRED:
        raise CheckpointError(
            f"{path}: not a wsi-ssl checkpoint (format {fmt!r}; expected {RUN_FORMAT!r} or "
            f"{ENCODER_FORMAT!r})"
        )
    if kind is not None and fmt != kind:
        raise CheckpointError(
            f"{path}: a {fmt!r} file, but a {kind!r} checkpoint is needed here"
            + ("; pass the run's checkpoints/step_*.pt" if kind == RUN_FORMAT else "")
        )
    version = data.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {version!r}; this wsi-ssl reads up to "
            f"{FORMAT_VERSION}, upgrade wsi-ssl"
        )
    missing = [k for k in _REQUIRED[fmt] if k not in data]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {missing}; the file is damaged")
    have = checkpoint_arch(data)
    if have is None:
        raise CheckpointError(f"{path}: checkpoint metadata names no architecture")
    if arch is not None and have != arch:
        raise CheckpointError(
            f"{path}: checkpoint is for arch {have!r}, not {arch!r}; set arch={have!r} or "
            "use a checkpoint of that architecture",
            parameters=("arch",),
        )
    return data


def _weights_only_detail(message: str) -> str:
    """The informative line of torch's long weights-only refusal message."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if "WeightsUnpickler error" in line:
            rest = line.split("WeightsUnpickler error:", 1)[1].strip()
            if rest:
                return rest.split(". Please use")[0]
            return lines[i + 1] if i + 1 < len(lines) else line
    return lines[0] if lines else "unpickling refused"


def checkpoint_arch(data: dict[str, Any]) -> str | None:
    meta = data.get("meta")
    if not isinstance(meta, dict):
        return None
    config = meta.get("config")
    arch = config.get("arch") if isinstance(config, dict) else None
    return arch if isinstance(arch, str) else None


def checkpoint_paths(run_dir: str | Path) -> list[Path]:
    """The run's step checkpoints, oldest first."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP_FILE.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    paths = checkpoint_paths(run_dir)
    return paths[-1] if paths else None


def step_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:08d}.pt"


# -- random generator states as tensors and plain data ------------------------------------
def capture_rng() -> dict[str, Any]:
    """torch (CPU and CUDA), numpy and ``random`` states, storable with weights_only."""
    # numpy's stubs give the no-argument call the dict type; the legacy MT19937 global state
    # it returns (legacy=True is the default) is this tuple
    np_state = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state())
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {
            "version": int(py_state[0]),
            "state": torch.tensor(py_state[1], dtype=torch.int64),
            "gauss": py_state[2],
        },
    }


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            n["keys"].numpy().astype(np.uint32),
            n["pos"],
            n["has_gauss"],
            n["cached_gaussian"],
        )
    )
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss"]))
