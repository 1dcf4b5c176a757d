"""The CUDA paths, run on a lent GPU machine (`pytest -m gpu`); skipped where there is no CUDA.

The same code runs on the CPU in the other test files; here the device-only parts are
exercised: bf16 autocast, torch.compile, batched on-device augmentation, pinned-memory
embedding, and CPU/GPU agreement of the vectors.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from wsi_ssl.config import TilingConfig
from wsi_ssl.embedding import EmbedConfig, embed
from wsi_ssl.ssl import PretrainConfig, pretrain
from wsi_ssl.storage import open_store
from wsi_ssl.synthetic import write_synthetic_slide
from wsi_ssl.tiling.batch import tile_slides

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("gpu")
    slides = [
        write_synthetic_slide(base / f"s{seed}.tiff", (3072, 2048), seed=seed) for seed in range(2)
    ]
    tile_slides(slides, base / "archive", TilingConfig(tissue_threshold=0.1), progress=False)
    return base / "archive"


@pytest.mark.parametrize("augment", ["batch", "loader"])
def test_pretrain_bf16_compiled_on_cuda(root: Path, tmp_path: Path, augment: str) -> None:
    config = PretrainConfig.preset(
        "cpu-small",
        steps=6,
        batch_size=16,
        device="cuda",
        precision="bf16",
        compile=True,
        augment=augment,
        checkpoint_every=3,
        log_every=1,
        progress=False,
    )
    run = pretrain(root, config, out=tmp_path / "run")
    assert run.step == 6 and run.encoder_path is not None and run.encoder_path.is_file()
    losses = [row["loss"] for row in run.history if "loss" in row]
    assert losses and all(np.isfinite(losses))
    resumed = pretrain(root, config.replace(steps=8), out=tmp_path / "run", resume=True)
    assert resumed.step == 8


def test_embeddings_on_cuda_match_the_cpu(root: Path) -> None:
    archive = open_store(root)
    cpu = embed(root, "random-cnn", EmbedConfig(device="cpu", workers=0, dtype="float32"))
    on_cpu = {s: archive.embeddings(s, cpu.encoder_id).features for s in archive.slide_ids}
    config = EmbedConfig(device="cuda", workers=2, dtype="float32", resume=False)
    gpu = embed(root, "random-cnn", config)
    assert gpu.encoder_id == cpu.encoder_id and gpu.compute["device"].startswith("cuda")
    for sid, expected in on_cpu.items():
        got = archive.embeddings(sid, gpu.encoder_id).features
        np.testing.assert_allclose(got, expected, rtol=1e-2, atol=1e-2)
