"""Bad input stops at the door, and memory stays bounded whatever the file (issue 10, 4/7/8)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import run_cli

import wsi_ssl.slide._base as slide_base
from wsi_ssl.config import TilingConfig
from wsi_ssl.errors import ConfigError, CorruptSlideError
from wsi_ssl.slide import open_slide
from wsi_ssl.synthetic import write_synthetic_slide
from wsi_ssl.tiling.batch import tile_slide


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1024 x 768 synthetic slide at 0.5 µm/px (YCbCr JPEG tiles of 256 px)."""
    return write_synthetic_slide(tmp_path_factory.mktemp("small") / "s.tiff", (1024, 768), seed=4)


def write_single_level_tiff(path: Path, size: int, tile: int = 512) -> Path:
    """A ``size`` x ``size`` single-level tiled JPEG TIFF at 0.5 µm/px, cheap to make: a
    pink square of "tissue" tiles in the middle of glass tiles, each encoded once."""
    pink = np.full((tile, tile, 3), (206, 104, 160), dtype=np.uint8)
    glass = np.full((tile, tile, 3), (241, 240, 242), dtype=np.uint8)
    n = size // tile

    def tiles():  # type: ignore[no-untyped-def]
        for row in range(n):
            for col in range(n):
                yield pink if n // 4 <= row < 3 * n // 4 and n // 4 <= col < 3 * n // 4 else glass

    tifffile.imwrite(
        path,
        tiles(),
        shape=(size, size, 3),
        dtype=np.uint8,
        tile=(tile, tile),
        photometric="rgb",
        compression="jpeg",
        resolution=(2e4, 2e4),
        resolutionunit="CENTIMETER",
        bigtiff=True,
    )
    return path


# -- limits (case 8) -----------------------------------------------------------------------


def test_tile_size_over_the_limit_names_the_parameter() -> None:
    with pytest.raises(ConfigError, match=r"tile_size 8192 is over max_tile_size=4096.*raise max"):
        TilingConfig(tile_size=8192)
    assert TilingConfig(tile_size=8192, max_tile_size=8192).tile_size == 8192
    assert "max_tile_size" not in TilingConfig().output_key()  # limits never change tiles


def test_upsampling_beyond_2x_is_refused_unless_allowed(tmp_path: Path, small: Path) -> None:
    with pytest.raises(ConfigError, match=r"enlarges .* 250x.*allow_upsampling=True") as info:
        tile_slide(small, tmp_path / "a", TilingConfig(mpp=0.002))
    assert "--" not in str(info.value)  # the API's words; the CLI adds its flags
    assert info.value.parameters == ("mpp", "allow_upsampling")
    assert not (tmp_path / "a" / "slides").exists() or not any(
        (tmp_path / "a" / "slides").iterdir()
    )
    ok = tile_slide(small, tmp_path / "b", TilingConfig(mpp=0.25, tissue_threshold=0.0))
    assert ok.status == "complete"  # 2x is allowed
    allowed = TilingConfig(mpp=0.2, tissue_threshold=0.0, allow_upsampling=True)
    assert tile_slide(small, tmp_path / "c", allowed).status == "complete"


def test_plans_over_max_tiles_are_refused(tmp_path: Path, small: Path) -> None:
    # 1024 x 768 at 0.5 µm/px with 16 px tiles: 64 x 48 = 3072 tiles
    with pytest.raises(ConfigError, match=r"plans 3,072 tiles \(48 x 64\).*max_tiles=3000"):
        tile_slide(small, tmp_path, TilingConfig(tile_size=16, max_tiles=3000))


def test_cli_refuses_with_one_line_and_the_flags_allow(tmp_path: Path, small: Path) -> None:
    out = str(tmp_path / "out")
    code, _, err = run_cli(["tile", str(small), "--out", out, "--mpp", "0.002", "--quiet"])
    assert code == 1 and "mpp=0.002 enlarges" in err and "set --allow-upsampling to" in err
    assert err.rstrip().endswith("(command line: --mpp)")  # the advised switch is spelled
    code, _, err = run_cli(["tile", str(small), "--out", out, "--tile-size", "5000"])
    assert code == 2 and err.count("\n") == 1 and "--max-tile-size" in err
    args = ["tile", str(small), "--out", out, "--quiet", "--tissue-threshold", "0"]
    code, _, err = run_cli([*args, "--tile-size", "16", "--max-tiles", "100"])
    assert code == 1 and "more than max_tiles=100; check mpp" in err, err
    assert err.rstrip().endswith("(command line: --mpp, --tile-size, --max-tiles)")
    code, _, _ = run_cli([*args, "--mpp", "0.2", "--allow-upsampling"])
    assert code == 0


# -- pass-through JPEG headers (case 7) ----------------------------------------------------


def _craft_sof(slide: Path, width: int, height: int, components: int | None = None) -> None:
    """Rewrite the frame header (SOF0) of stored tile (0, 0) of level 0 in place."""
    with tifffile.TiffFile(slide) as tif:
        page = tif.pages.first
        offset, count = page.dataoffsets[0], page.databytecounts[0]
    data = bytearray(slide.read_bytes())
    sof = data.index(b"\xff\xc0", offset, offset + count)
    data[sof + 5 : sof + 7] = height.to_bytes(2, "big")
    data[sof + 7 : sof + 9] = width.to_bytes(2, "big")
    if components is not None:
        data[sof + 9] = components
    slide.write_bytes(bytes(data))


@pytest.mark.parametrize("codec", ["jpeg", "zstd"])
def test_crafted_jpeg_header_is_refused_and_never_stored(tmp_path: Path, codec: str) -> None:
    """A tile whose SOF claims 65535 x 65535 px: neither copied (jpeg store) nor decoded
    (zstd store); a typed error names the slide and the tile, and no store is left."""
    slide = write_synthetic_slide(tmp_path / "crafted.tiff", (1024, 768), seed=4)
    _craft_sof(slide, 65535, 65535)
    root = tmp_path / codec
    with pytest.raises(CorruptSlideError, match=r"crafted\.tiff.*row 0, column 0.*65535x65535"):
        tile_slide(slide, root, TilingConfig(codec=codec, tissue_threshold=0.0))
    assert list((root / "slides").iterdir()) == []
    argv = ["tile", str(slide), "--out", str(root), "--quiet", "--tissue-threshold", "0"]
    code, _, err = run_cli([*argv, "--codec", codec])
    assert code == 1 and err.count("\n") == 1 and "65535x65535" in err
    assert list((root / "slides").iterdir()) == []


def test_jpeg_header_with_wrong_components_is_refused(tmp_path: Path) -> None:
    slide = write_synthetic_slide(tmp_path / "grey.tiff", (1024, 768), seed=4)
    _craft_sof(slide, 256, 256, components=1)
    with open_slide(slide, backend="tiffslide") as reader:
        stored = reader.stored_tiles(0)
        assert stored is not None
        with pytest.raises(CorruptSlideError, match="256x256 with 1 components"):
            stored.jpeg(0, 0)
        stream, markers = stored.jpeg(0, 1)  # the other tiles are fine
        assert stream.startswith(b"\xff\xd8") and 0xC0 in markers


# -- bounded memory (case 4) ---------------------------------------------------------------


def test_block_thumbnail_matches_the_whole_level_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    slide = write_synthetic_slide(tmp_path / "flat.tiff", (3000, 2000), n_levels=1, seed=6)
    with open_slide(slide, backend="tiffslide") as reader:
        whole = reader.get_thumbnail((300, 300))
        monkeypatch.setattr(slide_base, "THUMBNAIL_WHOLE_LEVEL_PIXELS", 0)
        monkeypatch.setattr(slide_base, "THUMBNAIL_BLOCK", 256)  # 10 x 10 px blocks
        blocks = reader.get_thumbnail((300, 300))
    assert blocks.shape == whole.shape == (200, 300, 3)
    assert np.abs(blocks.astype(int) - whole.astype(int)).mean() < 2.0


# the peak RSS of this process image (VmHWM): ru_maxrss would carry the peak of the forking
# parent (pytest) across fork and exec
_MEASURE = """
import json, re, sys
from wsi_ssl.tiling.source import open_for_tiling, thumbnail_and_mask
def peak_kib():
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\\s+(\\d+) kB", f.read()).group(1))
with open_for_tiling(sys.argv[1], None) as reader:
    before = peak_kib()
    thumbnail, mask = thumbnail_and_mask(reader, reader.require_mpp(), 8.0)
    after = peak_kib()
    print(json.dumps({"before_kib": before, "after_kib": after, "levels": reader.level_count,
                      "thumbnail": list(thumbnail.shape), "tissue": float(mask.mean())}))
"""


@pytest.mark.slow
def test_single_level_slide_thumbnail_in_bounded_memory(tmp_path: Path) -> None:
    """A 16,384² single-level TIFF (768 MiB of pixels): thumbnail and tissue mask in a fresh
    process grow its peak RSS by far less than the level (the issue measured 2.0 GB)."""
    slide = write_single_level_tiff(tmp_path / "flat.tiff", 16384)
    done = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(slide)], capture_output=True, text=True, check=True
    )
    result = json.loads(done.stdout)
    assert result["levels"] == 1 and result["thumbnail"] == [1024, 1024, 3]
    assert 0.2 < result["tissue"] < 0.3  # the pink middle quarter
    level_mib = 16384 * 16384 * 3 / 2**20
    growth_mib = (result["after_kib"] - result["before_kib"]) / 1024
    assert growth_mib < level_mib / 4, result
    assert result["after_kib"] / 1024 < 1024, result


@pytest.mark.parametrize("mpps", [None, [0.5, 1.0]])
def test_an_output_folder_that_is_a_file_is_refused_before_any_slide(
    tmp_path: Path, mpps: list[float] | None
) -> None:
    """``--out`` naming a file, with one scale or several (each under the output folder),
    is one error before any slide, and the file is left as it was."""
    from wsi_ssl.tiling.batch import tile_slides

    slide = write_synthetic_slide(tmp_path / "s.tiff", (600, 500), seed=1)
    out = tmp_path / "notes.txt"
    out.write_text("mine")
    with pytest.raises(ConfigError, match=r"notes\.txt: is a file; the archive root must be"):
        tile_slides([slide], out, TilingConfig(), mpps=mpps, progress=False)
    assert out.read_text() == "mine"


def test_a_re_tile_says_why(tmp_path: Path) -> None:
    """A store redone is reported with its reason: the settings that changed (old -> new),
    or resume off; an unchanged one is skipped without any."""
    slide = write_synthetic_slide(tmp_path / "s.tiff", (900, 700), seed=1)
    argv = ["tile", str(slide), "--out", str(tmp_path / "root"), "--tile-size", "128", "--quiet"]
    assert run_cli(argv)[0] == 0
    code, out, err = run_cli([*argv, "--tissue-threshold", "0.2", "--json"])
    [outcome] = json.loads(out)["slides"]
    assert code == 0 and outcome["status"] == "complete", err
    assert outcome["retiled_because"] == "settings changed: tissue_threshold 0.1 -> 0.2"
    code, out, _ = run_cli([*argv, "--tissue-threshold", "0.2"])
    assert code == 0 and f"{slide}: re-tiled" not in out and "1 already complete" in out
    code, out, _ = run_cli([*argv, "--tissue-threshold", "0.2", "--no-resume"])
    assert code == 0 and f"{slide}: re-tiled: resume off" in out
    code, out, _ = run_cli([*argv, "--tissue-threshold", "0.2", "--qc-min-focus", "50"])
    assert code == 0 and ": re-tiled" not in out
    assert f"{slide}: QC thresholds updated, tiles kept: qc_min_focus 200.0 -> 50.0" in out
    code, out, _ = run_cli([*argv, "--tissue-threshold", "0.2", "--qc-min-focus", "50", "--no-qc"])
    assert code == 0 and f"{slide}: re-tiled: settings changed: qc True -> False" in out
