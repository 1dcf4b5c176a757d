"""Multi-process DINO under torchrun: 2 CPU processes, gloo, DistributedDataParallel."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import wsi_ssl
from wsi_ssl.ssl.checkpoint import checkpoint_paths, load_checkpoint


@pytest.fixture(scope="module")
def cmu_root(cmu_small: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cmu64")
    wsi_ssl.tile_slide(cmu_small, root, wsi_ssl.TilingConfig(tile_size=64, tiles_per_chunk=32))
    return root


@pytest.mark.slow
def test_torchrun_two_processes_keep_centre_and_weights_in_sync(
    cmu_root: Path, tmp_path: Path
) -> None:
    out = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "wsi_ssl.cli.pretrain", str(cmu_root), "--out", str(out),
        "--preset", "cpu-small", "--arch", "resnet18_tiny", "--global-crop-size", "32",
        "--local-crop-size", "16", "--out-dim", "64", "--batch-size", "4", "--steps", "4",
        "--device", "cpu", "--num-workers", "0", "--num-threads", "1", "--log-every", "1",
        "--checkpoint-every", "2", "--json",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=400, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["step"] == 4
    ranks = summary["digests"]["ranks"]
    assert len(ranks) == 2
    for key in ("center", "student", "teacher"):
        assert ranks[0][key] == ranks[1][key], key
    data = load_checkpoint(checkpoint_paths(out)[-1])
    assert data["meta"]["world_size"] == 2 and data["meta"]["global_batch"] == 8
    assert float(data["center"].abs().sum()) > 0  # the centre was updated
    assert torch.isfinite(data["center"]).all()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # one writer: rank 0
