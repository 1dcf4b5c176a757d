"""``IndexConfig``: how a search index is built, and the parameters derived from the data size."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from wsi_ssl.errors import ConfigError
from wsi_ssl.search.kinds import KIND_NAMES, index_kind

__all__ = ["KINDS", "OPQ_CHOICES", "IndexConfig", "plan_index"]

KINDS = ("auto", *KIND_NAMES)
OPQ_CHOICES = ("auto", "on", "off")


@dataclass(frozen=True)
class IndexConfig:
    """Settings of a search index build. ``None`` fields are derived from the data size.

    Attributes:
        kind: "flat" (exact inner product), "hnsw" (graph, Malkov & Yashunin 2018), "ivfpq"
            (inverted file with product quantisation, Jégou et al. 2011, optionally with an
            OPQ rotation, Ge et al. 2013), or "auto": flat up to ``flat_max`` vectors, HNSW up to
            ``hnsw_max``, IVF-PQ beyond (HNSW keeps every vector in float32, ~1.6 KB per
            384-d vector; IVF-PQ ~1/16 of that).
        target_recall: recall@10 against exact search that the build calibrates its search
            parameter to (HNSW ``efSearch``, IVF ``nprobe``), measured on a sample of the
            indexed vectors used as queries; the value reached is recorded.
        flat_max: ``auto`` builds an exact index up to this many vectors.
        hnsw_max: ``auto`` builds HNSW up to this many vectors.
        hnsw_m: HNSW neighbours per node (None: 32).
        ef_construction: HNSW build-time beam (None: 64 up to 1M vectors, 80 beyond).
        nlist: IVF lists (None: a power of two near ``2 * sqrt(N)``, 64..65536, at most
            N / 39 so every centroid has 39 training points).
        pq_m: PQ sub-quantisers = bytes per vector (None: ``dim / 2``, rounded down to a
            divisor of ``dim``: two dimensions per 8-bit sub-quantiser, 1/8 of float32, which
            is what reaches recall@10 0.95 on 384-d embeddings without re-ranking; ``dim / 4``
            halves the memory and caps recall near 0.9, see benchmarks/search.py).
        opq: "on", "off", or "auto": when sub-vectors have at least 4 dimensions, train OPQ on
            a sample and keep it if it lowers the PQ reconstruction error by at least
            ``opq_min_gain`` (with 2-d sub-vectors a rotation has little to gain and its
            training costs minutes, so "auto" skips it).
        opq_min_gain: relative error reduction OPQ must bring under ``opq="auto"``.
        train_size: k-means sample for the IVF lists (None: ``max(40 * nlist, 32768)``, at
            most N and at most 1M); the PQ codebooks train on 16384 of it.
        calibration_queries: indexed vectors sampled as calibration queries.
        seed: seeds sampling and k-means.
    """

    kind: str = "auto"
    target_recall: float = 0.95
    flat_max: int = 200_000
    hnsw_max: int = 5_000_000
    hnsw_m: int | None = None
    ef_construction: int | None = None
    nlist: int | None = None
    pq_m: int | None = None
    opq: str = "auto"
    opq_min_gain: float = 0.05
    train_size: int | None = None
    calibration_queries: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(
                f"kind must be one of {', '.join(KINDS)}; got {self.kind!r}", parameters=("kind",)
            )
        if self.opq not in OPQ_CHOICES:
            raise ConfigError(
                f"opq must be one of {', '.join(OPQ_CHOICES)}; got {self.opq!r}",
                parameters=("opq",),
            )
        if not 0.0 < self.target_recall <= 1.0:
            raise ConfigError(
                f"target_recall must be in (0, 1], got {self.target_recall}",
                parameters=("target_recall",),
            )
        for name in ("flat_max", "hnsw_max", "calibration_queries"):
            if getattr(self, name) < 0:
                raise ConfigError(
                    f"{name} must be >= 0, got {getattr(self, name)}", parameters=(name,)
                )
        for name in ("hnsw_m", "ef_construction", "nlist", "pq_m", "train_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}", parameters=(name,))
        if not 0.0 <= self.opq_min_gain < 1.0:
            raise ConfigError(
                f"opq_min_gain must be in [0, 1), got {self.opq_min_gain}",
                parameters=("opq_min_gain",),
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **options: Any) -> IndexConfig:
        """This config with ``options`` for some fields; another name is a ``ConfigError``
        (``SearchIndex.build(..., kindd="flat")`` was a bare TypeError)."""
        fields = {f.name for f in dataclasses.fields(self)}
        if unknown := sorted(set(options) - fields):
            raise ConfigError(
                f"unknown index setting(s) {', '.join(unknown)}; IndexConfig has "
                f"{', '.join(sorted(fields))}"
            )
        return dataclasses.replace(self, **options)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IndexConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def plan_index(n: int, dim: int, config: IndexConfig) -> dict[str, Any]:
    """The kind and build parameters for ``n`` vectors of ``dim`` (recorded in the index).

    Raises:
        ConfigError: an IVF-PQ index was asked for with too few vectors to train it.
    """
    kind = config.kind
    if kind == "auto":
        kind = "flat" if n <= config.flat_max else "hnsw" if n <= config.hnsw_max else "ivfpq"
    return index_kind(kind).plan(n, dim, config)
