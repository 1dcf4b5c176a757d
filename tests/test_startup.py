"""Start-up: the CLI imports no heavy library before a command needs it (no timings here;
``benchmarks/startup.py`` measures them)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("tiffslide", "zarr", "fsspec", "dask", "distributed", "torch", "faiss")


def _loaded_after(code: str) -> list[str]:
    """The heavy modules loaded by a fresh interpreter once ``code`` has run."""
    probe = (
        f"{code}\nimport sys, json\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120
    )
    return list(json.loads(done.stdout.strip().splitlines()[-1]))


def test_cli_import_loads_no_heavy_library() -> None:
    assert _loaded_after("import wsi_ssl.cli.main; wsi_ssl.cli.main.build_parser()") == []


def test_info_through_openslide_loads_no_heavy_library(cmu_small: Path) -> None:
    code = (
        "import contextlib, io\nfrom wsi_ssl.cli.main import main\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        f"    assert main(['info', {str(cmu_small)!r}, '--json']) == 0\n"
        'assert \'"reader": "openslide"\' in out.getvalue()'
    )
    assert _loaded_after(code) == []


def test_python_dash_m_runs_the_command(cmu_small: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "wsi_ssl.cli", "info", str(cmu_small), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["dimensions"] == [2220, 2967]


def test_tiffslide_backend_still_opens_the_slide(cmu_small: Path) -> None:
    from wsi_ssl.slide import open_slide

    with open_slide(cmu_small, backend="tiffslide") as reader:
        assert reader.backend == "tiffslide"
        assert reader.dimensions == (2220, 2967)
    assert "tiffslide" in sys.modules


def test_tiling_with_threads_does_not_import_distributed(cmu_small: Path, tmp_path: Path) -> None:
    code = (
        "from wsi_ssl.cli.main import main\n"
        f"assert main(['tile', {str(cmu_small)!r}, '--out', {str(tmp_path)!r}, '--quiet']) == 0"
    )
    loaded = _loaded_after(code)
    assert "distributed" not in loaded and "torch" not in loaded
    assert "dask" in loaded and "zarr" in loaded  # needed here, so loaded
    assert len(list((tmp_path / "slides").glob("*.zarr"))) == 1


@pytest.mark.parametrize(
    ("command", "option", "library"),
    [
        ("embed", "dtype", "wsi_ssl.storage.embeddings:EMBEDDING_DTYPES"),
        ("export", "format", "wsi_ssl.embedding.mil_files:EXPORT_FORMATS"),
        ("export", "name_by", "wsi_ssl.embedding.mil_files:NAME_BY"),
    ],
)
def test_cli_choices_agree_with_the_library(command: str, option: str, library: str) -> None:
    import importlib

    from wsi_ssl.cli.main import build_parser

    module, name = library.split(":")
    expected = getattr(importlib.import_module(module), name)
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    parser = sub.choices[command]  # type: ignore[index]
    action = next(a for a in parser._actions if a.dest == option)
    assert tuple(action.choices) == tuple(expected)
