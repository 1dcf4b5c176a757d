"""Every array of a slide store but the tiles and the embeddings (coords, tissue fraction,
thumbnail, tissue mask, ``qc/<metric>``, ``labels/<name>``) is written as zstd frames that carry
their content's checksum (``storage.codecs.CHECKED_ZSTD``): one flipped byte in a chunk file
fails to decode, a StoreCorruptError naming the store, the array and ``wsi-ssl check``. They
were written with zarr's default zstd, without the checksum, and most flipped bytes read as
other values (a moved tile, a wrong QC score) in every command but ``check``. Stores written
before read as they did, to the same values and the same contents digests."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr

from wsi_ssl.config import TilingConfig
from wsi_ssl.errors import StoreCorruptError
from wsi_ssl.storage import Archive, SlideStore
from wsi_ssl.synthetic import write_synthetic_slide
from wsi_ssl.tiling.batch import tile_slide

READERS: dict[str, Callable[[SlideStore], Any]] = {
    "coords": lambda store: store.coords,
    "tissue_fraction": lambda store: store.tissue_fraction,
    "thumbnail": lambda store: store.thumbnail,
    "tissue_mask": lambda store: store.tissue_mask,
    "qc/focus": lambda store: store.qc(),
    "qc/tissue": lambda store: store.qc(),
    "labels/annotations": lambda store: store.labels("annotations"),
}
"""Each array of a store but the tiles, and the public read that returns it."""
CHECKED = {"name": "zstd", "configuration": {"level": 0, "checksum": True}}
FLIPS = 24
"""Bytes flipped, one at a time, spread over the first chunk file of an array."""


@pytest.fixture(scope="module")
def tiled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store freshly tiled from a synthetic slide, with QC scores and ``labels/annotations``
    (an ROI over its left part), every tile kept."""
    base = tmp_path_factory.mktemp("checksums")
    ring = [[0, 0], [700, 0], [700, 800], [0, 800], [0, 0]]
    feature = {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [ring]},
        "properties": {"objectType": "annotation", "classification": {"name": "Tumor"}},
    }
    roi = base / "roi.geojson"
    roi.write_text(json.dumps({"type": "FeatureCollection", "features": [feature]}))
    config = TilingConfig(tile_size=224, codec="zstd", roi=str(roi), roi_min_fraction=0.0)
    slide = write_synthetic_slide(base / "s.tiff", (1000, 800), seed=1)
    outcome = tile_slide(slide, base / "root", replace(config, tissue_threshold=0.0))
    return Archive(base / "root").slide(outcome.details["slide_id"]).path


def _codecs(array_dir: Path) -> list[dict[str, Any]]:
    return list(json.loads((array_dir / "zarr.json").read_text())["codecs"])


def _first_chunk(array_dir: Path) -> Path:
    return min(p for p in (array_dir / "c").rglob("*") if p.is_file())


def test_every_array_but_the_tiles_is_written_as_zstd_frames_with_their_checksum(
    tiled: Path,
) -> None:
    store = SlideStore.open(tiled)
    names = set(store.contents_sha256())  # every array but the tiles and the embeddings
    assert set(READERS) <= names and {"qc/pen", "qc/dark"} <= names
    for name in sorted(names):
        bytes_codec, compressor = _codecs(tiled / name)
        assert bytes_codec["name"] == "bytes" and compressor == CHECKED, name
    fractions, classes = store.labels()
    assert classes == ["Tumor"] and 0 < fractions.min() < 1 and fractions.max() == 1


@pytest.mark.parametrize("array", list(READERS))
def test_a_flipped_byte_in_any_array_fails_its_read_naming_the_store_and_the_array(
    tiled: Path, tmp_path: Path, array: str
) -> None:
    """Each of ``FLIPS`` bytes spread over the chunk file, header and checksum included,
    flipped alone: the public read and ``check``'s look at the store name the array."""
    root = shutil.copytree(tiled.parent.parent, tmp_path / "root")
    path = root / "slides" / tiled.name
    store = SlideStore.open(path)
    read = READERS[array]
    chunk = _first_chunk(path / array)
    intact = chunk.read_bytes()
    for at in np.linspace(0, len(intact) - 1, FLIPS).round().astype(int):
        flipped = bytearray(intact)
        flipped[at] ^= 0xFF
        chunk.write_bytes(bytes(flipped))
        with pytest.raises(StoreCorruptError) as caught:
            read(store)
        assert caught.value.path == path
        assert caught.value.detail.startswith(f"a chunk file of {array} does not decode: "), at
        assert f"`wsi-ssl check {root}` prints the tile command" in str(caught.value)
        assert store.problem() == caught.value.detail
    chunk.write_bytes(intact)
    assert store.problem() is None


def _as_written_before(store: Path) -> None:
    """Rewrite every array but the tiles as the tiler wrote it before the checksum: zarr's
    default codecs, the same values, chunks and attributes."""
    for name in SlideStore.open(store).contents_sha256():
        old = zarr.open_array(store / name, mode="r")
        values, chunks, attrs = old[...], old.chunks, dict(old.attrs)
        zarr.create_array(
            store / name, data=values, chunks=chunks, attributes=attrs, overwrite=True
        )


def test_a_store_written_without_the_checksum_reads_the_same_values_and_digests(
    tiled: Path, tmp_path: Path
) -> None:
    """The codec is recorded per array: a store from before reads as it did, its values and
    contents digests (sha256 of values, not chunk bytes) equal to a checksummed store's."""
    old = SlideStore.open(shutil.copytree(tiled, tmp_path / tiled.name))
    _as_written_before(old.path)
    new = SlideStore.open(tiled)
    for name in new.contents_sha256():
        assert _codecs(old.path / name)[1]["configuration"]["checksum"] is False, name
        assert _codecs(tiled / name)[1]["configuration"]["checksum"] is True, name
    np.testing.assert_array_equal(old.coords, new.coords)
    np.testing.assert_array_equal(old.tissue_fraction, new.tissue_fraction)
    np.testing.assert_array_equal(old.thumbnail, new.thumbnail)
    np.testing.assert_array_equal(old.tissue_mask, new.tissue_mask)
    assert old.qc().keys() == new.qc().keys() and len(new.qc()) == 4
    for metric, scores in new.qc().items():
        np.testing.assert_array_equal(old.qc()[metric], scores)
    np.testing.assert_array_equal(old.labels()[0], new.labels()[0])
    assert old.labels()[1] == new.labels()[1] == ["Tumor"]
    assert old.contents_sha256() == new.contents_sha256() == new.recorded_contents
    assert old.recorded_contents == new.recorded_contents and old.problem() is None
