"""Self-supervised pretraining on the tile stores (torch + lightly): DINO, DINOv2, MAE.

Public API (resolved lazily: importing this package loads no torch until a name is used)::

    from wsi_ssl.ssl import PretrainConfig, pretrain, load_encoder, evaluate

    run = pretrain("archive", PretrainConfig.preset("cpu-small", steps=300), out="runs/dino")
    encoder = load_encoder(run.out_dir)             # (model, description) NamedTuple
    scores = evaluate(encoder, "labelled_tiles/")   # k-NN and linear-probe accuracy

Modules, one concept each: ``config`` (PretrainConfig), ``backbones`` (registry),
``transforms`` (lightly's DINO multi-crop + HED jitter, per tile), ``batch_augment`` (the
same, batched on the device), ``data`` (stores as a Dataset, step sampler), ``models``
(student/teacher), ``schedules``, ``checkpoint``, ``encoder`` (load_encoder), ``metrics``,
``train`` (the loop, shared), ``recipes`` (one module per method: ``dino``, ``dinov2``,
``mae``), ``optim`` (layer decay, frozen blocks), ``init`` (continued pretraining),
``curation`` (``curate``: cluster-balanced tiles), ``evaluation`` (``evaluate``: k-NN /
linear probe), ``demo``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS: dict[str, str] = {
    "PretrainConfig": "wsi_ssl.ssl.config",
    "PretrainRun": "wsi_ssl.ssl.train",
    "pretrain": "wsi_ssl.ssl.train",
    "LoadedEncoder": "wsi_ssl.ssl.encoder",
    "load_encoder": "wsi_ssl.ssl.encoder",
    "random_encoder": "wsi_ssl.ssl.encoder",
    "evaluate": "wsi_ssl.ssl.evaluation",
    "EvalResult": "wsi_ssl.ssl.evaluation",
    "TileDataset": "wsi_ssl.ssl.data",
    "scan_stores": "wsi_ssl.ssl.data",
    "HistoDINOTransform": "wsi_ssl.ssl.transforms",
    "RandomHEDJitter": "wsi_ssl.ssl.transforms",
    "BatchDINOAugment": "wsi_ssl.ssl.batch_augment",
    "backbone_names": "wsi_ssl.ssl.backbones",
    "demo_pretrain": "wsi_ssl.ssl.demo",
    "curate": "wsi_ssl.ssl.curation",
}

__all__ = [
    "BatchDINOAugment",
    "EvalResult",
    "HistoDINOTransform",
    "LoadedEncoder",
    "PretrainConfig",
    "PretrainRun",
    "RandomHEDJitter",
    "TileDataset",
    "backbone_names",
    "curate",
    "demo_pretrain",
    "evaluate",
    "load_encoder",
    "pretrain",
    "random_encoder",
    "scan_stores",
]

if TYPE_CHECKING:
    from wsi_ssl.ssl.backbones import backbone_names
    from wsi_ssl.ssl.batch_augment import BatchDINOAugment
    from wsi_ssl.ssl.config import PretrainConfig
    from wsi_ssl.ssl.curation import curate
    from wsi_ssl.ssl.data import TileDataset, scan_stores
    from wsi_ssl.ssl.demo import demo_pretrain
    from wsi_ssl.ssl.encoder import LoadedEncoder, load_encoder, random_encoder
    from wsi_ssl.ssl.evaluation import EvalResult, evaluate
    from wsi_ssl.ssl.train import PretrainRun, pretrain
    from wsi_ssl.ssl.transforms import HistoDINOTransform, RandomHEDJitter


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'wsi_ssl.ssl' has no attribute {name!r}")
