"""Clustered synthetic embedding vectors for tests and benchmarks (no slides needed).

A mixture of Gaussians whose components are low-rank: component ``c`` has a random centre
``mu_c`` and a random orthonormal basis ``B_c`` of ``intrinsic_dim`` directions, and a vector is
``mu_c + B_c z * spread + e * noise`` with ``z ~ N(0, I)`` and isotropic noise ``e``, then
L2-normalised. Real encoder embeddings behave like this (many tissue types, each spread along
a few directions: an intrinsic dimension of a few tens in a 384-d space), which is what makes
approximate nearest-neighbour search both useful and hard: an isotropic 384-d Gaussian would
have all neighbours nearly equidistant, and well separated points would make it trivial.

Generation is chunked and seeded per chunk, so ``10M x 384`` vectors can be streamed without
holding them all, and the same ``(seed, start, stop)`` always gives the same rows.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

__all__ = ["ClusteredVectors"]


@dataclass(frozen=True)
class ClusteredVectors:
    """A reproducible mixture of low-rank Gaussians, projected onto the unit sphere.

    Attributes:
        dim: vector length.
        n_clusters: mixture components (tissue "types").
        intrinsic_dim: directions each component spreads along.
        spread: standard deviation along those directions (relative to a unit-norm centre).
        noise: total norm of the isotropic noise added to every vector.
        seed: seeds the centres, bases and every chunk.
    """

    dim: int = 384
    n_clusters: int = 1024
    intrinsic_dim: int = 24
    spread: float = 0.1
    noise: float = 0.1
    seed: int = 0

    def _params(self) -> tuple[np.ndarray, np.ndarray]:
        cached = getattr(self, "_cache", None)
        if cached is not None:
            return cached
        rng = np.random.default_rng([self.seed, 0])
        centres = rng.standard_normal((self.n_clusters, self.dim), dtype=np.float32)
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
        # one random basis per component: Gaussian columns scaled to unit expected norm (in
        # high dimensions they are nearly orthonormal, and a QR would cost seconds)
        bases = rng.standard_normal(
            (self.n_clusters, self.dim, self.intrinsic_dim), dtype=np.float32
        )
        bases *= np.float32(1 / np.sqrt(self.dim))  # (C, dim, r)
        object.__setattr__(self, "_cache", (centres, bases))
        return centres, bases

    def labels(self, start: int, stop: int, *, stream: int = 1) -> np.ndarray:
        """The component of rows ``start .. stop`` (what :meth:`rows` draws them from)."""
        return self._draw(start, stop, stream)[1]

    def rows(self, start: int, stop: int, *, stream: int = 1) -> np.ndarray:
        """float32 (stop - start, dim) unit vectors; ``stream`` separates base and query sets."""
        return self._draw(start, stop, stream)[0]

    def _draw(self, start: int, stop: int, stream: int) -> tuple[np.ndarray, np.ndarray]:
        centres, bases = self._params()
        out = np.empty((stop - start, self.dim), dtype=np.float32)
        labels = np.empty(stop - start, dtype=np.int64)
        block = 65536
        # blocks aligned to multiples of `block`, so rows do not depend on how they are asked for
        for b in range(start // block, (stop - 1) // block + 1 if stop > start else 0):
            lo, hi = b * block, (b + 1) * block
            rng = np.random.default_rng([self.seed, stream, b])
            lab = rng.integers(0, self.n_clusters, block)
            z = rng.standard_normal((block, self.intrinsic_dim), dtype=np.float32)
            e = rng.standard_normal((block, self.dim), dtype=np.float32)
            # the whole block is drawn and computed, then sliced: the same rows whatever the
            # request (BLAS rounding depends on matrix shapes)
            x = centres[lab]
            order = np.argsort(lab, kind="stable")
            bounds = np.searchsorted(lab[order], np.arange(self.n_clusters + 1))
            for c in np.flatnonzero(np.diff(bounds)):
                rows = order[bounds[c] : bounds[c + 1]]
                x[rows] += (z[rows] @ bases[c].T) * self.spread
            x += e * (self.noise / np.sqrt(self.dim))
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            s, t = max(lo, start), min(hi, stop)
            out[s - start : t - start] = x[s - lo : t - lo]
            labels[s - start : t - start] = lab[s - lo : t - lo]
        return out, labels

    def chunks(self, n: int, chunk: int = 262144, *, stream: int = 1) -> Iterator[np.ndarray]:
        """Rows ``0 .. n`` in chunks of ``chunk`` rows."""
        for start in range(0, n, chunk):
            yield self.rows(start, min(n, start + chunk), stream=stream)
