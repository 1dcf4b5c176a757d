"""Curated pretraining tiles from the archive's own embeddings (a first encoder's vectors).

:func:`curate` reads every slide's embeddings of one encoder, optionally removes near
duplicates (cosine similarity at least ``dedup_threshold`` to a tile kept before it, found
with a FAISS range search), clusters the rest with FAISS k-means and draws the same number of
tiles from every cluster (clusters smaller than their share give all they have; the rest is
spread over the larger ones). Rare tissue is then seen as often as the background of the
archive that dominates a uniform draw (the idea behind DINOv2's LVD-142M curation, Oquab et
al., 2023). It writes a JSON selection that ``PretrainConfig.curation`` (``--curation``)
trains on, and a coverage plot: tiles per cluster before and after, and a 2-D projection
of all tiles with the selected ones marked.

The selection names tiles by number, so it records what those numbers meant: the archive it
was curated on and, per slide, the sha256 of its tile coordinates and its tiling's scale.
:func:`read_curation` refuses a store whose tiles are no longer those (re-tiled since, or
another scale of the same slide); files from before this was recorded get a range check only.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from wsi_ssl.errors import ConfigError
from wsi_ssl.storage.atomic import atomic_write_text, atomic_write_with

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["CURATION_FORMAT", "Curation", "curate", "curation_notes", "read_curation"]

CURATION_FORMAT = "wsi_ssl.curation"
MIN_TILES_PER_CLUSTER = 39
"""Fewer tiles than this per k-means cluster give rough clusters (FAISS's own warning level)."""


@dataclass(frozen=True)
class Curation:
    """What :func:`curate` selected and where it wrote it."""

    path: Path
    plot: Path
    encoder_id: str
    n_tiles: int
    n_unique: int
    n_selected: int
    n_clusters: int
    cluster_sizes: list[int]
    selected_per_cluster: list[int]
    notes: list[str]
    """Why fewer tiles than asked were selected, or why the clusters are rough (or none)."""

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "path": str(self.path), "plot": str(self.plot)}


def tiles_record(store: Any) -> dict[str, Any]:
    """What identifies a slide store's tiles (their numbers are rows of these coordinates):
    the sha256 of its coordinates and its tiling's scale (µm/px, tile size)."""
    from wsi_ssl.storage.embeddings import coords_sha256

    tiling = store.tiling
    return {
        "coords_sha256": coords_sha256(np.asarray(store.coords)),
        "mpp": float(tiling["mpp"]),
        "tile_size": int(tiling["tile_size"]),
    }


def _load(
    root: str | Path, encoder_id: str | None
) -> tuple[np.ndarray, list[tuple[str, int]], str, dict[str, dict[str, Any]]]:
    from wsi_ssl.storage import open_store

    archive = open_store(root)
    vectors: list[np.ndarray] = []
    index: list[tuple[str, int]] = []
    stores: dict[str, dict[str, Any]] = {}
    used = encoder_id
    for slide_id in archive.slide_ids:
        emb = archive.embeddings(slide_id, encoder_id).embedded_only()  # no QC-skipped rows
        stores[slide_id] = tiles_record(archive.slide(slide_id))
        used = emb.encoder_id
        vectors.append(np.asarray(emb.features, dtype=np.float32))
        index.extend((slide_id, int(i)) for i in emb.tile_ids)
    if not index or used is None:
        raise ConfigError(
            f"{root}: no embedded tiles to curate; embed the archive first (`wsi-ssl embed`, "
            "or wsi_ssl.embed in Python)"
        )
    x = np.concatenate(vectors)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return np.ascontiguousarray(x), index, used, stores


def near_duplicates(x: np.ndarray, threshold: float) -> np.ndarray:
    """Bool mask of the rows whose cosine similarity to an earlier kept row is >= threshold."""
    import faiss

    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    lims, _, neighbours = index.range_search(x, threshold)
    removed = np.zeros(len(x), dtype=bool)
    for i in range(len(x)):
        if removed[i]:
            continue
        found = neighbours[lims[i] : lims[i + 1]]
        removed[found[found > i]] = True
    return removed


def _even_quotas(sizes: np.ndarray, total: int) -> np.ndarray:
    """Per-cluster counts summing to min(total, sizes.sum()), as equal as the sizes allow."""
    quota = np.zeros_like(sizes)
    left = min(total, int(sizes.sum()))
    while left > 0:
        open_ = np.flatnonzero(quota < sizes)
        share = max(1, left // len(open_))
        for k in open_:
            add = min(share, int(sizes[k] - quota[k]), left)
            quota[k] += add
            left -= add
            if left == 0:
                break
    return quota


def _check_arguments(
    out: str | Path, n_tiles: int, n_clusters: int, dedup_threshold: float | None
) -> None:
    if n_tiles < 1 or n_clusters < 1:
        raise ConfigError(
            f"n_tiles and n_clusters must be >= 1; got {n_tiles}, {n_clusters}",
            parameters=("n_tiles", "n_clusters"),
        )
    if dedup_threshold is not None and not 0 < dedup_threshold <= 1:
        raise ConfigError(
            f"dedup_threshold must be in (0, 1] (a cosine similarity) or None; got "
            f"{dedup_threshold}",
            parameters=("dedup_threshold",),
        )
    if Path(out).suffix.lower() != ".json":
        raise ConfigError(
            f"{out}: the selection is a JSON file (its coverage plot goes beside it as .png); "
            "name it *.json",
            parameters=("out",),
        )


def curate(
    root: str | Path,
    out: str | Path,
    *,
    n_tiles: int,
    encoder_id: str | None = None,
    n_clusters: int = 16,
    dedup_threshold: float | None = 0.98,
    seed: int = 0,
) -> Curation:
    """Select ``n_tiles`` tiles spread evenly over ``n_clusters`` k-means clusters.

    Args:
        root: an archive root with embeddings (``wsi-ssl embed``).
        out: the JSON selection to write, ``*.json`` (the coverage plot goes beside it,
            ``.png``).
        n_tiles: tiles to select (fewer if the archive has fewer unique ones).
        encoder_id: the embeddings to cluster (a unique prefix; None: the only one).
        n_clusters: k of k-means.
        dedup_threshold: cosine similarity from which a tile is a near duplicate of one kept
            before it (None: keep all).
        seed: k-means initialisation and the draw within clusters.
    """
    import faiss

    _check_arguments(out, n_tiles, n_clusters, dedup_threshold)
    x, index, used, stores = _load(root, encoder_id)
    keep = np.arange(len(x))
    if dedup_threshold is not None:
        keep = np.flatnonzero(~near_duplicates(x, dedup_threshold))
    k = min(n_clusters, len(keep))
    # FAISS prints its own warning on few points a cluster: `notes` says it in our words
    kmeans = faiss.Kmeans(
        x.shape[1], k, niter=20, seed=seed, spherical=True, min_points_per_centroid=1
    )
    kmeans.train(x[keep])
    _, labels = kmeans.index.search(x[keep], 1)
    labels = labels.ravel()
    sizes = np.bincount(labels, minlength=k)
    quotas = _even_quotas(sizes, n_tiles)
    rng = np.random.default_rng(seed)
    chosen = np.concatenate(
        [rng.choice(keep[labels == c], quotas[c], replace=False) for c in range(k)]
    )
    selection: dict[str, list[int]] = {}
    for row in sorted(chosen.tolist()):
        slide_id, tile = index[row]
        selection.setdefault(slide_id, []).append(tile)
    out = Path(out)
    plot = out.with_suffix(".png")
    all_labels = kmeans.index.search(x, 1)[1].ravel()
    plot_coverage(x, all_labels, keep, chosen, plot, k)
    result = Curation(
        path=out,
        plot=plot,
        encoder_id=used,
        n_tiles=len(x),
        n_unique=len(keep),
        n_selected=len(chosen),
        n_clusters=k,
        cluster_sizes=np.bincount(all_labels, minlength=k).tolist(),
        selected_per_cluster=quotas.tolist(),
        notes=_notes(n_tiles, len(x), len(keep), len(chosen), k, dedup_threshold)
        + (
            [f"{n_clusters} clusters were asked for; {len(keep)} unique tiles make {k}"]
            if k < n_clusters
            else []
        ),
    )
    record = {"root": str(Path(root).resolve()), "stores": stores, "slides": selection}
    _write_json(out, {"format": CURATION_FORMAT, **result.to_dict(), **record})
    return result


def _notes(
    asked: int, n_all: int, n_unique: int, n_selected: int, k: int, threshold: float | None
) -> list[str]:
    notes = []
    if n_selected < asked and n_unique < n_all:
        notes.append(
            f"{asked} tiles were asked for, but only {n_unique} of the {n_all} embedded tiles "
            f"are not near duplicates (cosine similarity >= {threshold}); raise the duplicate "
            "threshold or turn deduplication off to keep more"
        )
    elif n_selected < asked:
        notes.append(f"{asked} tiles were asked for; the archive has {n_all} embedded tiles")
    if n_unique < MIN_TILES_PER_CLUSTER * k:
        notes.append(
            f"k-means clustered {n_unique} tiles into {k} clusters, fewer than "
            f"{MIN_TILES_PER_CLUSTER} a cluster: the clusters are rough; ask for fewer clusters"
        )
    return notes


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data))


def coverage_counts(
    labels: np.ndarray, keep: np.ndarray, chosen: np.ndarray, k: int
) -> dict[str, np.ndarray]:
    """Tiles per cluster (``all``, ``unique``, ``selected``), clusters ordered largest first
    (``cluster``: their numbers): what the coverage plot draws."""
    every = np.bincount(labels, minlength=k)
    order = np.argsort(-every, kind="stable")
    return {
        "cluster": order,
        "all": every[order],
        "unique": np.bincount(labels[keep], minlength=k)[order],
        "selected": np.bincount(labels[chosen], minlength=k)[order],
    }


def coverage_figure(
    x: np.ndarray, labels: np.ndarray, keep: np.ndarray, chosen: np.ndarray, k: int
) -> Figure:
    """Left: tiles per cluster, largest first (all and unique as outlines over each cluster's
    whole width, the selection as bars from below one tile, so a bar of a single tile shows
    beside clusters of thousands), readable for any number of clusters; right: a PCA
    projection with the selection."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    counts = coverage_counts(labels, keep, chosen, k)
    fig = Figure(figsize=(11, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    bars, scatter = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    edges = np.arange(k + 1) + 0.5  # cluster r's bar spans r - 0.5 .. r + 0.5
    bars.bar(edges[:-1] + 0.5, counts["selected"], width=1.0, color="tab:orange", label="selected")
    bars.stairs(counts["all"], edges, baseline=None, color="tab:grey", label="all tiles")
    bars.stairs(counts["unique"], edges, baseline=None, color="tab:blue", ls="--", label="unique")
    bars.set_yscale("log")
    bars.set_ylim(0.5, 2.0 * max(1, int(counts["all"].max())))  # log: the bars start below 1
    bars.set_xlim(edges[0], edges[-1])
    bars.set_xlabel(f"k-means cluster, largest first ({k} clusters)")
    bars.set_ylabel("tiles")
    covered = int((counts["selected"] > 0).sum())
    bars.set_title(f"the selection covers {covered} of {k} clusters")
    bars.legend()
    centred = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(centred[:: max(1, len(x) // 5000)], full_matrices=False)
    xy = centred @ vt[:2].T
    scatter.scatter(xy[:, 0], xy[:, 1], s=3, c="lightgrey", label="all tiles")
    scatter.scatter(xy[chosen, 0], xy[chosen, 1], s=8, c="tab:orange", label="selected")
    scatter.set_title("tiles (PCA of the embeddings)")
    scatter.legend(loc="best")
    fig.tight_layout()
    return fig


def plot_coverage(
    x: np.ndarray, labels: np.ndarray, keep: np.ndarray, chosen: np.ndarray, out: Path, k: int
) -> Path:
    """Write :func:`coverage_figure` to ``out`` (PNG)."""
    fig = coverage_figure(x, labels, keep, chosen, k)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_with(out, fig.savefig)
    return out


def _read_file(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"{path}: not a readable curation file ({err})", parameters=("curation",)
        ) from err
    if not isinstance(data, dict) or data.get("format") != CURATION_FORMAT:
        raise ConfigError(
            f"{path}: not a curation file written by wsi_ssl.ssl.curation.curate",
            parameters=("curation",),
        )
    return data


def _curated_on(data: dict[str, Any]) -> str:
    root = data.get("root")
    return f"it was curated on {root}" if root else "the archive it was curated on is not recorded"


def read_curation(path: str | Path, entries: Any) -> list[np.ndarray]:
    """Per store of ``entries`` (:class:`~wsi_ssl.ssl.stores.SlideEntry`), the curated tiles.

    Raises ``ConfigError`` when the curation names none of the stores, or names tiles a store
    no longer holds: re-tiled since, or another scale of the slide (files from before the
    stores' tiles were recorded: tile numbers beyond a store's tiles)."""
    path = Path(path)
    data = _read_file(path)
    slides = data.get("slides", {})
    if not any(e.slide_id in slides for e in entries):
        roots = ", ".join(sorted({str(e.root) for e in entries}))
        raise ConfigError(
            f"{path}: the curation names none of the slides in {roots} ({len(entries)} "
            f"stores; {_curated_on(data)}); curate the archive you train on (wsi-ssl curate "
            "ROOT --out FILE) or train on the one it was curated on",
            parameters=("curation",),
        )
    recorded = data.get("stores") or {}
    other = _other_scales(data, entries)
    out = []
    for e in entries:
        if id(e) in other:  # trained on at the scale curated: left out here, and noted
            out.append(np.zeros(0, dtype=np.int64))
            continue
        tiles = np.asarray(slides.get(e.slide_id, []), dtype=np.int64)
        if isinstance(recorded.get(e.slide_id), dict) and e.slide_id in slides:
            _check_same_tiles(path, e, recorded[e.slide_id])
        if len(tiles) and (tiles.min() < 0 or tiles.max() >= e.n_tiles):
            raise ConfigError(
                f"{path}: tiles of {e.slide_id} beyond its {e.n_tiles} tiles in {e.path}; the "
                "store was re-tiled since the curation, or is another scale of the slide: "
                "curate again",
                parameters=("curation",),
            )
        out.append(tiles)
    return out


def _other_scales(data: dict[str, Any], entries: Any) -> set[int]:
    """The ``id()`` of the stores of ``entries`` at another scale than their slide was curated
    at, while a store of the same slide at the scale curated is among them (``--mixed-scales``
    over the scales of one tiling): their tile numbers name other tiles; those stores are left
    out, not refused."""
    from wsi_ssl.storage.slide_store import same_scale

    recorded, slides = data.get("stores") or {}, data.get("slides", {})

    def curated_scale(e: Any) -> bool | None:
        record = recorded.get(e.slide_id)
        if e.slide_id not in slides or not isinstance(record, dict) or e.mpp is None:
            return None
        return same_scale(record, {"mpp": e.mpp, "tile_size": e.tile_size})

    at_curated = {e.slide_id for e in entries if curated_scale(e)}
    return {id(e) for e in entries if curated_scale(e) is False and e.slide_id in at_curated}


def _check_same_tiles(path: Path, entry: Any, record: dict[str, Any]) -> None:
    """Refuse ``entry``'s store when its tiles are not those ``record`` (curated) names."""
    from wsi_ssl.storage import open_store
    from wsi_ssl.storage.slide_store import same_scale

    store = open_store(entry.root).slide(entry.slide_id)
    now = tiles_record(store)
    again = f"curate again (wsi-ssl curate {entry.root} --out FILE)"
    scale = record.get("mpp") is not None and record.get("tile_size") is not None
    if scale and not same_scale(record, now):
        raise ConfigError(
            f"{path}: {entry.slide_id} was curated at {record['mpp']:g} µm/px in "
            f"{record['tile_size']} px tiles, but {entry.path} is another scale of the "
            f"slide, {now['mpp']:g} µm/px in {now['tile_size']} px tiles (its tile numbers "
            f"name other tiles); {again}, or train on the scale it was curated at",
            parameters=("curation",),
        )
    if record.get("coords_sha256") not in (None, now["coords_sha256"]):
        raise ConfigError(
            f"{path}: {entry.slide_id}'s tiles in {entry.path} are not those curated (their "
            "coordinates differ: the slide was re-tiled since the curation, its tile numbers "
            f"name other tiles); {again}",
            parameters=("curation",),
        )


def curation_notes(path: str | Path, entries: Any) -> list[str]:
    """What to know before training on the curation file ``path`` with the stores
    ``entries``: the slides it names no tile of, which training leaves out."""
    path = Path(path)
    data = _read_file(path)
    slides, other = data.get("slides", {}), _other_scales(data, entries)
    left = [e for e in entries if e.slide_id not in slides or id(e) in other]
    if not left:
        return []
    recorded = data.get("stores")
    unseen = [e for e in left if recorded is not None and e.slide_id not in recorded]
    where = ", ".join(sorted({str(e.root) for e in left}))
    return [
        f"the curation {path} names no tile of {len(left)} of the {len(entries)} slides "
        f"(in {where}): training leaves them out"
        + (
            f"; {len(unseen)} of them are not in the archive curated ({_curated_on(data)}): "
            "curate an archive that holds them to train on them"
            if unseen
            else ""
        )
        + (
            f"; {len(other)} of them are another scale of a curated slide (a curation names "
            "tiles at the scale it was curated at)"
            if other
            else ""
        )
    ]
