"""Local weights: where they live, their hashes, and loading a state dict strictly.

wsi-ssl never downloads weights. A named encoder that needs weights looks for
``$WSI_SSL_WEIGHTS/<name>.pth`` (default ``~/.cache/wsi-ssl/weights/<name>.pth``) unless a path
is given (``--weights PATH``); a missing file is a :class:`WeightsNotFoundError` naming where to
put it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wsi_ssl.errors import (
    CheckpointError,
    PickleCheckpointError,
    TruncatedWeightsError,
    WeightsMismatchError,
    WeightsNotFoundError,
)
from wsi_ssl.listing import first_few

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = [
    "CONVERT_PICKLE",
    "WEIGHTS_ENV",
    "Convert",
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


def _safetensors_end(path: Path) -> int:
    """The byte length a ``.safetensors`` file must have, from its own header."""
    import json
    import struct

    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return 8
        (n,) = struct.unpack("<Q", head)
        if n > path.stat().st_size:
            return 8 + n
        header = json.loads(f.read(n))
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    return 8 + n + max(ends, default=0)


CONVERT_PICKLE = (
    "python -c \"import torch, safetensors.torch as st; m = torch.load('{src}', "
    "weights_only=False, map_location='cpu'); m = m.state_dict() if hasattr(m, 'state_dict') "
    "else m; st.save_file({{k: v.contiguous() for k, v in m.items()}}, '{dst}')\""
)


_SAFETENSORS_MAX_HEADER = 100_000_000  # safetensors refuses larger headers


def _sniff(path: Path) -> str:
    """What a file holds, from its first bytes, whatever its name: ``safetensors``, ``zip``
    (``torch.save``), ``pickle`` (legacy ``torch.save``), ``html``, ``lfs`` (a Git LFS
    pointer), ``text``, ``empty``, or ``""`` (none of these)."""
    import struct

    with path.open("rb") as f:
        head = f.read(512)
    if not head:
        return "empty"
    if len(head) > 8 and head[8:9] == b"{":
        (n,) = struct.unpack("<Q", head[:8])
        if 2 <= n <= _SAFETENSORS_MAX_HEADER:
            return "safetensors"
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head[0] == 0x80:  # pickle protocol 2+
        return "pickle"
    if not all(b >= 0x20 or b in b"\t\n\r\f" for b in head):
        return ""
    text = head.removeprefix(b"\xef\xbb\xbf").lstrip()
    if text.startswith(b"<"):
        return "html"
    return "lfs" if text.startswith(b"version https://git-lfs") else "text"


def _not_weights(path: Path, kind: str) -> CheckpointError:
    """The refusal for a text file where weights were expected."""
    with path.open("rb") as f:
        start = " ".join(f.read(60).decode("utf-8", "replace").split())
    head = f"{path}: cannot read a state dict: it is"
    if kind == "lfs":
        return CheckpointError(
            f"{head} a Git LFS pointer, not the weights; fetch the file itself (git lfs pull "
            "in the cloned model repository, or download it from the model card)"
        )
    if kind == "html":
        why = "a download that needs a login or the licence accepted on the model card saves this"
    else:
        why = "if it was downloaded, the download likely needed a login or the licence accepted "
        why += "on the model card"
    return CheckpointError(
        f"{head} {'a web page (HTML)' if kind == 'html' else 'a text file'}, not weights (it "
        f"starts {start!r}); {why}: accept it there, log in and download the file again"
    )


def _torch_reason(err: Exception) -> str:
    """torch's reason for a failed load in one line, without its advice to unpickle."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for line in lines:
        if line.startswith("WeightsUnpickler error:"):
            return line.removeprefix("WeightsUnpickler error:").strip()
    if not lines:
        return type(err).__name__
    return lines[0].split(".")[0] if "weights_only" in lines[0] else lines[0]


def _read(path: Path) -> Any:
    """The object in ``path``, read by its content (a safetensors file named ``.bin`` is
    read as safetensors)."""
    import pickle

    import torch

    kind = _sniff(path)
    if kind in ("html", "lfs", "text"):
        raise _not_weights(path, kind)
    if kind == "empty":
        raise TruncatedWeightsError(f"{path}: empty file (0 bytes); download or copy it again")
    if kind == "safetensors" or (not kind and path.suffix == ".safetensors"):
        from safetensors.torch import load_file

        size, need = path.stat().st_size, _safetensors_end(path)
        if size < need:
            raise TruncatedWeightsError(
                f"{path}: truncated safetensors file ({size} bytes, its header needs {need}); "
                "download or copy it again"
            )
        return load_file(str(path))
    try:  # an open file: torch reads a path named .safetensors as safetensors
        with path.open("rb") as f:
            return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" not in str(err):  # not pickled objects: a damaged file
            raise CheckpointError(_unreadable(path, kind, err)) from err
        dst = path.with_suffix(".safetensors")
        raise PickleCheckpointError(
            f"{path}: this checkpoint holds pickled Python objects, not just tensors, and is "
            "refused (unpickling can run code); if you trust the file, convert it once with: "
            + CONVERT_PICKLE.format(src=path, dst=dst)
        ) from err
    except Exception as err:  # torch raises many types for a bad file
        raise CheckpointError(_unreadable(path, kind, err)) from err


def _unreadable(path: Path, kind: str, err: Exception) -> str:
    if not kind:
        with path.open("rb") as f:
            start = f.read(8)
        return (
            f"{path}: cannot read a state dict: neither safetensors nor torch.save output (it "
            f"starts {start!r}); check the file, or download or copy it again"
        )
    return (
        f"{path}: cannot read a state dict from this torch.save file ({type(err).__name__}: "
        f"{_torch_reason(err)}); download or copy it again, or save a state dict with "
        "torch.save(model.state_dict(), PATH)"
    )


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a ``torch.save`` (read with ``weights_only=True``) or safetensors file,
    whatever its suffix (the first bytes say which); unwraps ``{"state_dict": ...}`` /
    ``{"model": ...}`` and a ``module.`` prefix.

    Raises:
        TruncatedWeightsError: an empty file, or a safetensors file shorter than its header.
        PickleCheckpointError: a file that only loads by unpickling arbitrary objects.
        CheckpointError: a web page or other text file (an HTML login page saved by a download
            that needed one), any other unreadable file, or not a dict of tensors.
    """
    import torch

    path = Path(path)
    try:
        state: Any = _read(path)
    except CheckpointError:
        raise
    except Exception as err:  # torch and safetensors raise many types for a bad file
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
    return first_few(sorted(keys), n)


Convert = Callable[[dict[str, "torch.Tensor"], "nn.Module"], dict[str, "torch.Tensor"]]


def load_weights(
    model: nn.Module, path: str | Path, *, encoder: str, convert: Convert | None = None
) -> None:
    """Load a local weights file into ``model`` strictly, ignoring classifier-head tensors.

    ``convert(state, model)`` maps a published layout (e.g. Hugging Face ``transformers``
    names) onto the module's own names first.

    Raises:
        WeightsNotFoundError: no file at ``path`` (the message says where to put it).
        WeightsMismatchError: keys or shapes for another architecture (listed).
        CheckpointError: an unreadable, truncated or pickle-only file.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsNotFoundError(encoder, path)
    state = load_state_dict_file(path)
    if convert is not None:
        state = convert(state, model)
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
            shapes = {k: f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in wrong}
            parts.append(f"wrong shape {_short(shapes.values(), 3)}")
        raise WeightsMismatchError(
            f"{path}: weights do not fit encoder {encoder!r} ({'; '.join(parts)}); "
            "check the file is for this architecture"
        )
    meta = any(t.is_meta for t in own.values())
    if meta:  # built on the meta device: take the file's tensors, in the module's dtypes
        state = {k: v.to(own[k].dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=meta)
