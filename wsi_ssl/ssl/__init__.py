"""Self-supervised pretraining on the tile stores (torch + lightly): DINO, DINOv2, MAE.

Public API (resolved lazily: importing this package loads no torch until a name is used)::

    from wsi_ssl.ssl import PretrainConfig, pretrain, load_encoder

    run = pretrain("archive", PretrainConfig.preset("cpu-small", steps=300), out="runs/dino")
    encoder = load_encoder(run.out_dir)             # (model, description) NamedTuple

Modules, one concept each: ``config`` (PretrainConfig), ``backbones`` (registry),
``transforms`` (lightly's DINO multi-crop + HED jitter, per tile), ``batch_augment`` (the
same, batched on the device), ``stores`` (the stores a run reads), ``selection`` (which
tiles), ``dataset`` (tiles as a Dataset), ``sampler`` (the step sampler), ``models``
(student/teacher), ``schedules``, ``checkpoint``, ``encoder`` (load_encoder), ``metrics``,
``train`` (``pretrain``), ``trainer`` (a run's state and step), ``loop`` (the loop),
``runtime`` (device, precision, processes), ``resume``, ``result`` (PretrainRun),
``recipes`` (one module per method: ``dino``, ``dinov2``, ``mae``), ``optim`` (layer decay,
frozen blocks, clipping), ``init`` (continued pretraining), ``curation`` (``curate``:
cluster-balanced tiles), ``demo``. Comparing encoders on labelled data is
:mod:`wsi_ssl.evaluation`'s (``wsi-ssl evaluate``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from wsi_ssl.lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "wsi_ssl.ssl.config": ("PretrainConfig",),
        "wsi_ssl.ssl.result": ("PretrainRun",),
        "wsi_ssl.ssl.train": ("pretrain",),
        "wsi_ssl.ssl.encoder": ("LoadedEncoder", "load_encoder", "random_encoder"),
        "wsi_ssl.ssl.dataset": ("TileDataset",),
        "wsi_ssl.ssl.stores": ("scan_stores",),
        "wsi_ssl.ssl.transforms": ("HistoDINOTransform", "RandomHEDJitter"),
        "wsi_ssl.ssl.batch_augment": ("BatchDINOAugment",),
        "wsi_ssl.ssl.backbones": ("backbone_names",),
        "wsi_ssl.ssl.demo": ("demo_pretrain",),
        "wsi_ssl.ssl.curation": ("curate",),
    },
)

__all__ = [
    "BatchDINOAugment",
    "HistoDINOTransform",
    "LoadedEncoder",
    "PretrainConfig",
    "PretrainRun",
    "RandomHEDJitter",
    "TileDataset",
    "backbone_names",
    "curate",
    "demo_pretrain",
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
    from wsi_ssl.ssl.dataset import TileDataset
    from wsi_ssl.ssl.demo import demo_pretrain
    from wsi_ssl.ssl.encoder import LoadedEncoder, load_encoder, random_encoder
    from wsi_ssl.ssl.result import PretrainRun
    from wsi_ssl.ssl.stores import scan_stores
    from wsi_ssl.ssl.train import pretrain
    from wsi_ssl.ssl.transforms import HistoDINOTransform, RandomHEDJitter
