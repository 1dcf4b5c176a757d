"""The wsidicom backend on real DICOM WSI files (openslide-python's boxes conversion of
small.svs: a JPEG volume instance and an uncompressed thumbnail instance of one series)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from wsi_ssl.cli.main import main as cli_main
from wsi_ssl.config import TilingConfig
from wsi_ssl.errors import UnsupportedSlideError
from wsi_ssl.slide import BACKENDS, WsiDicomReader, open_slide, series_files
from wsi_ssl.storage import fingerprint_file, open_store
from wsi_ssl.tiling.batch import tile_slide
from wsi_ssl.tiling.source import slide_fingerprint

NAMES = ("openslide-python_boxes_0.dcm", "openslide-python_boxes_1.dcm")


@pytest.fixture
def series_dir(slides_dir: Path, tmp_path: Path) -> Path:
    """The two instances in a folder of their own (a copy under tmp_path)."""
    folder = tmp_path / "series"
    folder.mkdir()
    for name in NAMES:
        shutil.copy(slides_dir / name, folder / name)
    return folder


def test_registered_after_openslide_and_tiffslide() -> None:
    assert list(BACKENDS)[-1] == "wsidicom" and BACKENDS["wsidicom"] is WsiDicomReader


def test_folder_of_instances_falls_back_to_wsidicom(series_dir: Path, slides_dir: Path) -> None:
    """openslide and tiffslide refuse a folder; wsidicom opens it, with the geometry, scale
    and pixels openslide gives for one of its files."""
    for backend in ("openslide", "tiffslide"):
        with pytest.raises(UnsupportedSlideError):
            open_slide(series_dir, backend=backend)
    with open_slide(series_dir) as reader, open_slide(slides_dir / NAMES[0]) as reference:
        assert reader.backend == "wsidicom" and reference.backend == "openslide"
        assert reader.level_dimensions == reference.level_dimensions == ((16, 16),)
        assert reader.mpp == pytest.approx(reference.mpp) == pytest.approx(0.499)
        assert reader.mpp_source == "vendor" and reader.vendor == "dicom"
        for location, size in [((0, 0), (16, 16)), ((3, 5), (9, 7)), ((-4, 10), (12, 12))]:
            region = reader.read_region(location, 0, size)
            assert region.shape == (size[1], size[0], 3) and region.dtype == np.uint8
            np.testing.assert_array_equal(region, reference.read_region(location, 0, size))
        assert reader.read_region((0, 0), 0, (16, 16)).std() > 0
        np.testing.assert_array_equal(reader.get_thumbnail((8, 8)), reference.get_thumbnail((8, 8)))


def test_one_file_finds_its_series(slides_dir: Path, series_dir: Path, tmp_path: Path) -> None:
    assert series_files(series_dir / NAMES[1]) == [series_dir / n for n in NAMES]
    # a file of another series beside them is left out
    other = pydicom.dcmread(series_dir / NAMES[0])
    other.SeriesInstanceUID = pydicom.uid.generate_uid()
    other.save_as(series_dir / "other.dcm")
    assert series_files(series_dir / NAMES[0]) == [series_dir / n for n in NAMES]
    with WsiDicomReader(series_dir / NAMES[1]) as reader:
        assert reader.properties["wsidicom.files"] == "2"
        np.testing.assert_array_equal(
            reader.read_region((0, 0), 0, (16, 16)),
            open_slide(slides_dir / NAMES[0]).read_region((0, 0), 0, (16, 16)),
        )


def test_refusals_are_typed(tmp_path: Path, slides_dir: Path, cmu_small: Path) -> None:
    with pytest.raises(UnsupportedSlideError, match=r"not a \.dcm file") as info:
        WsiDicomReader(cmu_small)
    assert list(info.value.reasons) == ["wsidicom"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(UnsupportedSlideError, match=r"no \.dcm file"):
        open_slide(tmp_path / "empty", backend="wsidicom")
    (tmp_path / "junk.dcm").write_bytes(b"\x00" * 300)
    with pytest.raises(UnsupportedSlideError) as info:
        open_slide(tmp_path / "junk.dcm")
    assert list(info.value.reasons) == ["openslide", "tiffslide", "wsidicom"]


def _drop_image_type(folder: Path) -> None:
    """Rewrite the instances without ``ImageType``, as TCGA's conversions are."""
    for name in NAMES:
        dataset = pydicom.dcmread(folder / name)
        del dataset.ImageType
        dataset.save_as(folder / name)


def test_instances_without_image_type_open_with_wsidicom(
    series_dir: Path, slides_dir: Path
) -> None:
    """openslide refuses such a series ("Couldn't get image flavor"); wsidicom opens it,
    reading the instances as the pyramid's levels, with openslide's pixels for the original."""
    _drop_image_type(series_dir)
    with pytest.raises(UnsupportedSlideError, match="image flavor"):
        open_slide(series_dir / NAMES[0], backend="openslide")
    reference = open_slide(slides_dir / NAMES[0])
    for path in (series_dir, series_dir / NAMES[0]):
        with open_slide(path) as reader:
            assert reader.backend == "wsidicom" and reader.level_dimensions == ((16, 16),)
            assert reader.mpp == pytest.approx(0.499) and reader.mpp_source == "vendor"
            assert reader.properties["wsidicom.image-type-inferred"] == "2"
            for location, size in [((0, 0), (16, 16)), ((3, 5), (9, 7))]:
                np.testing.assert_array_equal(
                    reader.read_region(location, 0, size), reference.read_region(location, 0, size)
                )
    reference.close()
    # the files on disk are not changed
    assert all("ImageType" not in pydicom.dcmread(series_dir / n) for n in NAMES)
    with WsiDicomReader(series_dir) as direct:
        assert direct.read_region((0, 0), 0, (16, 16)).std() > 0


def test_a_dicom_folder_is_tiled_end_to_end(
    series_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``wsi-ssl tile`` on a folder of instances without ImageType; the slide id is the
    series' (the folder, or any of its files, give the same), and the tiles are the pixels."""
    _drop_image_type(series_dir)
    root = tmp_path / "root"
    argv = ["tile", str(series_dir), "--out", str(root), "--tile-size", "16"]
    assert cli_main([*argv, "--tissue-threshold", "0", "--codec", "zstd", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["complete"] == 1 and summary["tiles"] == 1
    [outcome] = summary["slides"]
    store = open_store(root).slide(outcome["slide_id"])
    assert store.source["reader"] == "wsidicom" and store.source["mpp"] == pytest.approx(0.499)
    with open_slide(series_dir) as reader:
        np.testing.assert_array_equal(store.tiles[0], reader.read_region((0, 0), 0, (16, 16)))
    # the folder itself, through the API: the same slide, already complete
    config = TilingConfig(tile_size=16, tissue_threshold=0.0, codec="zstd")
    again = tile_slide(series_dir, root, config)
    assert again.status == "skipped" and again.details["slide_id"] == outcome["slide_id"]
    fingerprint = slide_fingerprint(series_dir)
    assert slide_fingerprint(series_dir / NAMES[1]) == fingerprint
    assert fingerprint not in {fingerprint_file(series_dir / n) for n in NAMES}
    # changing any instance of the series changes the slide
    dataset = pydicom.dcmread(series_dir / NAMES[1])
    dataset.SeriesDescription = "edited"
    dataset.save_as(series_dir / NAMES[1])
    assert slide_fingerprint(series_dir) != fingerprint
