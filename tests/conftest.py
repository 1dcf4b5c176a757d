"""Shared fixtures: the real fixture slides in ../shared/fixtures and generated pyramidal TIFFs."""

from __future__ import annotations

import contextlib
import io
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from wsi_ssl.cli.main import main as cli_main
from wsi_ssl.storage import open_store

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """`../shared/fixtures`, or a clean skip when this clone has none beside it."""
    if not (FIXTURES / "slides").is_dir():
        pytest.skip(f"real fixture slides not found at {FIXTURES}")
    return FIXTURES


@pytest.fixture(scope="session")
def slides_dir(fixtures_dir: Path) -> Path:
    return fixtures_dir / "slides"


@pytest.fixture(scope="session")
def broken_dir(fixtures_dir: Path) -> Path:
    return fixtures_dir / "broken"


@pytest.fixture(scope="session")
def patches_dir(fixtures_dir: Path) -> Path:
    return fixtures_dir / "patches" / "histolab_tiles"


@pytest.fixture(scope="session")
def cmu_small(slides_dir: Path) -> Path:
    return slides_dir / "CMU-1-Small-Region.svs"


def twin_of(slide: Path, folder: Path) -> Path:
    """A copy of ``slide`` with 16 zero bytes appended: same pixels, another content
    fingerprint, so another slide id (its "twin", which similarity search must find)."""
    twin = folder / f"{slide.stem}-twin{slide.suffix}"
    shutil.copy(slide, twin)
    with open(twin, "ab") as f:
        f.write(b"\0" * 16)
    return twin


SYNTHETIC = {"s1": ((2560, 1920), 1), "s2": ((2400, 1800), 2)}


def search_archive(base: Path, cmu_small: Path, synthetic: tuple[str, ...]) -> dict[str, Any]:
    """CMU-1-Small-Region, its twin and the named synthetic slides tiled at 224 px (lossless),
    embedded with the random-init CNN and indexed exactly: ``root``, ``ids`` (by key),
    ``index`` and ``encoder_id``."""
    from wsi_ssl.config import TilingConfig
    from wsi_ssl.embedding import EmbedConfig, embed
    from wsi_ssl.search import SearchIndex
    from wsi_ssl.synthetic import write_synthetic_slide
    from wsi_ssl.tiling.batch import tile_slide

    tiling = TilingConfig(tile_size=224, codec="zstd", tiles_per_chunk=16)
    slides = {"cmu": cmu_small, "twin": twin_of(cmu_small, base)}
    for key in synthetic:
        size, seed = SYNTHETIC[key]
        slides[key] = write_synthetic_slide(base / f"{key}.tiff", size, seed=seed)
    root = base / "root"
    ids = {key: tile_slide(path, root, tiling).details["slide_id"] for key, path in slides.items()}
    summary = embed(root, "random-cnn", EmbedConfig(batch_size=32, device="cpu", workers=0))
    assert not summary.failed
    index = SearchIndex.build(root, "random-cnn", kind="flat")
    return {"root": root, "ids": ids, "index": index, "encoder_id": summary.encoder_id}


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """``wsi-ssl`` itself (cli/main.py), in-process: exit code, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="session")
def serve_archive(tmp_path_factory: pytest.TempPathFactory, cmu_small: Path) -> dict[str, Any]:
    """The web-page tests' archive (``search_archive`` with ``s1``), built once per session;
    a test that changes it works on a copy (:func:`copy_archive`)."""
    return search_archive(tmp_path_factory.mktemp("serve"), cmu_small, ("s1",))


def copy_archive(archive: dict[str, Any], folder: Path) -> dict[str, Any]:
    """``archive`` copied under ``folder`` (its stores and index), same slide ids."""
    root = folder / "root"
    shutil.copytree(archive["root"], root)
    return {**archive, "root": root, "index": None}


@pytest.fixture(scope="session")
def small_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two small synthetic slides tiled at 224 px (lossless, every tile kept), embedded with
    the random-init CNN and indexed ("random-cnn", flat). The check and fault tests copy it."""
    from dataclasses import replace

    from wsi_ssl.config import TilingConfig
    from wsi_ssl.embedding import EmbedConfig, embed
    from wsi_ssl.synthetic import write_synthetic_slide
    from wsi_ssl.tiling.batch import tile_slide

    base = tmp_path_factory.mktemp("small_archive")
    tiling = replace(
        TilingConfig(tile_size=224, codec="zstd", tiles_per_chunk=4), tissue_threshold=0.0
    )
    for seed, size in ((1, (1000, 800)), (2, (800, 700))):
        tile_slide(
            write_synthetic_slide(base / f"s{seed}.tiff", size, seed=seed), base / "root", tiling
        )
    summary = embed(
        base / "root",
        "random-cnn",
        EmbedConfig(batch_size=8, device="cpu", workers=0, chunk_rows=4),
    )
    assert not summary.failed
    code, _, err = run_cli(["index", str(base / "root"), "--encoder", "random-cnn", "--quiet"])
    assert code == 0, err
    return base / "root"


@contextlib.contextmanager
def mounted_tmpfs(folder: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` (``mount``'s spelling: "1m") mounted at ``folder``, made here, for
    the block; skips the test where this machine lets none be mounted (it needs root)."""
    folder.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield folder
    finally:
        # lazy: a catalog connection the test's garbage collector has not closed yet keeps it busy
        subprocess.run(["umount", "--lazy", str(folder)], check=True)


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs: a real full disk, where this machine lets the tests mount one."""
    with mounted_tmpfs(tmp_path / "tiny", "1m") as mount:
        yield mount


@pytest.fixture(scope="session")
def synthetic_root_64(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One synthetic slide tiled at 64 px, every tile kept (80 tiles: 10 steps an epoch at
    batch 8), for pretraining runs that write only under their own ``--out``."""
    from dataclasses import replace

    from wsi_ssl.config import TilingConfig
    from wsi_ssl.synthetic import write_synthetic_slide
    from wsi_ssl.tiling.batch import tile_slide

    base = tmp_path_factory.mktemp("synthetic64")
    tiling = replace(TilingConfig(tile_size=64, tiles_per_chunk=32), tissue_threshold=0.0)
    tile_slide(write_synthetic_slide(base / "s.tiff", (640, 512), seed=1), base / "root", tiling)
    return base / "root"


def copy_two_slides(small_archive: Path, tmp_path: Path) -> tuple[Path, str, str]:
    """A copy of the two-slide archive to damage: (root, its first slide id, its second)."""
    root = shutil.copytree(small_archive, tmp_path / "root")
    first, second = open_store(root).slide_ids
    return root, first, second


def embedded_tiles(root: Path, slide_id: str) -> int:
    """The rows of the slide's (only) embeddings array."""
    from wsi_ssl.storage.embeddings import embedding_ids, read_embeddings

    store = open_store(root).slide(slide_id)
    return len(read_embeddings(store, embedding_ids(store)[0], lazy=True))
