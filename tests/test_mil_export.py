"""``export`` reports one :class:`SlideOutcome` per slide (the shared outcome type): files
written in ``details``, a damaged slide failed and the others written, the report text built
by the library and the CLI printing it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli

from wsi_ssl.embedding.mil_files import export
from wsi_ssl.errors import ConfigError, EmbeddingsCorruptError
from wsi_ssl.testing.bags import write_bag_store

ENC = "enc-x"


@pytest.fixture()
def archive(tmp_path: Path) -> Path:
    root = tmp_path / "archive"
    rng = np.random.default_rng(0)
    for i, name in enumerate(("a.svs", "b.svs", "c.svs")):
        write_bag_store(root, f"{i:016x}", rng.random((6 + i, 8)), encoder_id=ENC, name=name)
    # b's only chunk is gone: its embeddings are damaged, the others are fine
    (root / "slides" / f"{1:016x}.zarr" / "embeddings" / ENC / "c" / "0" / "0").unlink()
    return root


def test_export_outcomes_and_report(archive: Path, tmp_path: Path) -> None:
    result = export(archive, tmp_path / "pt", format="pt")
    assert result.counts == {"complete": 2, "skipped": 0, "busy": 0, "failed": 1}
    assert result.exit_code == 1
    [bad] = result.failed
    assert bad.slide == f"{1:016x}" and bad.details == {"name": "b"}
    assert isinstance(bad.exception, EmbeddingsCorruptError) and "damaged" in (bad.error or "")
    done = result.exported
    assert [o.n_tiles for o in done] == [6, 8]
    assert [Path(o.details["file"]).name for o in done] == ["a.pt", "c.pt"]
    assert all(Path(o.details["coords_file"]).is_file() for o in done)
    assert result.files == [tmp_path / "pt" / "a.pt", tmp_path / "pt" / "c.pt"]
    lines = result.lines(lambda err: " [hint]")
    assert lines[-1] == f"2 slide(s) exported as pt ({ENC}) to {tmp_path / 'pt'}; 1 failed"
    assert lines[1].split()[0] == "failed" and lines[1].endswith("[hint]")
    d = result.to_dict()
    assert (d["exported"], d["complete"], d["failed"]) == (2, 2, 1)
    assert [s["status"] for s in d["slides"]] == ["complete", "failed", "complete"]
    assert d["slides"][0]["slide_id"] == d["slides"][0]["slide"] == f"{0:016x}"
    assert d["slides"][0]["dim"] == 8 and d["errors"][0]["error_type"] == "EmbeddingsCorruptError"
    manifest = json.loads((tmp_path / "pt" / "export.json").read_text())
    assert [s["name"] for s in manifest["slides"]] == ["a", "c"]
    assert [e["slide"] for e in manifest["errors"]] == [f"{1:016x}"]


def test_export_cli_prints_the_library_report(archive: Path, tmp_path: Path) -> None:
    out = tmp_path / "h5"
    code, stdout, err = run_cli(["export", str(archive), "--out", str(out), "--quiet"])
    assert code == 1
    assert stdout.strip().splitlines()[-1] == (
        f"2 slide(s) exported as clam-h5 ({ENC}) to {out}; 1 failed"
    )
    assert err.count("\n") == 1 and "are damaged" in err
    code, stdout, _ = run_cli(["export", str(archive), "--out", str(out), "--json"])
    summary = json.loads(stdout)
    assert code == 1 and summary["exported"] == 2 and summary["failed"] == 1
    assert sorted(Path(p).name for p in out.glob("*.h5")) == ["a.h5", "c.h5"]


def test_name_clash_names_the_parameter(tmp_path: Path) -> None:
    root = tmp_path / "archive"
    for i in range(2):
        write_bag_store(root, f"{i:016x}", np.ones((3, 4)), encoder_id=ENC, name=f"d{i}/x.svs")
    with pytest.raises(ConfigError, match="name_by='slide_id'") as info:
        export(root, tmp_path / "out")
    assert info.value.parameters == ("name_by",) and "--" not in str(info.value)
    code, _, err = run_cli(["export", str(root), "--out", str(tmp_path / "out"), "--quiet"])
    assert code == 2 and err.strip().endswith("use --name-by slide_id"), err


def test_a_store_with_damaged_metadata_is_a_failed_slide(archive: Path, tmp_path: Path) -> None:
    broken = f"{2:016x}"
    (archive / "slides" / f"{broken}.zarr" / "zarr.json").write_text("{not json")
    out = tmp_path / "h5"
    code, stdout, _ = run_cli(["export", str(archive), "--out", str(out), "--json"])
    summary = json.loads(stdout)
    assert code == 1 and (summary["exported"], summary["failed"]) == (1, 2)
    assert {e["slide"] for e in summary["errors"]} == {f"{1:016x}", broken}
    assert sorted(p.name for p in out.glob("*.h5")) == ["a.h5"]
    manifest = json.loads((out / "export.json").read_text())
    assert broken in {e["slide"] for e in manifest["errors"]}


def test_a_damaged_first_slide_does_not_stop_the_export(archive: Path, tmp_path: Path) -> None:
    """The encoder's description was read from the first store with the encoder: when its
    embeddings were damaged, the whole export stopped (exit 2, no export.json)."""
    (archive / "slides" / f"{0:016x}.zarr" / "embeddings" / ENC / "c" / "0" / "0").unlink()
    result = export(archive, tmp_path / "h5")
    assert [o.details["name"] for o in result.exported] == ["c"] and len(result.failed) == 2
    manifest = json.loads((tmp_path / "h5" / "export.json").read_text())
    assert manifest["encoder"] is not None and [s["name"] for s in manifest["slides"]] == ["c"]


def test_an_export_into_a_folder_keeps_one_encoder_and_every_slide(
    archive: Path, tmp_path: Path
) -> None:
    """Exporting again into a folder: another format or encoder is refused (it left bags of two
    widths, the manifest naming only the last); the same one adds to the manifest."""
    out = tmp_path / "h5"
    export(archive, out)
    export(archive, out, slides=["a"])  # a partial re-export keeps c in the manifest
    manifest = json.loads((out / "export.json").read_text())
    assert sorted(s["name"] for s in manifest["slides"]) == ["a", "c"]
    assert [e["slide"] for e in manifest["errors"]] == [f"{1:016x}"]
    again = tmp_path / "again"  # another archive's slide of the same name: one row, the new
    write_bag_store(again, f"{9:016x}", np.ones((3, 8)), encoder_id=ENC, name="c.svs")
    export(again, out)
    manifest = json.loads((out / "export.json").read_text())
    assert sorted((s["name"], s["slide"]) for s in manifest["slides"]) == [
        ("a", f"{0:016x}"),
        ("c", f"{9:016x}"),
    ]
    with pytest.raises(ConfigError, match="holds a clam-h5 export of encoder 'enc-x'"):
        export(archive, out, format="pt")
    other = tmp_path / "other"
    write_bag_store(other, f"{7:016x}", np.ones((3, 16)), encoder_id="enc-y", name="d.svs")
    code, _, err = run_cli(["export", str(other), "--out", str(out), "--quiet"])
    assert code == 2 and "export 'enc-y' as clam-h5 into another folder" in err, err
    assert not (out / "d.h5").exists()
