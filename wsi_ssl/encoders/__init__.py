"""Encoders: a registry of tile encoders, each with a frozen config recorded with its vectors.

Sources: named encoders (``list_encoders()``: random-init test/benchmark models, torchvision
and timm architectures with weights from a local file, and the pathology foundation-model
zoo: UNI, UNI2-h, Virchow, Virchow2, H-optimus-0/1, Prov-GigaPath, Phikon, Phikon-v2,
Hibou-B/L, Midnight, CONCH v1.5; see ``wsi_ssl.encoders.zoo``), ``timm/<arch>``,
``torchvision/<arch>``, and a ``wsi-ssl pretrain`` run or checkpoint (teacher backbone).
Nothing is downloaded; a missing weights file is a :class:`~wsi_ssl.errors.WeightsNotFoundError`
naming where to put it.

    >>> from wsi_ssl.encoders import create_encoder
    >>> enc = create_encoder("random-cnn")
    >>> enc.encoder_id            # '<name>-<12 hex of config + weights sha256>'
"""

from wsi_ssl.encoders.config import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PRECISIONS,
    RESIZE_POLICIES,
    EncoderConfig,
)
from wsi_ssl.encoders.encoder import Encoder
from wsi_ssl.encoders.registry import (
    EncoderEntry,
    EncoderSource,
    create_encoder,
    encoder_entry,
    list_encoders,
    list_sources,
    locate_weights,
    register_encoder,
    register_source,
)
from wsi_ssl.encoders.weights import file_sha256, state_dict_sha256, weights_dir

# Registration side effects, in the order sources are tried.
from wsi_ssl.encoders import _builtin, _hub, zoo, _checkpoint  # noqa: F401  isort: skip

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PRECISIONS",
    "RESIZE_POLICIES",
    "Encoder",
    "EncoderConfig",
    "EncoderEntry",
    "EncoderSource",
    "create_encoder",
    "encoder_entry",
    "file_sha256",
    "list_encoders",
    "list_sources",
    "locate_weights",
    "register_encoder",
    "register_source",
    "state_dict_sha256",
    "weights_dir",
]
