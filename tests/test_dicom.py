"""The wsidicom backend on real DICOM WSI files (openslide-python's boxes conversion of
small.svs: a JPEG volume instance and an uncompressed thumbnail instance of one series; and a
series written here from CMU-1-Small-Region's pixels: three pyramid levels, a thumbnail, a
label and an overview)."""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

import wsi_ssl.tiling.source as source_module
from wsi_ssl.cli.main import main as cli_main
from wsi_ssl.config import TilingConfig
from wsi_ssl.errors import UnsupportedSlideError
from wsi_ssl.slide import BACKENDS, WsiDicomReader, open_slide, same_instance, series_files
from wsi_ssl.slide._dicom_flavour import InstanceHeader, infer_flavours
from wsi_ssl.storage import Archive, fingerprint_file, open_store, slide_id_from_fingerprint
from wsi_ssl.tiling.batch import tile_slide, tile_slides
from wsi_ssl.tiling.source import slide_fingerprint

NAMES = ("openslide-python_boxes_0.dcm", "openslide-python_boxes_1.dcm")


def copy_series(slides_dir: Path, folder: Path, names: Sequence[str] = NAMES) -> Path:
    """``folder`` (made) holding copies of the fixture instances ``names``, under their names
    (the one way the DICOM tests put ``.dcm`` files in a folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy(slides_dir / name, folder / name)
    return folder


@pytest.fixture
def series_dir(slides_dir: Path, tmp_path: Path) -> Path:
    """The two instances in a folder of their own (a copy under tmp_path)."""
    return copy_series(slides_dir, tmp_path / "series")


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


def test_info_on_a_series_folder_and_on_a_folder_of_slides(
    series_dir: Path, slides_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``info`` on a DICOM series folder describes that slide; on a folder of several slides
    it says so (it described whichever DICOM it found, a 16 x 16 one among six slides)."""
    assert cli_main(["info", str(series_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["dimensions"] == [16, 16]
    assert cli_main(["info", str(slides_dir)]) == 2
    err = capsys.readouterr().err
    assert f"{slides_dir}: holds " in err and "info describes one" in err, err


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


def test_one_instance_goes_by_its_sop_instance_uid(series_dir: Path, tmp_path: Path) -> None:
    """Two files are one instance where their SOPInstanceUID is the same (their bytes aside),
    two where it differs; a folder is none; files without the UID go by their bytes."""
    first, second = (series_dir / n for n in NAMES)
    assert not same_instance(first, second) and not same_instance(series_dir, first)
    resaved = pydicom.dcmread(first)
    resaved.SeriesDescription = "edited"
    resaved.save_as(tmp_path / "resaved.dcm")
    assert same_instance(first, tmp_path / "resaved.dcm")
    assert (tmp_path / "resaved.dcm").read_bytes() != first.read_bytes()
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"\x00" * 300)
    assert same_instance(junk, Path(shutil.copy(junk, tmp_path / "junk-copy.dcm")))
    assert not same_instance(junk, first)


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


# -- a series with a label, an overview and a thumbnail besides its levels -------------------

BASE_SPACING = 0.0005  # mm: 0.5 µm/px
BASE_SIDE = 512


def _instance(
    template: pydicom.Dataset, pixels: np.ndarray, tile: int, spacing: float, **attributes: Any
) -> pydicom.Dataset:
    """``template`` holding ``pixels`` (RGB, uncompressed) as TILED_FULL frames of ``tile`` px."""
    ds = copy.deepcopy(template)
    height, width = pixels.shape[:2]
    rows, columns = -(-height // tile), -(-width // tile)
    padded = np.zeros((rows * tile, columns * tile, 3), np.uint8)
    padded[:height, :width] = pixels
    frames = padded.reshape(rows, tile, columns, tile, 3).swapaxes(1, 2)
    ds.PixelData = np.ascontiguousarray(frames).tobytes()
    ds.NumberOfFrames, ds.Rows, ds.Columns = rows * columns, tile, tile
    ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows = width, height
    measures = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    measures.PixelSpacing = [spacing, spacing]
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for name, value in attributes.items():
        setattr(ds, name, value)
    return ds


def _series_instances(slides_dir: Path, cmu_small: Path) -> dict[str, pydicom.Dataset]:
    """Instances by the flavour they are, each with its ImageType; all in 256 px frames, so
    that wsidicom, reading them all as levels, would not leave any out for another tile size."""
    template = pydicom.dcmread(slides_dir / NAMES[1])  # uncompressed, explicit VR
    template.SeriesInstanceUID = pydicom.uid.generate_uid()
    with open_slide(cmu_small) as slide:
        base = slide.read_region((600, 300), 0, (BASE_SIDE, BASE_SIDE))
        label = slide.read_region((0, 0), 0, (120, 100))
        overview = slide.read_region((0, 0), 0, (300, 100))
    field = BASE_SIDE * BASE_SPACING
    volume = {"ImagedVolumeWidth": field, "ImagedVolumeHeight": field}
    levels = {
        f"level{i}": _instance(
            template,
            base[:: 2**i, :: 2**i],
            256,  # wsidicom wants one tile size in a pyramid
            BASE_SPACING * 2**i,
            ImageType=["DERIVED", "PRIMARY", "VOLUME", "NONE" if i == 0 else "RESAMPLED"],
            **volume,
        )
        for i in range(3)
    }
    shows_label = {"SpecimenLabelInImage": "YES", "BurnedInAnnotation": "YES"}
    return {
        **levels,
        "thumbnail": _instance(  # 100 px across 512: a scale of 5.12, no pyramid level
            template,
            base[::5, ::5][:100, :100],
            256,
            field / 100,
            ImageType=["DERIVED", "PRIMARY", "THUMBNAIL", "RESAMPLED"],
            **volume,
        ),
        "label": _instance(
            template, label, 256, 0.2, ImageType=["ORIGINAL", "PRIMARY", "LABEL", "NONE"],
            ImagedVolumeWidth=24.0, ImagedVolumeHeight=20.0, **shows_label
        ),
        "overview": _instance(
            template, overview, 256, 0.25,
            ImageType=["ORIGINAL", "PRIMARY", "OVERVIEW", "NONE"],
            ImagedVolumeWidth=75.0, ImagedVolumeHeight=25.0, **shows_label
        ),
    }  # fmt: skip


@pytest.fixture(scope="module")
def flavoured_series(
    tmp_path_factory: pytest.TempPathFactory, slides_dir: Path, cmu_small: Path
) -> tuple[Path, Path]:
    """The series written twice: with each instance's ImageType, and without any."""
    typed, untyped = tmp_path_factory.mktemp("typed"), tmp_path_factory.mktemp("untyped")
    for name, ds in _series_instances(slides_dir, cmu_small).items():
        ds.save_as(typed / f"{name}.dcm", enforce_file_format=True)
        del ds.ImageType
        ds.save_as(untyped / f"{name}.dcm", enforce_file_format=True)
    return typed, untyped


def test_untyped_label_overview_and_thumbnail_stay_out_of_the_pyramid(
    flavoured_series: tuple[Path, Path], cmu_small: Path
) -> None:
    """A series without ImageType opens as the same slide as with it: its levels are the three
    pyramid levels only, with the same pixels (CMU-1-Small-Region's), and the label, overview
    and thumbnail are read as such."""
    typed, untyped = flavoured_series
    with open_slide(typed) as reference, open_slide(untyped) as reader:
        assert reader.backend == reference.backend == "wsidicom"
        assert reference.properties["wsidicom.image-type-inferred"] == "0"
        assert reader.properties["wsidicom.image-type-inferred"] == "6"
        inferred = {k: v for k, v in reader.properties.items() if "inferred." in k}
        assert inferred == {
            "wsidicom.inferred.volume": "3",
            "wsidicom.inferred.thumbnail": "1",
            "wsidicom.inferred.label": "1",
            "wsidicom.inferred.overview": "1",
        }
        assert reader.level_dimensions == reference.level_dimensions == ((512, 512), (256, 256),
                                                                          (128, 128))  # fmt: skip
        assert reader.mpp == pytest.approx(0.5)
        for level in range(3):
            side = 512 >> level
            np.testing.assert_array_equal(
                reader.read_region((0, 0), level, (side, side)),
                reference.read_region((0, 0), level, (side, side)),
            )
        with open_slide(cmu_small) as source:
            np.testing.assert_array_equal(
                reader.read_region((0, 0), 0, (512, 512)),
                source.read_region((600, 300), 0, (512, 512)),
            )
        # the label and the overview are wsidicom's, as in the typed series
        label, overview = reader._slide.read_label(), reader._slide.read_overview()
        assert label.size == (120, 100) and overview.size == (300, 100)
        np.testing.assert_array_equal(np.asarray(label), np.asarray(reference._slide.read_label()))
        np.testing.assert_array_equal(
            np.asarray(overview), np.asarray(reference._slide.read_overview())
        )
    # the files on disk are not changed
    assert all("ImageType" not in pydicom.dcmread(p) for p in untyped.iterdir())
    assert not any(InstanceHeader.read(p).typed for p in untyped.iterdir())
    assert all(InstanceHeader.read(p).typed for p in typed.iterdir())


def _header(size: tuple[int, int], spacing: float | None, **fields: Any) -> InstanceHeader:
    values: dict[str, Any] = {
        "flavour": None,
        "imaged": None,
        "frame_of_reference": "1.2.3",
        "shows_label": False,
    }
    return InstanceHeader(
        size=size, spacing=None if spacing is None else (spacing, spacing), **(values | fields)
    )


def test_flavour_rules() -> None:
    """Each rule on its own: the label shown, another frame of reference, no extent, another
    extent, a power-of-two scale (by spacing or, without it, by size) or another scale."""
    base = _header((1000, 800), 0.0005)
    cases = {
        "base": (base, "VOLUME"),
        "half": (_header((500, 400), 0.001), "VOLUME"),
        "odd half, by size": (_header((501, 401), None, imaged=(0.5, 0.4)), "VOLUME"),
        "quarter, by size": (_header((250, 200), None, imaged=(0.5, 0.4)), "VOLUME"),
        "a scale of 3": (_header((333, 267), 0.0015), "THUMBNAIL"),
        "shows the label": (_header((500, 400), 0.001, shows_label=True), "LABEL"),
        "long, shows the label": (_header((900, 300), 0.001, shows_label=True), "OVERVIEW"),
        "other frame of reference": (_header((500, 400), 0.001, frame_of_reference="9"), "LABEL"),
        "no extent": (_header((300, 100), None), "OVERVIEW"),
        "other extent": (_header((500, 400), 0.01), "LABEL"),
    }
    headers = {Path(name): header for name, (header, _) in cases.items()}
    assert infer_flavours(headers) == {Path(name): want for name, (_, want) in cases.items()}
    # a typed VOLUME instance is the base; the typed ones get no flavour
    typed = _header((2000, 1600), 0.00025, flavour="VOLUME")
    assert infer_flavours({Path("typed"): typed, Path("b"): base}) == {Path("b"): "VOLUME"}
    # an ImageType of fewer than three values gives no flavour, and is never amended
    short = _header((500, 400), 0.001, typed=True)
    assert infer_flavours({Path("short"): short, Path("b"): base}) == {Path("b"): "VOLUME"}
    # with no base (all show the label), every one is a label or an overview
    label = _header((100, 100), None, shows_label=True)
    assert infer_flavours({Path("l"): label}) == {Path("l"): "LABEL"}


def test_a_series_tiled_with_the_old_fingerprint_is_found_again(
    series_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An archive tiled when a DICOM slide's fingerprint was its one file's (the folder's first
    .dcm) is resumed under that id, and re-tiled in place; never taken for another slide."""
    root = tmp_path / "root"
    config = TilingConfig(tile_size=16, tissue_threshold=0.0, codec="zstd")
    with monkeypatch.context() as old_way:  # what wsi-ssl computed then: fingerprint_file(path)
        old_way.setattr(source_module, "slide_fingerprint", fingerprint_file)
        [first] = tile_slides([series_dir], root, config, progress=False).outcomes
    legacy = fingerprint_file(series_dir / NAMES[0])
    legacy_id = slide_id_from_fingerprint(legacy)
    own_id = slide_id_from_fingerprint(slide_fingerprint(series_dir))
    assert first.status == "complete" and first.details["slide_id"] == legacy_id != own_id

    def stores() -> list[str]:
        return sorted(p.name for p in (root / "slides").iterdir())

    # a re-run, of the folder, its first file, or through the CLI, finds that store
    [again] = tile_slides([series_dir], root, config, progress=False).outcomes
    assert again.status == "skipped" and again.details["slide_id"] == legacy_id
    assert tile_slide(series_dir / NAMES[0], root, config).status == "skipped"
    assert tile_slide(series_dir, root, config).details["slide_id"] == legacy_id
    argv = ["tile", str(series_dir), "--out", str(root), "--tile-size", "16", "--quiet"]
    assert cli_main([*argv, "--tissue-threshold", "0", "--codec", "zstd"]) == 0
    assert stores() == [f"{legacy_id}.zarr"]
    assert Archive(root).catalog.get(legacy_id).status == "complete"  # type: ignore[union-attr]
    # other settings re-tile it in place, under its id
    retiled = tile_slide(series_dir, root, dataclasses.replace(config, codec="jpeg"))
    assert retiled.status == "complete" and retiled.details["slide_id"] == legacy_id
    store = open_store(root).slide(legacy_id)
    assert store.tiling["codec"] == "jpeg" and store.source["fingerprint"] == legacy
    assert stores() == [f"{legacy_id}.zarr"]
    # the file the old id hashed changed: another slide, a store of its own
    dataset = pydicom.dcmread(series_dir / NAMES[0])
    dataset.SeriesDescription = "edited"
    dataset.save_as(series_dir / NAMES[0])
    edited = tile_slide(series_dir, root, config)
    new_id = slide_id_from_fingerprint(slide_fingerprint(series_dir))
    assert edited.status == "complete" and edited.details["slide_id"] == new_id
    assert stores() == sorted([f"{legacy_id}.zarr", f"{new_id}.zarr"])


def test_an_old_id_recording_another_fingerprint_is_not_taken(
    series_dir: Path, tmp_path: Path
) -> None:
    """A catalog row under the old id whose fingerprint is not the file's: not this slide."""
    root = tmp_path / "root"
    legacy_id = slide_id_from_fingerprint(fingerprint_file(series_dir / NAMES[0]))
    Archive(root).catalog.upsert(
        slide_id=legacy_id,
        path=series_dir / NAMES[0],
        fingerprint="0" * 64,
        status="failed",
        n_tiles=None,
        error="another slide",
        tiling={},
    )
    config = TilingConfig(tile_size=16, tissue_threshold=0.0, codec="zstd")
    outcome = tile_slide(series_dir, root, config)
    own_id = slide_id_from_fingerprint(slide_fingerprint(series_dir))
    assert outcome.status == "complete" and outcome.details["slide_id"] == own_id
    assert Archive(root).catalog.get(legacy_id).fingerprint == "0" * 64  # type: ignore[union-attr]


def test_a_series_still_holds_its_slide_until_an_instance_changes(series_dir: Path) -> None:
    """Whether a tiled DICOM slide's file is still that slide (the viewer and search's
    changed-file note ask) goes by the series' fingerprint, from the folder or any of its
    files (one file's own fingerprint is not the slide's)."""
    from wsi_ssl.tiling.source import holds_slide, slide_fingerprint

    recorded = slide_fingerprint(series_dir)
    one = series_dir / NAMES[0]
    assert holds_slide(series_dir, recorded) and holds_slide(one, recorded)
    assert not holds_slide(one, fingerprint_file(one))
    with open(series_dir / NAMES[1], "ab") as f:
        f.write(b"\0")
    assert not holds_slide(series_dir, recorded) and not holds_slide(one, recorded)
    assert not holds_slide(series_dir / "gone.dcm", recorded)
