"""`wsi-ssl evaluate` refuses a registered encoder read from a weights file that cannot take
an archive's tiles before it reads the file: the refusal is the only line on stderr. It was
refused only once the encoder was built, after "loading encoder ..." (minutes for a large
model) and "encoder ... ready".

Two synthetic slides tiled at 64 px with per-tile labels, and a real ResNet-18 state dict
(random init, saved with torch.save) given as ``resnet18,weights=FILE``: ResNet-18 takes
224 px and its config says resize='never'."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.conftest import run_cli


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An archive of two slides at 64 px, every tile labelled ``labels/bright``; a ResNet-18
    weights file."""
    import torch
    import torchvision
    import zarr

    from wsi_ssl.config import TilingConfig
    from wsi_ssl.storage import open_store
    from wsi_ssl.synthetic import write_synthetic_slide
    from wsi_ssl.tiling.batch import tile_slides

    base = tmp_path_factory.mktemp("evaluate-preload")
    paths = [write_synthetic_slide(base / f"s{i}.tiff", (384, 320), seed=i) for i in (1, 2)]
    root = base / "archive"
    config = TilingConfig(tile_size=64, codec="zstd", tiles_per_chunk=16, tissue_threshold=0.0)
    assert not tile_slides(paths, root, config, progress=False).failed
    archive = open_store(root)
    for sid in archive.slide_ids:
        mean = np.asarray(archive.slide(sid).tiles[:]).mean(axis=(1, 2, 3))
        pale = (mean > np.median(mean)).astype(np.float32)
        group = zarr.open_group(archive.store_path(sid), mode="a")
        labels = group.require_group("labels").create_array(
            "bright", data=np.stack([1 - pale, pale], axis=1)
        )
        labels.attrs["classes"] = ["dark", "pale"]
    model = torchvision.models.resnet18(weights=None)
    model.fc = torch.nn.Identity()
    weights = base / "resnet18.pth"
    torch.save(model.state_dict(), weights)
    return root, weights


def evaluate(root: Path, spec: str, out: Path) -> tuple[int, str, str]:
    argv = ["evaluate", "--root", str(root), "--tile-labels", "bright", "--encoder", spec]
    return run_cli([*argv, "--folds", "2", "--bootstrap", "0", "--out", str(out), "--quiet"])


def test_refused_for_its_tiles_before_its_weights_file_is_read(
    inputs: tuple[Path, Path], tmp_path: Path
) -> None:
    root, weights = inputs
    code, stdout, stderr = evaluate(root, f"resnet18,weights={weights}", tmp_path / "out")
    assert code != 0
    assert stdout == ""
    assert stderr.splitlines() == [
        f"wsi-ssl: error: {root}: encoder 'resnet18' can take none of the 2 slide(s) to "
        "evaluate (checked before embedding any): InputSizeMismatchError: tiles are 64 px but "
        "encoder 'resnet18' takes 224 px and its config says resize='never'; give the encoder "
        "as NAME,resize=bilinear"
    ]
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_the_advised_resize_is_loaded_and_scored(inputs: tuple[Path, Path], tmp_path: Path) -> None:
    root, weights = inputs
    spec = f"resnet18,weights={weights},resize=bilinear"
    code, stdout, stderr = evaluate(root, spec, tmp_path / "out")
    assert code == 0, stderr
    lines = stderr.splitlines()
    assert lines[1] == f"loading encoder {spec}"
    assert lines[-1] == "task tiles:bright: 1 encoder(s) scored"
    assert stdout.splitlines()[0].startswith("task tiles:bright (tiles): ")
    assert (tmp_path / "out" / "evaluation.json").is_file()
