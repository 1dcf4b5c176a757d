"""The wsidicom backend on real DICOM WSI files (openslide-python's boxes conversion of
small.svs: a JPEG volume instance and an uncompressed thumbnail instance of one series)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from wsi_ssl.errors import UnsupportedSlideError
from wsi_ssl.slide import BACKENDS, WsiDicomReader, open_slide
from wsi_ssl.slide._wsidicom import series_files

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


def test_instances_without_image_type_are_refused_by_every_backend(series_dir: Path) -> None:
    """Known limit (issue 12): a conversion that omits ImageType (as some TCGA conversions
    do) is refused by openslide ("Couldn't get image flavor") and by wsidicom alike; the
    error lists both reasons and names the path."""
    for name in NAMES:
        dataset = pydicom.dcmread(series_dir / name)
        del dataset.ImageType
        dataset.save_as(series_dir / name)
    with pytest.raises(UnsupportedSlideError) as info:
        open_slide(series_dir / NAMES[0])
    assert "image flavor" in info.value.reasons["openslide"]
    assert "wsidicom" in info.value.reasons and str(series_dir / NAMES[0]) in str(info.value)
