"""``EmbedConfig``: how the embedding job runs (not what the vectors are: that is the encoder's)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

from wsi_ssl.errors import ConfigError
from wsi_ssl.stain_settings import check_stain_settings

__all__ = ["DECODE_MODES", "EmbedConfig", "default_workers"]

DECODE_MODES = ("cpu", "device", "auto")
"""Where JPEG tiles are decoded (``EmbedConfig.decode``)."""


def default_workers() -> int:
    """Decoding worker processes: half the cores, 1 to 8 (1 on the 2-core CI box)."""
    return max(1, min(8, (os.cpu_count() or 2) // 2))


@dataclass(frozen=True)
class EmbedConfig:
    """Settings of an embedding job.

    Attributes:
        batch_size: tiles per forward pass (a batch never spans two slides); None (default):
            256 on the CPU, on CUDA the largest that fits the device's free memory, measured
            by a probe (:mod:`wsi_ssl.embedding.batch_size`). The size used is recorded with
            the vectors.
        device: "auto" (CUDA if present), "cpu", "cuda" or "cuda:N".
        workers: DataLoader worker processes decoding whole shards (0: decode in the main
            process; None: :func:`default_workers`).
        dtype: stored dtype, "float16" (default) or "float32".
        resume: skip slides whose embeddings for this encoder are complete.
        prefetch: batches each worker keeps ready.
        chunk_rows: rows per Zarr chunk of the output (None: about 1 MiB per chunk).
        deterministic: on CPU, also run under ``torch.use_deterministic_algorithms(True)``.
            Off by default: the CPU inference kernels are already bitwise reproducible at a
            fixed thread count (tested), and the flag only forces slower fallbacks (attention
            drops to the math kernel, about 1.8x slower).
        wait: seconds to wait for a slide whose embeddings another job is writing (or that
            is being tiled); 0 (default): report it as "busy" and go on with the others.
        check_mpp: refuse (per slide) tiles whose scale at the model input is more than 10%
            off the scales the encoder was trained at (``EncoderConfig.mpp``); False embeds
            them anyway.
        compile: run the encoder through ``torch.compile`` (worth it for long jobs on CUDA).
        stain_normalize: normalise each tile's stains before the encoder: "macenko",
            "reinhard" or "vahadane" (:mod:`wsi_ssl.stain`; blank tiles pass unchanged);
            "none": off; None (default): as the encoder was pretrained (a ``wsi-ssl pretrain``
            run that normalised its tiles: the same method and reference image), else off.
        stain_reference: the reference image file the stains are mapped to (needed with
            ``stain_normalize``).
        skip_flagged_tiles: neither read nor encode the tiles the store's QC flagged (blur,
            pen, little tissue, dark: :func:`wsi_ssl.tiling.qc.kept_tiles`, the thresholds
            the slide was tiled with); their rows stay, NaN, named by the array's
            ``not_embedded`` attribute (:mod:`wsi_ssl.storage.embeddings`). Without it, a
            slide embedded with it is completed: only its missing rows are encoded.
        decode: where JPEG tiles are decoded: "cpu" (the loader workers), "device" (the
            workers only read the stored streams, the main process decodes each batch on the
            encoder's device: nvJPEG on CUDA), "auto" (default: "device" on CUDA, else "cpu").
            Stores of other codecs are always decoded by the workers.
    """

    batch_size: int | None = None
    device: str = "auto"
    workers: int | None = None
    dtype: str = "float16"
    resume: bool = True
    prefetch: int = 4
    chunk_rows: int | None = None
    deterministic: bool = False
    wait: float = 0.0
    check_mpp: bool = True
    compile: bool = False
    stain_normalize: str | None = None
    stain_reference: str | None = None
    decode: str = "auto"
    skip_flagged_tiles: bool = False

    def __post_init__(self) -> None:
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(
                f"batch_size must be >= 1, got {self.batch_size}", parameters=("batch_size",)
            )
        if self.workers is not None and self.workers < 0:
            raise ConfigError(f"workers must be >= 0, got {self.workers}", parameters=("workers",))
        from wsi_ssl.storage.embeddings import EMBEDDING_DTYPES  # zarr: not at CLI start

        if self.dtype not in EMBEDDING_DTYPES:
            raise ConfigError(
                f"dtype must be one of {', '.join(EMBEDDING_DTYPES)}; got {self.dtype!r}",
                parameters=("dtype",),
            )
        if self.prefetch < 1:
            raise ConfigError(
                f"prefetch must be >= 1, got {self.prefetch}", parameters=("prefetch",)
            )
        if not self.wait >= 0:
            raise ConfigError(f"wait must be >= 0 seconds, got {self.wait}", parameters=("wait",))
        if self.chunk_rows is not None and self.chunk_rows < 1:
            raise ConfigError(
                f"chunk_rows must be >= 1, got {self.chunk_rows}", parameters=("chunk_rows",)
            )
        if self.stain_normalize == "none":
            if self.stain_reference is not None:
                raise ConfigError(
                    "stain_normalize 'none' takes no stain_reference",
                    parameters=("stain_normalize", "stain_reference"),
                )
        else:
            check_stain_settings(self.stain_normalize, self.stain_reference)
        if self.decode not in DECODE_MODES:
            raise ConfigError(
                f"decode must be one of {', '.join(DECODE_MODES)}; got {self.decode!r}",
                parameters=("decode",),
            )

    @property
    def n_workers(self) -> int:
        return default_workers() if self.workers is None else self.workers

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
