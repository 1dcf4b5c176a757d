"""Walkthrough fixes: a missing scale's advice in each command's own words, a magnification
refusal worded with `wsi-ssl tile`'s flags, an export whose only store is damaged, the demo
saying it writes its slides before it does, and `encoders PATTERN` matching nothing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli

from wsi_ssl.config import TilingConfig
from wsi_ssl.demo import DEMO_SLIDES, run_demo
from wsi_ssl.encoders import list_encoders, register_encoder
from wsi_ssl.encoders._builtin import SmallCNN
from wsi_ssl.synthetic import write_synthetic_slide
from wsi_ssl.testing.bags import write_bag_store
from wsi_ssl.tiling.batch import tile_slides

AT_40X = "walk-b-cnn-40x"  # a CNN trained at 0.25 µm/px; the archives here are at 0.5
if AT_40X not in list_encoders():
    register_encoder(
        AT_40X, arch="builtin/small_cnn", input_size=224, embed_dim=64, source="random", mpp=(0.25,)
    )(lambda config: SmallCNN())


def _error_line(err: str) -> str:
    [line] = [x for x in err.splitlines() if x.startswith("wsi-ssl: error: ")]
    return line


def test_a_missing_scale_names_only_the_running_commands_ways(
    slides_dir: Path, tmp_path: Path
) -> None:
    """boxes.tiff records no usable scale: tile names its --mpp-override and --mpp-csv, demo
    (no --mpp-csv) only its --mpp-override, Python only the API (it mixed both everywhere)."""
    boxes = slides_dir / "boxes.tiff"
    code, _, err = run_cli(["tile", str(boxes), "--out", str(tmp_path / "t"), "--quiet"])
    line = _error_line(err)
    assert code == 1 and line.endswith(
        "; set it with --mpp-override MPP, or give each slide's scale "
        "(pass --mpp-csv FILE of slide,mpp rows)"
    ), line
    assert "mpp_override" not in line and "tile_slides" not in line
    code, out, _ = run_cli(["demo", str(boxes), "--out", str(tmp_path / "d"), "--quiet"])
    [failed] = [x for x in out.splitlines() if x.lstrip().startswith("FAILED")]
    assert code == 1 and failed.endswith("; set it with --mpp-override MPP"), failed
    [outcome] = tile_slides([boxes], tmp_path / "py", TilingConfig(), progress=False).failed
    assert outcome.error.endswith(
        "; set it with mpp_override=MPP, or give each slide's scale "
        "(pass mpp_overrides={name: MPP} to tile_slides)"
    )
    assert "--" not in outcome.error


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Four small synthetic slides tiled at 224 px, 0.5 µm/px, and a retrieval labels CSV."""
    base = tmp_path_factory.mktemp("at20x")
    paths = [write_synthetic_slide(base / f"s{i}.tiff", (500, 450), seed=i) for i in range(4)]
    config = TilingConfig(tile_size=224, codec="zstd", tissue_threshold=0.0)
    assert not tile_slides(paths, base / "root", config, progress=False).failed
    labels = base / "labels.csv"
    labels.write_text("slide,label\ns0.tiff,a\ns1.tiff,a\ns2.tiff,b\ns3.tiff,b\n")
    return base / "root", labels


TILE_ADVICE = "re-tile with --tile-size 224 and --mpp 0.25, or pass --no-mpp-check"


def test_a_magnification_refusal_names_the_tile_flags(
    archive: tuple[Path, Path], tmp_path: Path
) -> None:
    """Tiles at 0.5 µm/px for an encoder trained at 0.25: embed and evaluate advise the
    re-tile as `wsi-ssl tile`'s flags (they said ``re-tile at mpp=0.25 with tile_size=224``)."""
    root, labels = archive
    argv = ["embed", str(root), "--encoder", AT_40X, "--device", "cpu", "--workers", "0"]
    code, out, err = run_cli([*argv, "--quiet"])
    assert code == 1 and out.count("MagnificationMismatchError: ") == 4, out
    lines = err.splitlines()  # one per slide
    assert len(lines) == 4 and all(x.startswith("wsi-ssl: error: ") for x in lines), err
    assert all(TILE_ADVICE in x for x in lines) and "tile_size=" not in err and "mpp=" not in err
    argv = ["evaluate", "--encoder", AT_40X, "--root", str(root), "--retrieval-labels"]
    argv += [str(labels), "--mmv-k", "1", "--bootstrap", "0", "--out", str(tmp_path / "e")]
    code, out, err = run_cli([*argv, "--quiet"])
    line = _error_line(err)
    assert code == 2 and "MagnificationMismatchError" in line, err
    assert TILE_ADVICE in line and "tile_size=" not in line and "mpp=" not in line, line


def test_export_of_an_archive_whose_only_store_is_damaged_says_so(tmp_path: Path) -> None:
    """No usable store: the refusal names the damaged store and `wsi-ssl check ROOT` (it said
    to run `wsi-ssl embed`, which cannot help)."""
    root = tmp_path / "my archive"
    sid = "aa" + "0" * 14
    write_bag_store(root, sid, np.random.default_rng(0).random((5, 8)), encoder_id="enc-x")
    store = root / "slides" / f"{sid}.zarr"
    (store / "zarr.json").write_text('{"cut')
    for encoder in ([], ["--encoder", "enc-x"]):
        argv = ["export", str(root), "--out", str(tmp_path / "out"), *encoder, "--quiet"]
        code, _, err = run_cli(argv)
        line = _error_line(err)
        assert code == 2 and line.endswith(
            f"its one slide store is damaged ({store}); `wsi-ssl check '{root}'` prints the "
            "tile command that redoes it"
        ), line
        assert "wsi-ssl embed" not in line


def test_the_demo_says_it_writes_its_slides_before_writing_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The demo's first line comes before the slides it writes (it was silent while it wrote
    them, ~25 s on a fresh folder); --quiet (no progress) shows no bar. Here all but one slide
    are already there, so one is written."""
    out = tmp_path / "demo"
    for seed in range(1, DEMO_SLIDES):
        write_synthetic_slide(out / "slides" / f"demo-{seed}.tiff", (300, 300), seed=seed)
    first = out / "slides" / "demo-0.tiff"
    said: list[tuple[str, bool]] = []

    class Seen(Exception):
        pass

    def echo(line: str) -> None:
        said.append((line, first.exists()))
        if line == "== tile":
            raise Seen

    with pytest.raises(Seen):
        run_demo(out, progress=False, echo=echo)
    assert said == [("== slides: writing 1 synthetic slide", False), ("== tile", True)]
    assert capsys.readouterr().err == ""


def test_an_encoders_pattern_matching_none_is_refused() -> None:
    """`wsi-ssl encoders zzz` printed an empty table and exited 0."""
    for json in ([], ["--json"]):
        code, out, err = run_cli(["encoders", "zzz", *json])
        assert code == 2 and out == "", out
        assert _error_line(err).startswith(
            "wsi-ssl: error: no registered encoder name contains 'zzz' (case matters); registered: "
        )
        assert "random-cnn" in err
    code, out, _ = run_cli(["encoders", "random-cnn"])
    assert code == 0 and out.splitlines()[1].startswith("random-cnn ")
