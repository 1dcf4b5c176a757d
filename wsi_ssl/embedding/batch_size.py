"""The batch size an embedding job uses when none is given (``EmbedConfig.batch_size=None``).

On the CPU: :data:`CPU_BATCH_SIZE`, the long-standing default (throughput on a CPU hardly
depends on it). On CUDA: a batch that fills the device, measured, not guessed: a probe runs the
encoder (its precision, autocast, channels-last) on ``PROBE_BATCH`` random tiles and reads the
peak memory the forward pass took per tile; the batch is the largest power of two whose peak,
plus the model already resident, stays within :data:`MEMORY_FRACTION` of the memory free on the
device, clamped to [:data:`MIN_BATCH`, :data:`MAX_BATCH`]. The rule itself
(:func:`batch_for_memory`) is a pure function, tested on the CPU; the probe is ``gpu``-tested.
A probe that itself runs out of memory raises :class:`~wsi_ssl.errors.DeviceOutOfMemoryError`
naming ``batch_size`` (a smaller batch skips the probe).
"""

from __future__ import annotations

import torch

from wsi_ssl.encoders import Encoder
from wsi_ssl.errors import DeviceOutOfMemoryError

__all__ = [
    "CPU_BATCH_SIZE",
    "MAX_BATCH",
    "MEMORY_FRACTION",
    "MIN_BATCH",
    "PROBE_BATCH",
    "auto_batch_size",
    "batch_for_memory",
    "probe_forward",
]

CPU_BATCH_SIZE = 256
MIN_BATCH = 8
MAX_BATCH = 2048
PROBE_BATCH = 16
MEMORY_FRACTION = 0.7
"""Of the free device memory: the rest is headroom for the allocator's fragmentation, the
decoded uint8 batches in flight and other processes' growth."""


def batch_for_memory(free_bytes: int, bytes_per_tile: float) -> int:
    """The largest power of two ``b`` with ``b * bytes_per_tile <= MEMORY_FRACTION * free``,
    clamped to [MIN_BATCH, MAX_BATCH]."""
    budget = MEMORY_FRACTION * free_bytes
    if bytes_per_tile <= 0:
        return MAX_BATCH
    batch = MIN_BATCH
    while batch * 2 <= MAX_BATCH and batch * 2 * bytes_per_tile <= budget:
        batch *= 2
    return batch


def probe_forward(encoder: Encoder) -> None:
    """One forward pass of :data:`PROBE_BATCH` random tiles through ``encoder`` on its device.

    Raises:
        DeviceOutOfMemoryError: the device cannot hold even the probe; the message asks for
            a ``batch_size`` below it (which skips the probe) or a lower ``precision``.
    """
    size = encoder.input_size
    try:
        tiles = torch.randint(
            0, 256, (PROBE_BATCH, size, size, 3), dtype=torch.uint8, device=encoder.device
        )
        encoder(tiles)
    except torch.OutOfMemoryError as err:
        raise DeviceOutOfMemoryError(
            f"{encoder.device}: encoder {encoder.config.name!r} runs out of memory on the "
            f"{PROBE_BATCH} tiles that measure the batch size{_memory_text(encoder.device)}; "
            f"pass batch_size={MIN_BATCH} or smaller, or precision='bf16', or free memory on "
            "the device",
            parameters=("batch_size", "precision"),
        ) from err


def _memory_text(device: torch.device) -> str:
    """`` (N GiB free of M GiB)`` for a CUDA device, else nothing."""
    if device.type != "cuda":
        return ""
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    return f" ({free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB)"


def _probe_bytes_per_tile(encoder: Encoder) -> float:
    """Peak CUDA memory one tile takes through the encoder's forward pass (measured)."""
    device = encoder.device
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    probe_forward(encoder)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    torch.cuda.empty_cache()
    return peak / PROBE_BATCH


def auto_batch_size(encoder: Encoder) -> int:
    """The batch size for ``encoder`` on its device (see the module docstring)."""
    if encoder.device.type != "cuda":
        return CPU_BATCH_SIZE
    per_tile = _probe_bytes_per_tile(encoder)
    free, _ = torch.cuda.mem_get_info(encoder.device)
    return batch_for_memory(free, per_tile)
