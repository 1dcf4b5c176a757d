"""Slide readers: one behaviour suite run per backend, plus the registry and the mpp chain."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
import tifffile

from wsi_ssl.cli.main import main as cli_main
from wsi_ssl.errors import (
    ConfigError,
    CorruptSlideError,
    MissingMppError,
    SlideNotFoundError,
    TruncatedSlideError,
    UnsupportedSlideError,
)
from wsi_ssl.slide import (
    BACKENDS,
    MPP_SOURCES,
    BaseSlideReader,
    OpenSlideReader,
    SlideReader,
    TiffSlideReader,
    open_slide,
    register_backend,
)
from wsi_ssl.slide._base import resolve_mpp, tiff_resolution_tags, to_rgb
from wsi_ssl.synthetic import write_synthetic_slide

SYNTHETIC_SIZE = (1536, 1100)

# Every fixture slide: (mpp, mpp_source) that every backend opening it must report.
SLIDE_MPP: dict[str, tuple[float | None, str | None]] = {
    "CMU-1-Small-Region.svs": (0.499, "vendor"),
    "small.svs": (0.499, "vendor"),
    "boxes.tiff": (None, None),  # 72 dpi resolution tags: 352.8 µm/px is rejected
    "test3-DAPI-2-387.ndpi": (0.22818, "vendor"),
    "small_vectra.qptiff": (0.49653, "tiff-resolution"),
    "openslide-python_boxes_0.dcm": (0.499, "vendor"),
    "openslide-python_boxes_1.dcm": (0.499, "vendor"),
}


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1536 x 1100 at 0.5 µm/px, two levels, JPEG tiles."""
    return write_synthetic_slide(
        tmp_path_factory.mktemp("slide") / "synthetic.tiff", SYNTHETIC_SIZE, seed=11
    )


@pytest.fixture(scope="session")
def synthetic_no_mpp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_slide(
        tmp_path_factory.mktemp("slide") / "no-mpp.tiff", (600, 400), mpp=None
    )


def _tiff_level(path: Path, level: int) -> np.ndarray:
    """A pyramid level decoded by tifffile: the reference the readers must reproduce."""
    with tifffile.TiffFile(path) as tif:
        return tif.pages[level].asarray()


class SlideReaderTests:
    """Behaviour every backend must show; subclassed once per backend."""

    reader_cls: type[BaseSlideReader]
    readable: frozenset[str]  # the fixture slides this backend opens
    refuses: frozenset[str]  # the broken files it refuses to open

    def test_registered_under_its_backend_name(self) -> None:
        assert BACKENDS[self.reader_cls.backend] is self.reader_cls

    def test_satisfies_protocol(self, synthetic: Path) -> None:
        with self.reader_cls(synthetic) as reader:
            assert isinstance(reader, SlideReader)
            assert reader.backend == self.reader_cls.backend
            assert reader.path == synthetic

    def test_geometry_consistent(self, slides_dir: Path) -> None:
        for name in sorted(self.readable):
            with self.reader_cls(slides_dir / name) as reader:
                assert reader.dimensions == reader.level_dimensions[0], name
                assert reader.level_count == len(reader.level_dimensions), name
                assert len(reader.level_downsamples) == reader.level_count, name
                assert reader.level_downsamples[0] == 1.0, name
                assert list(reader.level_downsamples) == sorted(reader.level_downsamples), name
                (w0, h0) = reader.dimensions
                for (w, h), ds in zip(
                    reader.level_dimensions, reader.level_downsamples, strict=True
                ):
                    assert min(w0 / w, h0 / h) - 0.01 <= ds <= max(w0 / w, h0 / h) + 0.01, name
                assert all(isinstance(v, str) for v in reader.properties.values()), name

    def test_synthetic_geometry(self, synthetic: Path) -> None:
        with self.reader_cls(synthetic) as reader:
            assert reader.dimensions == SYNTHETIC_SIZE
            assert reader.level_dimensions == ((1536, 1100), (768, 550))
            assert reader.level_downsamples == (1.0, 2.0)
            assert reader.vendor is None

    def test_read_region_matches_decoded_tiff(self, synthetic: Path) -> None:
        with self.reader_cls(synthetic) as reader:
            for level, (x, y), (w, h) in [(0, (300, 200), (256, 192)), (1, (600, 400), (100, 80))]:
                region = reader.read_region((x, y), level, (w, h))
                assert region.shape == (h, w, 3)
                assert region.dtype == np.uint8
                assert region.flags.c_contiguous
                ds = 2**level
                expected = _tiff_level(synthetic, level)[
                    y // ds : y // ds + h, x // ds : x // ds + w
                ]
                np.testing.assert_array_equal(region, expected)

    def test_read_region_real_slide(self, cmu_small: Path) -> None:
        with self.reader_cls(cmu_small) as reader:
            region = reader.read_region((1000, 1500), 0, (300, 200))
        expected = _tiff_level(cmu_small, 0)[1500:1700, 1000:1300]
        np.testing.assert_array_equal(region, expected)
        assert region.std() > 10  # real tissue, not a blank fill

    def test_outside_is_white(self, synthetic: Path) -> None:
        w, h = SYNTHETIC_SIZE
        level0 = _tiff_level(synthetic, 0)
        with self.reader_cls(synthetic) as reader:
            corner = reader.read_region((w - 100, h - 50), 0, (256, 256))
            np.testing.assert_array_equal(corner[:50, :100], level0[h - 50 :, w - 100 :])
            assert (corner[50:] == 255).all() and (corner[:, 100:] == 255).all()

            before = reader.read_region((-30, -20), 0, (100, 80))
            np.testing.assert_array_equal(before[20:, 30:], level0[:60, :70])
            assert (before[:20] == 255).all() and (before[:, :30] == 255).all()

            assert (reader.read_region((w + 10, 0), 0, (64, 64)) == 255).all()
            assert (reader.read_region((-500, -500), 1, (64, 64)) == 255).all()

            coarse = reader.read_region((w - 100, h - 100), 1, (128, 128))
            level1 = _tiff_level(synthetic, 1)
            np.testing.assert_array_equal(coarse[:50, :50], level1[-50:, -50:])
            assert (coarse[50:] == 255).all() and (coarse[:, 50:] == 255).all()

    def test_outside_is_white_at_non_integer_downsample(self, slides_dir: Path) -> None:
        with self.reader_cls(slides_dir / "boxes.tiff") as reader:
            assert reader.level_dimensions[2] == (75, 62)
            region = reader.read_region((200, 150), 2, (60, 60))
        assert region.shape == (60, 60, 3)
        # level-2 origin (49.8, 37.35) of a 75 x 62 level: from column 25, row 24 on is outside.
        assert (region[:, 25:] == 255).all() and (region[24:] == 255).all()
        assert (region[:24, :25] != 255).any()

    def test_empty_region(self, synthetic: Path) -> None:
        with self.reader_cls(synthetic) as reader:
            assert reader.read_region((0, 0), 0, (0, 5)).shape == (5, 0, 3)

    def test_invalid_arguments(self, synthetic: Path) -> None:
        with self.reader_cls(synthetic) as reader:
            with pytest.raises(ValueError, match="level must be in"):
                reader.read_region((0, 0), 2, (8, 8))
            with pytest.raises(ValueError, match="non-negative"):
                reader.read_region((0, 0), 0, (-1, 8))

    def test_thumbnail_keeps_aspect(self, cmu_small: Path) -> None:
        with self.reader_cls(cmu_small) as reader:
            thumb = reader.get_thumbnail((300, 300))
            full = reader.read_region((0, 0), 0, reader.dimensions)
        assert thumb.shape == (300, 224, 3)  # 2220 x 2967 scaled by 300 / 2967
        assert thumb.dtype == np.uint8
        np.testing.assert_allclose(thumb.mean(axis=(0, 1)), full.mean(axis=(0, 1)), atol=1.5)

    def test_thumbnail_from_coarser_level(self, synthetic: Path) -> None:
        with self.reader_cls(synthetic) as reader:
            thumb = reader.get_thumbnail((192, 192))
        assert thumb.shape == (138, 192, 3)
        level1 = _tiff_level(synthetic, 1).astype(np.float64)
        np.testing.assert_allclose(thumb.mean(axis=(0, 1)), level1.mean(axis=(0, 1)), atol=1.5)

    def test_thumbnail_never_enlarges(self, slides_dir: Path) -> None:
        with self.reader_cls(slides_dir / "small.svs") as reader:
            thumb = reader.get_thumbnail((64, 64))
            np.testing.assert_array_equal(thumb, reader.read_region((0, 0), 0, (16, 16)))

    def test_mpp_and_source(self, slides_dir: Path, synthetic: Path) -> None:
        for name in sorted(self.readable):
            mpp, source = SLIDE_MPP[name]
            with self.reader_cls(slides_dir / name) as reader:
                assert reader.mpp == pytest.approx(mpp, abs=1e-4), name
                assert reader.mpp_source == source, name
        with self.reader_cls(synthetic) as reader:
            assert reader.mpp == pytest.approx(0.5)
            assert reader.mpp_source == "tiff-resolution"
            assert reader.require_mpp() == pytest.approx(0.5)

    def test_missing_mpp_raises_unless_overridden(self, slides_dir: Path) -> None:
        boxes = slides_dir / "boxes.tiff"
        with self.reader_cls(boxes) as reader, pytest.raises(MissingMppError, match=r"boxes\.tiff"):
            reader.require_mpp()
        with self.reader_cls(boxes, mpp_override=0.7) as reader:
            assert (reader.mpp, reader.mpp_source) == (0.7, "override")

    def test_override_does_not_replace_recorded_mpp(self, cmu_small: Path) -> None:
        with self.reader_cls(cmu_small, mpp_override=0.7) as reader:
            assert (reader.mpp, reader.mpp_source) == (pytest.approx(0.499), "vendor")

    @pytest.mark.parametrize(
        ("downsample", "level"),
        [
            (0.5, 0),
            (1.0, 0),
            (1.99, 0),
            (2.0, 1),
            (4.0, 1),  # level 2 is 4.016: coarser than asked
            (4.0125, 2),  # within the 0.1 % tolerance of 4.016
            (8.07, 2),
            (8.09, 3),
            (100.0, 3),
        ],
    )
    def test_best_level_for_downsample(
        self, slides_dir: Path, downsample: float, level: int
    ) -> None:
        with self.reader_cls(slides_dir / "boxes.tiff") as reader:
            assert reader.level_downsamples == pytest.approx((1.0, 2.0, 4.016129, 8.086312))
            assert reader.best_level_for_downsample(downsample) == level

    def test_corrupt_pixels(self, broken_dir: Path) -> None:
        with self.reader_cls(broken_dir / "unreadable.svs") as reader:
            assert reader.dimensions == (16, 16)
            with pytest.raises(CorruptSlideError, match=r"unreadable\.svs") as info:
                reader.read_region((0, 0), 0, (16, 16))
        assert isinstance(info.value, OSError)
        # the backend's error is kept as the cause, or the stored tile is named; said once
        assert info.value.__cause__ is not None or "stored tile row 0" in str(info.value)
        assert str(info.value).count("cannot be read") == 1

    def test_broken_files(self, broken_dir: Path) -> None:
        for name in ("not-a-tiff.svs", "unopenable.tiff"):
            if name in self.refuses:
                with pytest.raises(UnsupportedSlideError) as info:
                    self.reader_cls(broken_dir / name)
                assert set(info.value.reasons) == {self.reader_cls.backend}
            else:
                with (
                    self.reader_cls(broken_dir / name) as reader,
                    pytest.raises(CorruptSlideError),
                ):
                    reader.read_region((0, 0), 0, (1, 1))

    def test_missing_file(self, tmp_path: Path) -> None:
        with pytest.raises(SlideNotFoundError, match=r"no-such\.svs") as info:
            self.reader_cls(tmp_path / "no-such.svs")
        assert isinstance(info.value, FileNotFoundError)

    def test_repr_and_close(self, cmu_small: Path) -> None:
        reader = self.reader_cls(cmu_small)
        text = repr(reader)
        assert type(reader).__name__ in text and "CMU-1-Small-Region.svs" in text
        assert "2220x2967" in text and "0.499 (vendor)" in text
        with reader:
            pass
        reader.close()  # closing twice is harmless


class TestOpenSlideReader(SlideReaderTests):
    reader_cls = OpenSlideReader
    readable = frozenset(SLIDE_MPP) - {"small_vectra.qptiff"}
    refuses = frozenset({"not-a-tiff.svs", "unopenable.tiff"})

    def test_ndpi_has_seven_levels(self, slides_dir: Path) -> None:
        with OpenSlideReader(slides_dir / "test3-DAPI-2-387.ndpi") as reader:
            assert reader.level_count == 7
            assert reader.vendor == "hamamatsu"

    def test_dicom_opens_from_either_file(self, slides_dir: Path) -> None:
        regions = []
        for name in ("openslide-python_boxes_0.dcm", "openslide-python_boxes_1.dcm"):
            with OpenSlideReader(slides_dir / name) as reader:
                assert reader.vendor == "dicom"
                regions.append(reader.read_region((0, 0), 0, (16, 16)))
        np.testing.assert_array_equal(*regions)
        assert regions[0].std() > 0


class TestTiffSlideReader(SlideReaderTests):
    reader_cls = TiffSlideReader
    readable = frozenset(SLIDE_MPP) - {
        "openslide-python_boxes_0.dcm",
        "openslide-python_boxes_1.dcm",
    }
    refuses = frozenset({"not-a-tiff.svs"})

    @pytest.mark.parametrize("name", ["CMU-1-Small-Region.svs", "boxes.tiff"])
    def test_stored_tile_reads_equal_tiffslides_own(self, slides_dir: Path, name: str) -> None:
        """Regions assembled from the stored tiles are pixel-identical to tiffslide's reads."""
        import tiffslide

        rng = np.random.default_rng(0)
        with TiffSlideReader(slides_dir / name) as reader:
            plain = tiffslide.TiffSlide(slides_dir / name)
            assert reader.stored_tiles(0) is not None
            for level, (lw, lh) in enumerate(reader.level_dimensions):
                ds = reader.level_downsamples[level]
                for _ in range(10):
                    x, y = int(rng.integers(0, lw - 1)), int(rng.integers(0, lh - 1))
                    w = int(rng.integers(1, min(500, lw - x) + 1))
                    h = int(rng.integers(1, min(500, lh - y) + 1))
                    location = (round(x * ds), round(y * ds))
                    ours = reader.read_region(location, level, (w, h))
                    theirs = plain.read_region(location, level, (w, h), as_array=True)
                    np.testing.assert_array_equal(ours, np.asarray(theirs)[..., :3])
            plain.close()

    def test_ndpi_has_four_levels(self, slides_dir: Path) -> None:
        with TiffSlideReader(slides_dir / "test3-DAPI-2-387.ndpi") as reader:
            assert reader.level_count == 4
            assert reader.vendor == "hamamatsu"

    def test_qptiff_channels_become_rgb(self, slides_dir: Path) -> None:
        path = slides_dir / "small_vectra.qptiff"
        with TiffSlideReader(path) as reader:
            region = reader.read_region((500, 400), 0, (300, 200))
        with tifffile.TiffFile(path) as tif:
            channels = tif.series[0].asarray()  # (3, 1440, 1920) fluorescence
        assert channels.shape == (3, 1440, 1920)
        assert region.shape == (200, 300, 3)
        np.testing.assert_array_equal(region, channels[:, 400:600, 500:800].transpose(1, 2, 0))


@pytest.mark.compat
@pytest.mark.parametrize("name", ["CMU-1-Small-Region.svs", "boxes.tiff", "small.svs"])
def test_level0_identical_between_backends(slides_dir: Path, name: str) -> None:
    with OpenSlideReader(slides_dir / name) as a, TiffSlideReader(slides_dir / name) as b:
        assert a.dimensions == b.dimensions
        np.testing.assert_array_equal(
            a.read_region((0, 0), 0, a.dimensions), b.read_region((0, 0), 0, b.dimensions)
        )


@pytest.mark.compat
def test_synthetic_levels_identical_between_backends(synthetic: Path) -> None:
    with OpenSlideReader(synthetic) as a, TiffSlideReader(synthetic) as b:
        for level, size in enumerate(a.level_dimensions):
            np.testing.assert_array_equal(
                a.read_region((-64, 0), level, size), b.read_region((-64, 0), level, size)
            )


# --- registry ----------------------------------------------------------------------------


def test_fallback_order() -> None:
    assert list(BACKENDS) == ["openslide", "tiffslide", "wsidicom"]
    assert MPP_SOURCES == ("vendor", "tiff-resolution", "objective-power", "override")


@pytest.mark.parametrize(
    ("name", "backend"),
    [
        ("CMU-1-Small-Region.svs", "openslide"),
        ("small.svs", "openslide"),
        ("boxes.tiff", "openslide"),
        ("test3-DAPI-2-387.ndpi", "openslide"),
        ("small_vectra.qptiff", "tiffslide"),  # openslide refuses QPTIFF
        ("openslide-python_boxes_0.dcm", "openslide"),
        ("openslide-python_boxes_1.dcm", "openslide"),
    ],
)
def test_open_slide_picks_first_backend_that_opens(
    slides_dir: Path, name: str, backend: str
) -> None:
    with open_slide(slides_dir / name) as reader:
        assert reader.backend == backend
        region = reader.read_region((0, 0), 0, (8, 8))
        assert region.shape == (8, 8, 3) and region.dtype == np.uint8


def test_open_slide_with_named_backend(cmu_small: Path, slides_dir: Path) -> None:
    with open_slide(cmu_small, backend="tiffslide") as reader:
        assert isinstance(reader, TiffSlideReader)
    with pytest.raises(UnsupportedSlideError) as info:
        open_slide(slides_dir / "small_vectra.qptiff", backend="openslide")
    assert list(info.value.reasons) == ["openslide"]


def test_open_slide_unknown_backend_lists_options(cmu_small: Path) -> None:
    with pytest.raises(ConfigError, match="openslide, tiffslide"):
        open_slide(cmu_small, backend="bioformats")


def test_open_slide_not_a_slide_reports_every_backend(broken_dir: Path) -> None:
    with pytest.raises(UnsupportedSlideError, match=r"not-a-tiff\.svs") as info:
        open_slide(broken_dir / "not-a-tiff.svs")
    assert list(info.value.reasons) == ["openslide", "tiffslide", "wsidicom"]
    assert "not a TIFF" in info.value.reasons["tiffslide"]


def test_open_slide_falls_back_then_read_fails(broken_dir: Path) -> None:
    with open_slide(broken_dir / "unopenable.tiff") as reader:
        assert reader.backend == "tiffslide"
        with pytest.raises(CorruptSlideError, match="52479"):
            reader.read_region((0, 0), 0, (1, 1))


def test_open_slide_corrupt_pixels(broken_dir: Path) -> None:
    with open_slide(broken_dir / "unreadable.svs") as reader:
        assert reader.backend == "openslide"
        with pytest.raises(CorruptSlideError):
            reader.read_region((0, 0), 0, (16, 16))


@pytest.mark.parametrize("kept", [0.5, 0.9])
def test_a_cut_short_tiff_is_refused_at_open(
    synthetic: Path, tmp_path: Path, kept: float, capsys: pytest.CaptureFixture[str]
) -> None:
    """An interrupted copy keeps the directory (both backends would open it and report its
    geometry) but loses the tiles at its end: refused at open, naming the file and sizes."""
    data = synthetic.read_bytes()
    cut = tmp_path / "cut.tiff"
    cut.write_bytes(data[: int(len(data) * kept)])
    with pytest.raises(TruncatedSlideError, match=r"cut\.tiff: the file is cut short") as info:
        open_slide(cut)
    assert f"the file has {cut.stat().st_size:,} bytes" in str(info.value)
    assert isinstance(info.value, CorruptSlideError) and info.value.path == cut
    assert cli_main(["info", str(cut)]) != 0
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"wsi-ssl: error: {cut}: the file is cut short")
    with open_slide(synthetic) as whole:  # the intact file opens as before
        assert whole.dimensions == SYNTHETIC_SIZE


def test_a_directory_tifffile_cannot_parse_is_left_to_the_backends(
    synthetic: Path, tmp_path: Path
) -> None:
    """The cut-short check never stands between a file and the backends: a second page whose
    tag count tifffile chokes on (a ValueError, not a TiffFileError) still opens with
    openslide, which reads the first page as before."""
    data = bytearray(synthetic.read_bytes())
    with tifffile.TiffFile(synthetic) as tif:
        second = tif.pages[1].offset
    data[second + 19] = 7  # the count of the page's second tag
    odd = tmp_path / "odd.tiff"
    odd.write_bytes(bytes(data))
    logging.getLogger("tifffile").setLevel(logging.CRITICAL)
    try:
        with tifffile.TiffFile(odd) as tif:
            [page.dataoffsets for page in tif.pages]
    except tifffile.TiffFileError:
        pytest.skip("this tifffile reports the damage as its own error")
    except ValueError:
        pass  # the case: tifffile raises something else while parsing
    else:
        pytest.skip("this tifffile parses the damaged directory")
    finally:
        logging.getLogger("tifffile").setLevel(logging.NOTSET)
    with open_slide(odd) as reader:
        assert reader.backend == "openslide"
        assert reader.read_region((0, 0), 0, (16, 16)).shape == (16, 16, 3)


def test_pyramid_levels_in_subifds_are_checked_and_tifffile_still_logs_after(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An OME-style pyramid keeps its levels as SubIFDs: losing their data is found too; and
    the check's quieting of tifffile ends with it (later problems are still logged)."""
    from wsi_ssl.slide._truncation import check_not_truncated

    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (1024, 1024, 3), dtype=np.uint8)
    whole = tmp_path / "pyramid.ome.tif"
    with tifffile.TiffWriter(whole, ome=True) as tif:
        tif.write(image, tile=(256, 256), subifds=2, compression="zlib")
        for k in (2, 4):
            tif.write(image[::k, ::k], tile=(256, 256), subfiletype=1, compression="zlib")
    with tifffile.TiffFile(whole) as tif:
        page = tif.pages[0]
        main_end = max(page.dataoffsets) + page.databytecounts[int(np.argmax(page.dataoffsets))]
    data = whole.read_bytes()
    assert main_end < len(data) - 5000  # the cut below loses only SubIFD (level) data
    cut = tmp_path / "cut.ome.tif"
    cut.write_bytes(data[:-5000])
    check_not_truncated(whole)
    with pytest.raises(TruncatedSlideError, match="the file is cut short"):
        check_not_truncated(cut)
    caplog.set_level(logging.WARNING, logger="tifffile")
    logging.getLogger("tifffile").error("a later problem")
    assert "a later problem" in caplog.text


def test_a_real_slide_cut_before_its_later_pages_is_refused(
    cmu_small: Path, tmp_path: Path
) -> None:
    """CMU-1-Small-Region cut at 1.4 of 1.94 MB keeps level 0 whole but loses the pages after
    it (the directory points past the end): it was tiled as complete, and once the copy was
    finished it became a second slide."""
    data = cmu_small.read_bytes()
    for keep in (1_400_000, 1_700_000):
        cut = tmp_path / f"cut-{keep}.svs"
        cut.write_bytes(data[:keep])
        with pytest.raises(TruncatedSlideError, match=r"page \d+ would start at byte [\d,]+, the"):
            open_slide(cut)
    with open_slide(cmu_small) as reader:  # the whole file opens
        assert reader.level_count >= 1


def test_open_slide_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SlideNotFoundError):
        open_slide(tmp_path / "missing.svs")


def test_override_chain_on_boxes(slides_dir: Path) -> None:
    with open_slide(slides_dir / "boxes.tiff", mpp_override=0.25) as reader:
        assert (reader.mpp, reader.mpp_source) == (0.25, "override")
        assert reader.require_mpp() == 0.25


def test_synthetic_without_mpp_requires_override(synthetic_no_mpp: Path) -> None:
    with open_slide(synthetic_no_mpp) as reader:
        assert (reader.mpp, reader.mpp_source) == (None, None)
        with pytest.raises(MissingMppError, match="mpp_override"):
            reader.require_mpp()
    with open_slide(synthetic_no_mpp, mpp_override=0.5) as reader:
        assert (reader.mpp, reader.mpp_source) == (0.5, "override")


@pytest.mark.parametrize("override", [0.0, -1.0, 500.0])
def test_implausible_override_rejected(cmu_small: Path, override: float) -> None:
    with pytest.raises(ConfigError, match="mpp_override"):
        open_slide(cmu_small, mpp_override=override)


def test_register_backend_refuses_duplicate_name() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_backend("openslide")(TiffSlideReader)
    assert BACKENDS["openslide"] is OpenSlideReader


# --- the mpp chain -----------------------------------------------------------------------

CM = {"tiff.ResolutionUnit": "centimeter"}


@pytest.mark.parametrize(
    ("properties", "vendor", "override", "expected"),
    [
        ({"openslide.mpp-x": "0.25"}, "aperio", None, (0.25, "vendor")),
        ({"aperio.MPP": "0.2520"}, "aperio", None, (0.252, "vendor")),
        ({"tiffslide.mpp-x": "0.23"}, "hamamatsu", 0.5, (0.23, "vendor")),
        # generic TIFF: the backends' mpp-x is derived from the tags, so the tags are the source
        ({"openslide.mpp-x": "0.5", "tiff.XResolution": "20000", **CM}, None, None, (0.5, "tiff-resolution")),
        ({"tiff.XResolution": "50800", "tiff.ResolutionUnit": "INCH"}, None, None, (0.5, "tiff-resolution")),
        ({"tiff.XResolution": "1", "tiff.ResolutionUnit": "none"}, None, None, (None, None)),
        # 72 dpi (352.8 µm/px) is not a physical scale: fall through to the objective
        ({"tiff.XResolution": "28.35", **CM, "openslide.objective-power": "40"}, None, None, (0.25, "objective-power")),
        ({"openslide.mpp-x": "352.8", "aperio.AppMag": "20"}, "aperio", None, (0.5, "objective-power")),
        ({"openslide.mpp-x": "n/a", "openslide.objective-power": "0"}, "aperio", None, (None, None)),
        ({"tiff.XResolution": "28.35", **CM}, None, 0.3, (0.3, "override")),
        ({}, None, None, (None, None)),
    ],
)  # fmt: skip
def test_resolve_mpp(
    properties: dict[str, str],
    vendor: str | None,
    override: float | None,
    expected: tuple[float | None, str | None],
) -> None:
    mpp, source = resolve_mpp(properties, vendor, override)
    assert (mpp, source) == (pytest.approx(expected[0]), expected[1])


def test_resolve_mpp_reads_tags_lazily() -> None:
    def tags() -> Mapping[str, str]:
        return {"tiff.XResolution": "40000", **CM}

    def unused() -> Mapping[str, str]:
        raise AssertionError("vendor mpp found: the file need not be read")

    assert resolve_mpp({}, None, None, tags) == (0.25, "tiff-resolution")
    assert resolve_mpp({"openslide.mpp-x": "0.5"}, "aperio", None, unused) == (0.5, "vendor")


def test_tiff_resolution_tags(synthetic: Path, synthetic_no_mpp: Path, broken_dir: Path) -> None:
    assert tiff_resolution_tags(synthetic) == {"tiff.XResolution": "20000.0", **CM}
    assert tiff_resolution_tags(synthetic_no_mpp)["tiff.ResolutionUnit"] == "none"
    assert tiff_resolution_tags(broken_dir / "not-a-tiff.svs") == {}


# --- pixel normalisation -----------------------------------------------------------------


def test_to_rgb_composites_alpha_over_white() -> None:
    rgba = np.array([[[10, 20, 30, 255], [10, 20, 30, 0], [0, 100, 200, 128]]], dtype=np.uint8)
    np.testing.assert_array_equal(
        to_rgb(rgba, alpha=True), [[[10, 20, 30], [255, 255, 255], [127, 177, 227]]]
    )


@pytest.mark.parametrize(
    ("pixels", "expected"),
    [
        (np.array([[7]], dtype=np.uint8), [[[7, 7, 7]]]),
        (np.array([[[7]]], dtype=np.uint8), [[[7, 7, 7]]]),
        (np.array([[[7, 9]]], dtype=np.uint8), [[[7, 9, 0]]]),
        (np.array([[[1, 2, 3, 4, 5]]], dtype=np.uint8), [[[1, 2, 3]]]),
        (np.array([[[1, 2, 3, 4]]], dtype=np.uint8), [[[1, 2, 3]]]),  # 4 channels, no alpha
        (np.array([[[0, 32768, 65535]]], dtype=np.uint16), [[[0, 128, 255]]]),
        (np.array([[[0.0, 0.5, 2.0]]], dtype=np.float32), [[[0, 128, 255]]]),
        (np.array([[True, False]]), [[[255, 255, 255], [0, 0, 0]]]),
    ],
)
def test_to_rgb_channels_and_dtypes(pixels: np.ndarray, expected: list[object]) -> None:
    rgb = to_rgb(pixels)
    assert rgb.dtype == np.uint8 and rgb.flags.c_contiguous
    np.testing.assert_array_equal(rgb, np.array(expected, dtype=np.uint8))
