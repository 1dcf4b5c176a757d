"""``export`` into a folder an earlier export named the other way (``name_by``), and slides
named more than once: every bag is written once."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli

import wsi_ssl
from wsi_ssl.embedding.mil_files import export
from wsi_ssl.errors import ConfigError
from wsi_ssl.testing.bags import write_bag_store

ENC = "enc-x"
A, B = "aa" + "0" * 14, "bb" + "0" * 14


@pytest.fixture()
def archive(tmp_path: Path) -> Path:
    root = tmp_path / "archive"
    rng = np.random.default_rng(0)
    for sid, name in ((A, "a.svs"), (B, "b.svs")):
        write_bag_store(root, sid, rng.random((5, 8)), encoder_id=ENC, name=name)
    return root


def _files(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob("*.h5"))


def test_another_name_by_into_the_same_folder_is_refused(archive: Path, tmp_path: Path) -> None:
    """Exporting by slide id into a folder of stem-named bags wrote every bag twice (a.h5 and
    <id>.h5), the manifest listing only the second; now refused, from Python and the CLI."""
    out = tmp_path / "h5"
    export(archive, out)
    assert json.loads((out / "export.json").read_text())["name_by"] == "stem"
    with pytest.raises(ConfigError, match="named by stem; export with name_by='stem'") as info:
        wsi_ssl.export_embeddings(archive, out, name_by="slide_id")
    assert "name_by" in info.value.parameters and str(out) in str(info.value)
    code, _, err = run_cli(
        ["export", str(archive), "--out", str(out), "--name-by", "slide_id", "--quiet"]
    )
    assert code == 2 and err.count("\n") == 1, err
    assert "export with --name-by stem, or by slide_id into another folder" in err, err
    assert _files(out) == ["a.h5", "b.h5"]
    manifest = json.loads((out / "export.json").read_text())
    assert [s["name"] for s in manifest["slides"]] == ["a", "b"]
    export(archive, out, slides=["a"])  # the same naming still adds to the folder
    assert _files(out) == ["a.h5", "b.h5"]


def test_a_slide_id_folder_is_added_to_by_slide_id_unless_stems_are_asked_for(
    archive: Path, tmp_path: Path
) -> None:
    """Without ``--name-by`` an export adds to a folder as its files are named (the default
    stem was refused in a folder of slide-id names); stems asked for are refused there."""
    out = tmp_path / "h5"
    code, _, _ = run_cli(
        ["export", str(archive), "--out", str(out), "--name-by", "slide_id", "--quiet"]
    )
    assert code == 0 and _files(out) == [f"{A}.h5", f"{B}.h5"]
    (out / f"{B}.h5").unlink()
    code, _, err = run_cli(["export", str(archive), "--out", str(out), "--quiet"])
    assert code == 0, err
    assert _files(out) == [f"{A}.h5", f"{B}.h5"]
    assert json.loads((out / "export.json").read_text())["name_by"] == "slide_id"
    code, _, err = run_cli(["export", str(archive), "--out", str(out), "--name-by", "stem"])
    assert code == 2 and "export with --name-by slide_id" in err, err
    with pytest.raises(ConfigError, match="named by slide_id"):
        export(archive, out, name_by="stem")
    assert _files(out) == [f"{A}.h5", f"{B}.h5"]
    export(archive, tmp_path / "fresh")  # a new folder: by stem
    assert _files(tmp_path / "fresh") == ["a.h5", "b.h5"]


@pytest.mark.parametrize(("first", "then"), [("stem", "slide_id"), ("slide_id", "stem")])
def test_a_manifest_without_name_by_is_read_from_its_file_names(
    archive: Path, tmp_path: Path, first: str, then: str
) -> None:
    """A manifest written before ``name_by`` was recorded: the naming is read from its rows
    (every file named by its slide id, or not); the same naming still adds to it."""
    out = tmp_path / "pt"
    export(archive, out, format="pt", name_by=first)
    manifest = json.loads((out / "export.json").read_text())
    del manifest["name_by"]
    (out / "export.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match=f"named by {first}; export with name_by='{first}'"):
        export(archive, out, format="pt", name_by=then)
    assert len(list(out.glob("*.pt"))) == 2
    export(archive, out, format="pt", name_by=first)
    assert json.loads((out / "export.json").read_text())["name_by"] == first


def test_a_slide_named_twice_is_exported_once(archive: Path, tmp_path: Path) -> None:
    """``slides=["a.svs", <a's id>]`` named one slide twice: it was exported twice and counted
    as 2 slides exported."""
    out = tmp_path / "h5"
    result = export(archive, out, slides=["a.svs", A, "a", "nope", "nope"])
    assert [o.slide for o in result.exported] == [A]
    assert [o.slide for o in result.failed] == ["nope"]
    manifest = json.loads((out / "export.json").read_text())
    assert [s["slide"] for s in manifest["slides"]] == [A]
    code, stdout, _ = run_cli(
        ["export", str(archive), "--out", str(out), "--slides", "b.svs", B[:6], "--quiet"]
    )
    assert code == 0
    assert stdout.strip().splitlines()[-1] == (
        f"1 slide(s) exported as clam-h5 ({ENC}) to {out}; 0 failed"
    )
    code, stdout, _ = run_cli(
        ["export", str(archive), "--out", str(out), "--slides", "a", "a.svs", "--json"]
    )
    assert code == 0 and json.loads(stdout)["exported"] == 1
    assert _files(out) == ["a.h5", "b.h5"]


def test_every_listing_of_a_failed_slide_in_the_json_is_worded_for_the_command() -> None:
    """--json lists a failed slide under ``slides`` and again under ``errors``: both carry the
    command's wording (``errors`` kept the Python API's)."""
    from wsi_ssl.cli.report import json_summary
    from wsi_ssl.embedding.mil_files import ExportResult
    from wsi_ssl.outcome import SlideOutcome

    err = ConfigError("pass name_by='slide_id'", parameters=("name_by",))
    result = ExportResult(
        outcomes=[SlideOutcome.failure("a", err)], out=Path("x"), format="pt", encoder_id="e"
    )
    data = json_summary(result, lambda e: "pass --name-by slide_id")
    assert [s["error"] for s in data["slides"]] == ["pass --name-by slide_id"]
    assert [s["error"] for s in data["errors"]] == ["pass --name-by slide_id"]
