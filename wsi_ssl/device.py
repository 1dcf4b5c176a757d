"""One device resolver for every stage: encoders and embedding (``Encoder.to``, ``--devices``),
pretraining (``local_rank`` under torchrun) and MIL."""

from __future__ import annotations

from typing import TYPE_CHECKING

from wsi_ssl.errors import ConfigError, DeviceUnavailableError

if TYPE_CHECKING:
    import torch

__all__ = ["resolve_device"]


def resolve_device(device: str | torch.device | None, local_rank: int = 0) -> torch.device:
    """A torch device: "auto"/None is CUDA when present (``cuda:<local_rank mod count>``), else
    CPU; "cuda" is CUDA device ``local_rank`` mod count; an absent or unknown device is an error.

    Raises:
        DeviceUnavailableError: CUDA asked for but not there (or no such CUDA index).
        ConfigError: not a device torch knows, or neither cpu nor cuda.
    """
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device is None or str(device) == "auto":
        return torch.device("cuda", local_rank % count) if count else torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise ConfigError(f"device {device!r}: {err}; use auto, cpu, cuda or cuda:N") from err
    if dev.type == "cuda" and not count:
        raise DeviceUnavailableError(
            f"device {device!r} requested but CUDA is not available here (torch "
            f"{torch.__version__}, CUDA build: {torch.version.cuda or 'none'}); use device "
            "'cpu' or 'auto'"
        )
    if dev.type == "cuda" and dev.index is None:
        return torch.device("cuda", local_rank % count)
    if dev.type == "cuda" and dev.index is not None and dev.index >= count:
        raise DeviceUnavailableError(
            f"device {device!r}: only {count} CUDA device(s); pick another"
        )
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {device!r}: only cpu and cuda are supported")
    return dev
