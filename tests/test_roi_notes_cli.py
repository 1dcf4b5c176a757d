"""``wsi-ssl tile --roi FILE`` reports what the annotation file's reading noted: the QuPath
objects left out of its classes and the classes lying wholly outside the slide."""

from __future__ import annotations

import json
from pathlib import Path

import shapely
from shapely.geometry import box

from tests.conftest import run_cli


def _feature(geometry: object, name: str, object_type: str = "annotation") -> dict:
    properties = {"classification": {"name": name}, "objectType": object_type}
    mapped = shapely.geometry.mapping(geometry)
    return {"type": "Feature", "geometry": mapped, "properties": properties}


def test_tile_reports_the_roi_files_notes(cmu_small: Path, tmp_path: Path) -> None:
    """One annotation, a class off the slide, 4 detections and a cell: the report names the
    5 objects left out and the class outside, on the slide's line and in --json."""
    cells = [
        _feature(shapely.Point(700 + 80 * i, 900).buffer(6), "Lymphocyte", kind)
        for i, kind in enumerate(["detection"] * 4 + ["cell"])
    ]
    features = [_feature(box(600, 600, 1800, 1800), "Tumor"), *cells]
    features.append(_feature(box(5000, 5000, 6000, 6000), "Far"))
    roi = tmp_path / "all.geojson"
    roi.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    argv = ["tile", str(cmu_small), "--roi", str(roi), "--tile-size", "128", "--no-qc"]
    code, stdout, _ = run_cli([*argv, "--out", str(tmp_path / "a"), "--quiet"])
    assert code == 0, stdout
    left_out = (
        f"{cmu_small}: all.geojson: 5 QuPath detection(s), cell(s) or other objects that are "
        "not annotations were left out (only annotations are ROI classes)"
    )
    assert left_out in stdout.splitlines()
    outside = [line for line in stdout.splitlines() if "wholly outside" in line]
    assert len(outside) == 1 and outside[0].startswith(f"{cmu_small}: all.geojson: class 'Far' ")
    code, stdout, _ = run_cli([*argv, "--out", str(tmp_path / "b"), "--json"])
    notes = json.loads(stdout)["slides"][0]["roi_notes"]
    assert code == 0 and len(notes) == 2 and notes[0] == left_out.split(": ", 1)[1]
