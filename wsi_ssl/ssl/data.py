"""Tiles of one or many slide stores as a torch ``Dataset``, and the step-indexed sampler.

:func:`scan_stores` checks what a run is given (an archive root written by ``wsi-ssl tile``,
one ``<slide_id>.zarr`` store, or a list of either) and refuses what it cannot train on with a
typed error: an empty root (``StoreNotFoundError``), an incomplete store
(``StoreIncompleteError``, unless ``skip_incomplete``), tiles of another size or scale than
the config expects or than the other stores (``SchemaMismatchError``). With
``mixed_scales`` stores at several magnifications train together (every scale is drawn
equally often), and with ``mixed_sizes`` (crops made per tile, which makes them uniform)
stores of several tile sizes.

:func:`select_tiles` keeps the tiles worth training on: enough tissue (the store's own
``tissue_fraction``), enough grey-level variation (no blank glass or flat smears), and, with a
curation file (:mod:`wsi_ssl.ssl.curation`), only the curated ones.

:class:`TileDataset` reads one tile per item from the sharded Zarr ``tiles`` arrays (one tile
per inner chunk, so a read decodes one JPEG). It holds only paths; each process opens its own
array handles on first use, so it is safe in DataLoader worker processes.

:class:`StepBatchSampler` yields the batch of every optimiser step from a start step: the
order of epoch ``e`` is a function of ``(seed, e)`` only, each rank of a multi-process run
takes its slice of the global batch, and every item carries its own augmentation seed. A run
resumed at step ``s`` therefore sees exactly the tiles, in the same order and with the same
augmentations, as an uninterrupted run, whatever the number of loader workers.
"""

from __future__ import annotations

import bisect
import math
import os
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from wsi_ssl.errors import (
    SchemaMismatchError,
    StoreIncompleteError,
    StoreNotFoundError,
    TileReadError,
    WsiSslError,
)
from wsi_ssl.storage import open_store
from wsi_ssl.storage.tile_reader import TileReader

__all__ = [
    "SlideEntry",
    "StepBatchSampler",
    "TileDataset",
    "describe_sources",
    "scale_groups",
    "scan_stores",
    "select_tiles",
]

SAMPLINGS = ("uniform", "balanced")


@dataclass(frozen=True)
class SlideEntry:
    """One complete slide store a run trains on."""

    slide_id: str
    root: str
    path: str
    n_tiles: int
    tile_size: int
    mpp: float | None
    fingerprint: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def scan_stores(
    sources: str | Path | Sequence[str | Path],
    *,
    tile_size: int | None = None,
    mpp: float | None = None,
    skip_incomplete: bool = False,
    mixed_scales: bool = False,
    mixed_sizes: bool = False,
) -> list[SlideEntry]:
    """The complete, non-empty slide stores under ``sources``, checked for consistency.

    Args:
        sources: archive root(s) (folders with ``slides/``) and/or slide stores (``*.zarr``).
        tile_size: required tile side in pixels, or None to accept the stores' own (all equal).
        mpp: required microns per pixel of the tiles, or None likewise.
        skip_incomplete: leave out incomplete stores instead of raising.
        mixed_scales: accept stores at different scales.
        mixed_sizes: accept stores of different tile sizes.

    Raises:
        StoreNotFoundError: a path is neither, or no store with tiles is found.
        StoreIncompleteError: a store is not complete (and ``skip_incomplete`` is false).
        SchemaMismatchError: tile sizes or scales differ from ``tile_size`` / ``mpp`` or
            from one store to another.
    """
    paths = [sources] if isinstance(sources, str | Path) else list(sources)
    if not paths:
        raise StoreNotFoundError("(no path given)", "archive root")
    entries: list[SlideEntry] = []
    for path in map(Path, paths):
        for root, slide_id in _store_ids(path):
            try:
                store = open_store(root).slide(slide_id)
            except StoreIncompleteError:
                if skip_incomplete:
                    continue
                raise
            entries.append(_entry(root, slide_id, store))
    entries = [e for e in entries if e.n_tiles > 0]
    if not entries:
        where = ", ".join(map(str, paths))
        raise StoreNotFoundError(where, "complete slide store with tiles")
    _check_consistent(entries, tile_size, mpp, mixed_scales=mixed_scales, mixed_sizes=mixed_sizes)
    return entries


def _store_ids(path: Path) -> list[tuple[Path, str]]:
    """``(archive root, slide id)`` of every store at ``path`` (a root or one store)."""
    if path.suffix == ".zarr" and (path / "zarr.json").is_file():
        return [(path.parent.parent, path.name.removesuffix(".zarr"))]
    archive = open_store(path)  # StoreNotFoundError when not an archive root
    return [(path, p.name.removesuffix(".zarr")) for p in sorted(archive.slides_dir.glob("*.zarr"))]


def _entry(root: Path, slide_id: str, store: Any) -> SlideEntry:
    tiles = store.tiles
    tiling = store.tiling
    if tiles.ndim != 4 or tiles.shape[-1] != 3 or tiles.shape[1] != tiles.shape[2]:
        raise SchemaMismatchError(
            f"{store.path}: tiles array has shape {tuple(tiles.shape)}, expected (N, T, T, 3); "
            "re-tile the slide with this wsi-ssl version"
        )
    if str(tiles.dtype) != "uint8":
        raise SchemaMismatchError(f"{store.path}: tiles are {tiles.dtype}, expected uint8")
    size = int(tiles.shape[1])
    if int(tiling.get("tile_size", size)) != size:
        raise SchemaMismatchError(
            f"{store.path}: tiling.tile_size {tiling.get('tile_size')} disagrees with the tiles "
            f"array ({size} px); the store is damaged, re-tile the slide"
        )
    mpp = tiling.get("mpp_effective", tiling.get("mpp"))
    source = store.source
    return SlideEntry(
        slide_id=slide_id,
        root=str(Path(root).resolve()),
        path=str(Path(store.path).resolve()),
        n_tiles=int(tiles.shape[0]),
        tile_size=size,
        mpp=None if mpp is None else float(mpp),
        fingerprint=source.get("fingerprint"),
    )


def _check_consistent(
    entries: list[SlideEntry],
    tile_size: int | None,
    mpp: float | None,
    *,
    mixed_scales: bool = False,
    mixed_sizes: bool = False,
) -> None:
    for e in entries:
        if tile_size is not None and e.tile_size != tile_size:
            raise SchemaMismatchError(
                f"{e.path}: tiles are {e.tile_size} px but the config expects tile_size="
                f"{tile_size}; re-tile with --tile-size {tile_size} or train with "
                f"--tile-size {e.tile_size}"
            )
        if mpp is not None and e.mpp is not None and not math.isclose(e.mpp, mpp, rel_tol=0.02):
            raise SchemaMismatchError(
                f"{e.path}: tiles are at {e.mpp:g} µm/px but the config expects mpp={mpp:g}; "
                f"re-tile with --mpp {mpp:g} or train with --mpp {e.mpp:g}"
            )
    first = entries[0]
    for e in entries[1:]:
        if e.tile_size != first.tile_size and not mixed_sizes:
            raise SchemaMismatchError(
                f"{e.path}: tiles are {e.tile_size} px but {first.path} has {first.tile_size} px; "
                "train on stores tiled with one --tile-size (or pass --tile-size to pick one); "
                "crops made per tile (augment='loader') accept mixed sizes"
            )
        if (
            not mixed_scales
            and e.mpp is not None
            and first.mpp is not None
            and not math.isclose(e.mpp, first.mpp, rel_tol=0.02)
        ):
            raise SchemaMismatchError(
                f"{e.path}: tiles are at {e.mpp:g} µm/px but {first.path} at {first.mpp:g}; "
                "train on stores tiled at one --mpp, or set mixed_scales=True (--mixed-scales)"
            )


def scale_groups(entries: Sequence[SlideEntry]) -> list[int]:
    """Scale index of every store: stores within 2% of one ``mpp`` share one index."""
    scales: list[float] = []
    groups = []
    for e in entries:
        mpp = e.mpp if e.mpp is not None else 0.0
        found = next((i for i, s in enumerate(scales) if math.isclose(s, mpp, rel_tol=0.02)), None)
        if found is None:
            scales.append(mpp)
            found = len(scales) - 1
        groups.append(found)
    return groups


def select_tiles(
    entries: Sequence[SlideEntry],
    *,
    min_tissue: float = 0.0,
    min_tile_std: float = 0.0,
    curation: str | Path | None = None,
) -> list[np.ndarray] | None:
    """Per store, the tile numbers to train on (None: all of them).

    A tile is kept when its stored tissue fraction is at least ``min_tissue``, the standard
    deviation of its grey levels (0-255) at least ``min_tile_std`` (read once per run), and the
    curation file, if any, selects it. Raises ``ConfigError`` when nothing is left.
    """
    if min_tissue <= 0 and min_tile_std <= 0 and curation is None:
        return None
    chosen = None
    if curation is not None:
        from wsi_ssl.ssl.curation import read_curation

        chosen = read_curation(curation, entries)
    keep: list[np.ndarray] = []
    for i, e in enumerate(entries):
        tiles = np.arange(e.n_tiles) if chosen is None else chosen[i]
        if min_tissue > 0:
            fraction = np.asarray(open_store(e.root).slide(e.slide_id).tissue_fraction)
            tiles = tiles[fraction[tiles] >= min_tissue]
        if min_tile_std > 0 and len(tiles):
            reader = TileReader(open_store(e.root).slide(e.slide_id).tiles)
            stds = np.array([_grey_std(reader[int(t)]) for t in tiles])
            tiles = tiles[stds >= min_tile_std]
        keep.append(tiles.astype(np.int64))
    if sum(len(k) for k in keep) == 0:
        from wsi_ssl.errors import ConfigError

        raise ConfigError(
            f"no tile of {len(entries)} stores passes min_tissue={min_tissue}, "
            f"min_tile_std={min_tile_std}"
            + (f" and curation {curation}" if curation else "")
            + "; lower the thresholds"
        )
    return keep


def _grey_std(tile: np.ndarray) -> float:
    return float((tile.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)).std())


def describe_sources(
    entries: Sequence[SlideEntry], keep: Sequence[np.ndarray] | None = None
) -> dict[str, Any]:
    """JSON-able description of what a run trains on (recorded in checkpoints)."""
    counts = [e.n_tiles for e in entries] if keep is None else [len(k) for k in keep]
    groups = scale_groups(entries)
    scales: dict[str, int] = {}
    for g, n in zip(groups, counts, strict=True):
        key = f"{entries[groups.index(g)].mpp or 0:g}"
        scales[key] = scales.get(key, 0) + n
    return {
        "n_selected": sum(counts),
        "scales": scales,
        "roots": sorted({e.root for e in entries}),
        "n_slides": len(entries),
        "n_tiles": sum(e.n_tiles for e in entries),
        "tile_size": entries[0].tile_size,
        "mpp": entries[0].mpp,
        "slides": [
            {"slide_id": e.slide_id, "n_tiles": e.n_tiles, "fingerprint": e.fingerprint}
            for e in entries
        ],
    }


class TileDataset(Dataset):
    """Every tile of the given stores, in store order.

    Args:
        entries: stores from :func:`scan_stores`.
        transform: applied to each ``(T, T, 3)`` uint8 tile (e.g.
            :class:`~wsi_ssl.ssl.transforms.HistoDINOTransform`); None returns the tile as a
            uint8 tensor for :class:`~wsi_ssl.ssl.batch_augment.BatchDINOAugment`.

    ``keep``: per store, the tile numbers to use (:func:`select_tiles`; None: all).
    Items are indexed by an int or by ``(index, seed)`` as yielded by
    :class:`StepBatchSampler`: the seed then seeds ``random``, numpy and torch for the
    transform (their previous states are restored afterwards).
    """

    def __init__(
        self,
        entries: Sequence[SlideEntry],
        transform: Callable | None = None,
        keep: Sequence[np.ndarray] | None = None,
    ) -> None:
        self.entries = list(entries)
        self.transform = transform
        self.keep = None if keep is None else [np.asarray(k, np.int64) for k in keep]
        sizes = (
            [e.n_tiles for e in self.entries] if self.keep is None else [len(k) for k in self.keep]
        )
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self._pid: int | None = None
        self._readers: dict[int, TileReader] = {}

    @property
    def slide_sizes(self) -> list[int]:
        return np.diff(self.offsets).astype(int).tolist()

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def locate(self, index: int) -> tuple[int, int]:
        """``(slide number, tile number)`` of a dataset index."""
        if not 0 <= index < len(self):
            raise IndexError(f"tile index {index} out of range [0, {len(self)})")
        slide = bisect.bisect_right(self.offsets, index) - 1
        tile = index - int(self.offsets[slide])
        return slide, tile if self.keep is None else int(self.keep[slide][tile])

    def _tiles(self, slide: int) -> TileReader:
        if self._pid != os.getpid():  # a fresh process (DataLoader worker): own handles
            self._pid = os.getpid()
            self._readers = {}
        if slide not in self._readers:
            e = self.entries[slide]
            self._readers[slide] = TileReader(open_store(e.root).slide(e.slide_id).tiles)
        return self._readers[slide]

    def read_tile(self, index: int) -> np.ndarray:
        """The uint8 ``(T, T, 3)`` tile at a dataset index."""
        slide, tile = self.locate(int(index))
        try:
            return self._tiles(slide)[tile]
        except WsiSslError:
            raise
        except Exception as err:
            raise TileReadError(
                self.entries[slide].path, tile, tile + 1, f"{type(err).__name__}: {err}"
            ) from err

    def __getitem__(self, item: int | tuple[int, int]) -> Any:
        index, seed = item if isinstance(item, tuple) else (item, None)
        tile = self.read_tile(index)
        if self.transform is None:
            return torch.from_numpy(tile)
        if seed is None:
            return self.transform(tile)
        with seeded(seed):
            return self.transform(tile)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_pid"] = None
        state["_readers"] = {}
        return state


class seeded:
    """Seed ``random``, numpy and torch for a block, then restore their states."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def __enter__(self) -> None:
        self.saved = (random.getstate(), np.random.get_state(), torch.get_rng_state())
        random.seed(self.seed)
        np.random.seed(self.seed % 2**32)
        torch.manual_seed(self.seed)

    def __exit__(self, *exc: object) -> None:
        random.setstate(self.saved[0])
        np.random.set_state(self.saved[1])
        torch.set_rng_state(self.saved[2])


def _mix(*values: int) -> int:
    """A well-spread 63-bit integer from a few integers (splitmix64 steps)."""
    x = 0x9E3779B97F4A7C15
    mask = (1 << 64) - 1
    for v in values:
        x = (x ^ (v & mask)) & mask
        x = (x + 0x9E3779B97F4A7C15) & mask
        z = x
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        x = z ^ (z >> 31)
    return x >> 1


def epoch_order(
    slide_sizes: Sequence[int],
    *,
    seed: int,
    epoch: int,
    sampling: str = "uniform",
    groups: Sequence[int] | None = None,
) -> torch.Tensor:
    """Dataset indices of one epoch (as many as there are tiles), a function of (seed, epoch).

    ``"uniform"``: a permutation of all tiles. ``"balanced"``: each draw picks a slide
    uniformly, then a tile of it uniformly (with replacement), so every slide contributes
    equally whatever its size. ``groups`` (a scale index per slide, several scales): each
    draw first picks a scale uniformly, then a slide (``"balanced"``) or a tile of that scale.
    """
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {', '.join(SAMPLINGS)}; got {sampling!r}")
    g = torch.Generator().manual_seed(_mix(seed, epoch, 0x5A3))
    sizes = torch.tensor(list(slide_sizes), dtype=torch.int64)
    n = int(sizes.sum())
    if groups is not None and len(set(groups)) > 1:
        return _scale_balanced(sizes, torch.tensor(list(groups)), sampling, g)
    if sampling == "uniform":
        return torch.randperm(n, generator=g)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)[:-1]])
    slide = torch.randint(len(sizes), (n,), generator=g)
    within = (torch.rand(n, generator=g, dtype=torch.float64) * sizes[slide]).long()
    return offsets[slide] + torch.minimum(within, sizes[slide] - 1)


def _scale_balanced(
    sizes: torch.Tensor, groups: torch.Tensor, sampling: str, g: torch.Generator
) -> torch.Tensor:
    """``sum(sizes)`` draws: a scale uniformly, then a slide of it (uniformly when balanced,
    else in proportion to its tiles), then a tile of the slide uniformly."""
    n = int(sizes.sum())
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)[:-1]])
    n_groups = int(groups.max()) + 1
    scale = torch.randint(n_groups, (n,), generator=g)
    weights = (
        torch.ones_like(sizes, dtype=torch.float64) if sampling == "balanced" else sizes.double()
    )
    slide = torch.empty(n, dtype=torch.int64)
    for k in range(n_groups):
        members = (groups == k).nonzero().flatten()
        picks = scale == k
        w = weights[members] * (sizes[members] > 0)
        slide[picks] = members[torch.multinomial(w, int(picks.sum()), True, generator=g)]
    within = (torch.rand(n, generator=g, dtype=torch.float64) * sizes[slide]).long()
    return offsets[slide] + torch.minimum(within, sizes[slide] - 1)


class StepBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches of ``(dataset index, augmentation seed)``, one per optimiser step.

    Args:
        slide_sizes: tiles per slide, in dataset order.
        batch_size: items per step for this process.
        steps_per_epoch: steps in one epoch (tiles // global batch).
        start_step: first step to yield (a resumed run starts where it stopped).
        total_steps: yield steps ``start_step .. total_steps - 1``.
        seed: run seed.
        sampling: ``"uniform"`` or ``"balanced"``.
        rank: this process's rank.
        world_size: number of processes; global batch = ``batch_size * world_size``.
        groups: scale index of every slide (several scales: drawn equally often).
    """

    def __init__(
        self,
        slide_sizes: Sequence[int],
        *,
        batch_size: int,
        steps_per_epoch: int,
        start_step: int,
        total_steps: int,
        seed: int,
        sampling: str = "uniform",
        rank: int = 0,
        world_size: int = 1,
        groups: Sequence[int] | None = None,
    ) -> None:
        if steps_per_epoch < 1:
            raise ValueError("steps_per_epoch must be >= 1")
        if steps_per_epoch * batch_size * world_size > sum(slide_sizes):
            raise ValueError("steps_per_epoch * global batch exceeds the number of tiles")
        self.slide_sizes = list(slide_sizes)
        self.batch_size = batch_size
        self.steps_per_epoch = steps_per_epoch
        self.start_step = start_step
        self.total_steps = total_steps
        self.seed = seed
        self.sampling = sampling
        self.rank = rank
        self.world_size = world_size
        self.groups = None if groups is None else list(groups)
        self._epoch: int | None = None
        self._order: torch.Tensor | None = None

    def __len__(self) -> int:
        return max(0, self.total_steps - self.start_step)

    def batch(self, step: int) -> list[tuple[int, int]]:
        """The items of ``step`` for this rank."""
        epoch, within = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._order = epoch_order(
                self.slide_sizes,
                seed=self.seed,
                epoch=epoch,
                sampling=self.sampling,
                groups=self.groups,
            )
            self._epoch = epoch
        assert self._order is not None
        start = (within * self.world_size + self.rank) * self.batch_size
        indices = self._order[start : start + self.batch_size].tolist()
        return [(int(i), _mix(self.seed, epoch, start + j)) for j, i in enumerate(indices)]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start_step, self.total_steps):
            yield self.batch(step)
