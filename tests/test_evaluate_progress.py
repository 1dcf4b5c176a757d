"""`wsi-ssl evaluate` says what it is doing as it goes, on stderr: the tasks and encoders,
each task's summary line as soon as it is known, each encoder embedding (under the embed
job's progress bar, or an images bar for ``--patches``) and each encoder scored. It printed
nothing at all until the end. stdout keeps the report alone, the same with ``--quiet``,
which turns the bars off.

A real ``wsi-ssl`` process on four synthetic slides tiled at 64 px with per-tile labels and
a folder of labelled images; two seeds of the random-init CNN (resized to its input).
Lines are checked by their order against the bars, which the embedding writes while it
runs: a line written between two bars was written while the evaluation ran."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ENCODERS = [
    "random-cnn,resize=bilinear,label=first",
    "random-cnn,resize=bilinear,seed=1,label=second",
]
BAR = re.compile(r"\d+%\|")  # a tqdm bar: "embed random-cnn:  25%|██ | 48/192 [...]"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An archive of four synthetic slides tiled at 64 px, every tile labelled ``labels/bright``
    (paler than the median tile or not), nothing embedded; and a folder of 6 + 6 images."""
    import zarr

    from wsi_ssl.config import TilingConfig
    from wsi_ssl.storage import open_store
    from wsi_ssl.synthetic import write_synthetic_slide
    from wsi_ssl.tiling.batch import tile_slides

    base = tmp_path_factory.mktemp("evaluate-progress")
    paths = [write_synthetic_slide(base / f"s{i}.tiff", (512, 384), seed=i) for i in range(1, 5)]
    root = base / "archive"
    config = TilingConfig(tile_size=64, codec="zstd", tiles_per_chunk=16, tissue_threshold=0.0)
    assert not tile_slides(paths, root, config, progress=False).failed
    archive = open_store(root)
    means = {
        sid: np.asarray(archive.slide(sid).tiles[:]).mean(axis=(1, 2, 3))
        for sid in archive.slide_ids
    }
    median = np.median(np.concatenate(list(means.values())))
    for sid, mean in means.items():
        pale = (mean > median).astype(np.float32)
        group = zarr.open_group(archive.store_path(sid), mode="a")
        labels = group.require_group("labels").create_array(
            "bright", data=np.stack([1 - pale, pale], axis=1)
        )
        labels.attrs["classes"] = ["dark", "pale"]
    images = base / "images"
    rng = np.random.default_rng(0)
    for name, colour in (("glass", (240, 238, 242)), ("nuclei", (70, 40, 120))):
        (images / name).mkdir(parents=True)
        for i in range(6):
            noise = rng.integers(-12, 13, (32, 32, 3))
            pixels = np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(images / name / f"{i}.png")
    return root, images


def evaluate(inputs: tuple[Path, Path], folder: Path, *flags: str) -> tuple[str, list[str]]:
    """``wsi-ssl evaluate`` in its own process on a fresh copy of the archive (so that it
    embeds): stdout, and stderr split at every line end and carriage return (as a bar
    redraws itself), in the order written."""
    root = folder / "archive"
    shutil.copytree(inputs[0], root)
    argv = [sys.executable, "-m", "wsi_ssl.cli", "evaluate", "--patches", str(inputs[1])]
    argv += ["--root", str(root), "--tile-labels", "bright", "--out", str(folder / "out")]
    argv += ["--folds", "2", "--bootstrap", "20", *flags]
    for spec in ENCODERS:
        argv += ["--encoder", spec]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return done.stdout, [p for p in re.split(r"[\r\n]+", done.stderr) if p.strip()]


Run = tuple[str, list[str], Path]  # stdout, stderr's pieces, the folder it ran in


@pytest.fixture(scope="module")
def loud(inputs: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Run:
    folder = tmp_path_factory.mktemp("bars")
    return (*evaluate(inputs, folder), folder)


@pytest.fixture(scope="module")
def quiet(inputs: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Run:
    folder = tmp_path_factory.mktemp("quiet")
    return (*evaluate(inputs, folder, "--quiet"), folder)


def first(lines: list[str], pattern: str, after: int = -1) -> int:
    """The index of the first line after ``after`` that matches ``pattern``."""
    found = [i for i, line in enumerate(lines) if i > after and re.search(pattern, line)]
    assert found, f"no line after line {after} matches {pattern!r}: {lines}"
    return found[0]


@pytest.mark.slow
def test_steps_are_said_on_stderr_as_they_happen(loud: Run) -> None:
    stdout, err, folder = loud
    report = stdout.splitlines()
    patch_line, tile_line = report[0], report[1]
    assert patch_line == "task patch:images (patch): 12 items, 2 classes, 2 folds"
    assert tile_line.startswith("task tiles:bright (tiles): 192 items, 2 classes, 2 folds")
    assert len(err) > 4, f"stderr says nothing of the steps: {err}"
    # what is known before the work begins comes first (held until then: a refused run
    # says nothing but its error)
    assert (
        err[0] == "evaluating 2 encoder(s) on 2 task(s): patch:images (patch), tiles:bright (tiles)"
    )
    assert re.fullmatch(r"encoder first ready \(random-cnn-[0-9a-f]+\)", err[1])
    assert re.fullmatch(r"encoder second ready \(random-cnn-[0-9a-f]+\)", err[2])
    # the images: the task's line once they are read, then each encoder's line and its bar
    assert err[3] == patch_line
    at = 3
    for label in ("first", "second"):
        at = first(err, rf"^task patch:images: {label}: embedding 12 image\(s\)$", at)
        start = first(err, r"^embed random-cnn: +0%\|.* 0/12 ", at)
        assert start == at + 1
        at = first(err, r" 12/12 ", start)
    for label in ("first", "second"):
        at = first(err, rf"^task patch:images: {label}: scored \(knn and linear probes\)$", at)
    at = first(err, r"^task patch:images: 2 encoder\(s\) scored$", at)
    # the archive: the embed job's own bar (tiles) for each encoder, after the line saying so
    for label in ("first", "second"):
        at = first(err, rf"^task tiles:bright: {label}: embedding 4 slide\(s\) ", at)
        start = first(err, r"^embed random-cnn: +0%\|.* 0/192 ", at)
        assert start == at + 1
        at = first(err, r" 192/192 ", start)
    # the task's line, notes and all, once the embedding is done, before any probe
    at = first(err, rf"^{re.escape(tile_line)}$", at)
    for label in ("first", "second"):
        at = first(err, rf"^task tiles:bright: {label}: scored \(knn and linear probes\)$", at)
    assert err[at + 1 :] == ["task tiles:bright: 2 encoder(s) scored"]
    # stdout is the report alone
    assert not any(BAR.search(line) or "embedding" in line for line in report)
    assert report[-2:] == [f"wrote {folder / 'out' / f'evaluation.{x}'}" for x in ("json", "png")]


@pytest.mark.slow
def test_quiet_has_the_steps_and_no_bars_and_the_same_report(loud: Run, quiet: Run) -> None:
    stdout, err, folder = quiet
    loud_out, loud_err, loud_folder = loud
    assert err == [line for line in loud_err if not BAR.search(line)]
    assert not any("%|" in line or "/s]" in line for line in err)
    assert (
        "task tiles:bright: first: embedding 4 slide(s) (those embedded before are skipped)" in err
    )
    assert stdout == loud_out.replace(str(loud_folder), str(folder))
