"""The encoder registry: named encoders (timm style, a decorator on a builder) and sources.

A *named encoder* has a fixed config template and a builder ``fn(config) -> nn.Module``:

    @register_encoder("resnet18", arch="torchvision/resnet18", input_size=224, embed_dim=512)
    def resnet18(config): ...

A *source* resolves names that are not registered one by one: ``timm/<arch>``,
``torchvision/<arch>`` and a ``wsi-ssl pretrain`` run or checkpoint path. Both live in the
project's one registry helper, :class:`wsi_ssl.registry.Registry` (``ENCODERS``, ``SOURCES``;
sources are tried in registration order). Weights come from a local file (``weights=PATH``,
or ``<weights_dir>/<name>.pth``), the literal ``"random"`` for a seeded random init, or the
checkpoint itself; nothing is ever downloaded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from wsi_ssl.encoders.config import IMAGENET_MEAN, IMAGENET_STD, EncoderConfig
from wsi_ssl.encoders.encoder import Encoder
from wsi_ssl.encoders.weights import (
    Convert,
    default_weights_path,
    file_sha256,
    load_weights,
    state_dict_sha256,
    weights_dir,
)
from wsi_ssl.errors import (
    ConfigError,
    EncoderNotFoundError,
    PresetWeightsNotFoundError,
    WeightsNotFoundError,
)
from wsi_ssl.registry import Registry

__all__ = [
    "ENCODERS",
    "OVERRIDABLE",
    "SOURCES",
    "EncoderEntry",
    "EncoderSource",
    "LocateFn",
    "create_encoder",
    "encoder_entry",
    "encoder_from_entry",
    "finish_encoder",
    "list_encoders",
    "list_sources",
    "locate_weights",
    "register_encoder",
    "register_source",
    "seeded",
]

RANDOM = "random"
_WEIGHTS_NOTE = re.compile(r"\s*(\(weights: [^)]*\)|;\s*weights: .*)$")
OVERRIDABLE = ("name", "resize", "precision", "input_size", "mean", "std")

BuildFn = Callable[[EncoderConfig], nn.Module]


class LoadFn(Protocol):
    def __call__(
        self, spec: str, *, weights: str | Path | None, seed: int, overrides: dict[str, Any]
    ) -> Encoder: ...


@dataclass(frozen=True)
class EncoderEntry:
    """A named encoder: its config template (no weights yet), its builder, and the mapping of
    its published weights layout onto the built module (None: the module's own names)."""

    name: str
    config: EncoderConfig
    build: BuildFn
    convert: Convert | None = None


class LocateFn(Protocol):
    def __call__(self, spec: str, *, weights: str | Path | None, how: str) -> Path | None: ...


@dataclass(frozen=True)
class EncoderSource:
    """Resolves names that match it (a prefix or a path) into encoders; ``locate`` finds the
    file an encoder's weights would be read from without building it (None: not said)."""

    name: str
    description: str
    matches: Callable[[str], bool]
    load: LoadFn
    locate: LocateFn | None = None


ENCODERS: Registry[EncoderEntry] = Registry("encoder")
SOURCES: Registry[EncoderSource] = Registry("encoder source")


def register_encoder(
    name: str,
    *,
    arch: str,
    input_size: int,
    embed_dim: int,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
    resize: str = "never",
    precision: str = "fp32",
    source: str = "file",
    arch_kwargs: dict[str, Any] | None = None,
    description: str = "",
    mpp: tuple[float, ...] = (),
    licence: str = "",
    model_card: str = "",
    weights_files: tuple[str, ...] = (),
    convert: Convert | None = None,
) -> Callable[[BuildFn], BuildFn]:
    """Decorator registering ``fn(config) -> nn.Module`` (random init) under ``name``.

    ``source="file"`` encoders need weights (``weights=PATH`` or the default weights path);
    ``source="random"`` ones are seeded random inits unless weights are given. ``mpp``,
    ``licence``, ``model_card`` and ``weights_files`` describe a published model;
    ``convert(state, model)`` maps its published weights layout onto the built module.
    """
    config = EncoderConfig(
        name=name,
        arch=arch,
        input_size=input_size,
        embed_dim=embed_dim,
        mean=mean,
        std=std,
        resize=resize,
        precision=precision,
        source=source,
        arch_kwargs=tuple((arch_kwargs or {}).items()),
        description=description,
        mpp=mpp,
        licence=licence,
        model_card=model_card,
        weights_files=weights_files,
    )

    def decorator(fn: BuildFn) -> BuildFn:
        if name in ENCODERS:
            raise ConfigError(f"encoder {name!r} is already registered")
        ENCODERS.add(name, EncoderEntry(name, config, fn, convert))
        return fn

    return decorator


def register_source(
    name: str,
    *,
    matches: Callable[[str], bool],
    description: str,
    locate: LocateFn | None = None,
) -> Callable[[LoadFn], LoadFn]:
    """Decorator registering a loader for names that ``matches`` accepts (tried in order),
    and how to find its weights file without loading (:func:`locate_weights`)."""

    def decorator(fn: LoadFn) -> LoadFn:
        SOURCES.add(name, EncoderSource(name, description, matches, fn, locate))
        return fn

    return decorator


def list_encoders(pattern: str | None = None) -> list[str]:
    """Registered encoder names, sorted (optionally those containing ``pattern``)."""
    return [n for n in ENCODERS.names() if pattern is None or pattern in n]


def list_sources() -> dict[str, str]:
    """Source name -> description, in the order they are tried."""
    return {name: s.description for name, s in SOURCES.items()}


def encoder_entry(name: str) -> EncoderEntry:
    if name not in ENCODERS:
        raise EncoderNotFoundError(name, _valid())
    return ENCODERS.get(name)


def _valid() -> list[str]:
    return [*list_encoders(), *(f"<{name}>" for name, _ in SOURCES.items())]


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator for a deterministic init, leaving the global state as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def check_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
    bad = set(overrides) - set(OVERRIDABLE)
    if bad:
        raise ConfigError(
            f"cannot override {sorted(bad)} of an encoder config; overridable: "
            f"{', '.join(OVERRIDABLE)}"
        )
    return {k: v for k, v in overrides.items() if v is not None}


def _published_file(folder: Path, files: tuple[str, ...]) -> Path | None:
    return next((folder / f for f in files if (folder / f).is_file()), None)


def weights_file(
    name: str,
    weights: str | Path | None,
    config: EncoderConfig | None = None,
    how: str = "pass weights=PATH",
) -> Path | None:
    """The weights file to load (None for a random init); raise when it is not there.

    ``weights`` may be a file or a folder holding one of the config's published
    ``weights_files`` (a model card's download); None looks in ``<weights_dir>``: first
    ``<name>/<published file>``, then ``<name>.pth`` and the other suffixes. ``how``: how
    the error says to give another file.
    """
    if weights is not None and str(weights) == RANDOM:
        return None
    files = config.weights_files if config is not None else ()
    if weights is not None:
        path = Path(weights).expanduser()
        if path.is_dir():
            path = _published_file(path, files) or path / (files[0] if files else f"{name}.pth")
    else:
        path = _published_file(weights_dir() / name, files) or default_weights_path(name)
        if files and not path.is_file():
            path = weights_dir() / name / files[0]
    if not path.is_file():
        if weights is not None and not Path(weights).expanduser().is_dir():
            raise WeightsNotFoundError(name, path, given=True)
        if config is not None and files and config.model_card:
            raise PresetWeightsNotFoundError(name, path, list(files), config.model_card, how)
        raise WeightsNotFoundError(name, path, how=how)
    return path


def locate_weights(
    name_or_path: str | Path, *, weights: str | Path | None = None, how: str = "pass weights=PATH"
) -> Path | None:
    """The file :func:`create_encoder` would read the weights from (a weights file or a
    ``wsi-ssl pretrain`` checkpoint; None: a seeded random init), found without building or
    reading anything, so that a missing file is refused before a large model's load.

    Raises:
        EncoderNotFoundError: an unknown name (or ``timm/``, ``torchvision/`` architecture).
        WeightsNotFoundError: the weights file is missing (``how``: how the message says to
            give another).
        CheckpointError, ConfigError: a checkpoint path that is not there, or given weights.
    """
    spec = str(name_or_path)
    if spec in ENCODERS:
        config = ENCODERS.get(spec).config
        if config.source == RANDOM and weights is None:
            return None
        return weights_file(spec, weights, config, how)
    for _, source in SOURCES.items():
        if source.matches(spec):
            return source.locate(spec, weights=weights, how=how) if source.locate else None
    raise EncoderNotFoundError(spec, _valid())


def finish_encoder(
    model: nn.Module,
    config: EncoderConfig,
    *,
    weights: Path | None,
    seed: int,
    convert: Convert | None = None,
) -> Encoder:
    """Load ``weights`` into a freshly built ``model`` (or keep its seeded init) and record the
    weights' sha256 in the config."""
    if weights is None:
        name = config.name if config.name.startswith(RANDOM) else f"{RANDOM}-{config.name}"
        config = dataclasses.replace(
            config,
            name=name,
            description=_random_init_description(config),
            source=RANDOM,
            seed=seed,
            weights_path=None,
            weights_sha256=state_dict_sha256(model),
        )
    else:
        load_weights(model, weights, encoder=config.name, convert=convert)
        config = dataclasses.replace(
            config,
            source="file",
            seed=None,
            weights_path=str(weights.resolve()),
            weights_sha256=file_sha256(weights),
        )
    return Encoder(model, config)


def _random_init_description(config: EncoderConfig) -> str:
    """The description of ``config`` built with its seeded random init: an encoder registered
    as random keeps its own; another's note on where its weights come from (``(weights: local
    file)``, ``; weights: <file> from <card>``) is replaced by the random init's."""
    if config.source == RANDOM:  # "small random-init CNN": says so already
        return config.description
    core = _WEIGHTS_NOTE.sub("", config.description)
    return f"{core} (weights: seeded random init)" if core else "seeded random init"


def slug(text: str) -> str:
    """A registry-safe name: letters, digits, '_', '.', '-'."""
    out = re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.")
    return out or "encoder"


def encoder_from_entry(
    entry: EncoderEntry, config: EncoderConfig, *, weights: str | Path | None, seed: int
) -> Encoder:
    """Build ``entry`` with ``config`` (its template, possibly changed) and load its weights."""
    use_random = entry.config.source == RANDOM and weights is None
    path = None if use_random else weights_file(entry.name, weights, config)
    if path is not None:  # no random init to throw away (seconds for a ViT-g on a CPU)
        with torch.device("meta"):
            model = entry.build(config)
        if not any(b.is_meta for b in model.buffers()):
            return finish_encoder(model, config, weights=path, seed=seed, convert=entry.convert)
    with seeded(seed):
        model = entry.build(config)
    return finish_encoder(model, config, weights=path, seed=seed, convert=entry.convert)


def create_encoder(
    name_or_path: str | Path,
    *,
    weights: str | Path | None = None,
    seed: int = 0,
    device: str | torch.device | None = "cpu",
    **overrides: Any,
) -> Encoder:
    """Build an encoder by registered name, ``timm/<arch>``, ``torchvision/<arch>`` or a
    ``wsi-ssl pretrain`` run/checkpoint path.

    Args:
        weights: a local weights file, ``"random"`` for a seeded init, or None: the default
            weights path for named encoders that need weights, the init for random ones.
        seed: init seed (random-init encoders; recorded in the config).
        device: where to put it ("cpu", "cuda", "auto").
        overrides: config fields to change (``resize``, ``precision``, ``input_size``, ``mean``,
            ``std``, ``name``); they are part of the config and so of the ``encoder_id``.

    Raises:
        EncoderNotFoundError: unknown name (the message lists the valid ones).
        WeightsNotFoundError: the weights file is missing (the message says where to put it).
        CheckpointError: weights for another architecture, or an unreadable checkpoint.
    """
    spec = str(name_or_path)
    overrides = check_overrides(overrides)
    if spec in ENCODERS:
        entry = ENCODERS.get(spec)
        config = dataclasses.replace(entry.config, **overrides)
        encoder = encoder_from_entry(entry, config, weights=weights, seed=seed)
    else:
        for _, source in SOURCES.items():
            if source.matches(spec):
                encoder = source.load(spec, weights=weights, seed=seed, overrides=overrides)
                break
        else:
            raise EncoderNotFoundError(spec, _valid())
    return encoder.to(device)
