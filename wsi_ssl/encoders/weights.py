"""Local weights: where they live, their hashes, and loading a state dict strictly.

wsi-ssl never downloads weights. A named encoder that needs weights looks for
``$WSI_SSL_WEIGHTS/<name>.pth`` (default ``~/.cache/wsi-ssl/weights/<name>.pth``) unless a path
is given (``--weights PATH``); a missing file is a :class:`WeightsNotFoundError` naming where to
put it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wsi_ssl.errors import CheckpointError, WeightsNotFoundError

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = [
    "WEIGHTS_ENV",
    "default_weights_path",
    "file_sha256",
    "load_state_dict_file",
    "load_weights",
    "state_dict_sha256",
    "weights_dir",
]

WEIGHTS_ENV = "WSI_SSL_WEIGHTS"
WEIGHT_SUFFIXES = (".pth", ".pt", ".safetensors", ".bin")
# Classification heads dropped by the encoders (they output pooled features).
HEAD_PREFIXES = ("fc.", "head.", "heads.", "classifier.", "head_dist.")


def weights_dir() -> Path:
    """``$WSI_SSL_WEIGHTS`` or ``~/.cache/wsi-ssl/weights``."""
    env = os.environ.get(WEIGHTS_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "wsi-ssl" / "weights"


def default_weights_path(name: str) -> Path:
    """The first existing ``<weights_dir>/<name><suffix>``, else the ``.pth`` path to create."""
    base = weights_dir()
    for suffix in WEIGHT_SUFFIXES:
        if (base / f"{name}{suffix}").is_file():
            return base / f"{name}{suffix}"
    return base / f"{name}.pth"


def file_sha256(path: str | Path, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def state_dict_sha256(state: Mapping[str, torch.Tensor] | nn.Module) -> str:
    """sha256 over sorted (name, dtype, shape, bytes) of every tensor in a state dict."""
    import torch

    if isinstance(state, torch.nn.Module):
        state = state.state_dict()
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a ``.pth``/``.pt``/``.bin`` (``torch.load(weights_only=True)``) or
    ``.safetensors`` file; unwraps ``{"state_dict": ...}`` / ``{"model": ...}`` and a
    ``module.`` prefix."""
    import torch

    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a bad file
        raise CheckpointError(
            f"{path}: cannot read a state dict ({type(err).__name__}: {err}); save one with "
            "torch.save(model.state_dict(), PATH)"
        ) from err
    for key in ("state_dict", "model", "teacher", "module"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    if all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def _short(keys: Iterable[str], n: int = 5) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def load_weights(model: nn.Module, path: str | Path, *, encoder: str) -> None:
    """Load a local weights file into ``model`` strictly, ignoring classifier-head tensors.

    Raises:
        WeightsNotFoundError: no file at ``path`` (the message says where to put it).
        CheckpointError: unreadable file, or keys/shapes for another architecture.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsNotFoundError(encoder, path)
    state = load_state_dict_file(path)
    own = model.state_dict()
    state = {k: v for k, v in state.items() if k in own or not k.startswith(HEAD_PREFIXES)}
    missing = set(own) - set(state)
    unexpected = set(state) - set(own)
    wrong = {k for k in set(own) & set(state) if own[k].shape != state[k].shape}
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {_short(missing)}")
        if unexpected:
            parts.append(f"unexpected {_short(unexpected)}")
        if wrong:
            parts.append(f"wrong shape {_short(wrong)}")
        raise CheckpointError(
            f"{path}: weights do not fit encoder {encoder!r} ({'; '.join(parts)}); "
            "check the file is for this architecture"
        )
    model.load_state_dict(state, strict=True)
