"""The encoders of an evaluation, built from their specs, and the vectors of a task's items
for each, computed once and reused.

Labelled images are embedded in memory (padded with white to a square, resized to the
encoder's input size, stain-normalised as the encoder was pretrained when it was) and cached
as ``<cache>/<encoder_id>.npy`` beside a key of the image files (paths, sizes, modification
times) and that stain normalisation. Archive tasks use the embed job, which writes
``embeddings/<encoder_id>`` into each slide store and skips slides already done, so a second
evaluation of the same archive embeds nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from wsi_ssl.errors import ConfigError
from wsi_ssl.evaluation.config import EncoderSpec, EvaluationConfig
from wsi_ssl.storage.atomic import atomic_write_with

if TYPE_CHECKING:
    from wsi_ssl.embedding import EmbedConfig
    from wsi_ssl.encoders import Encoder
    from wsi_ssl.evaluation.tasks import LabelledImages, LabelledTiles

__all__ = [
    "Given",
    "Named",
    "build_encoders",
    "embed_archive",
    "image_features",
    "square_resized",
    "tile_features",
]

Named = list[tuple[str, "Encoder"]]
Given = Mapping[str, str]  # label -> the spec the encoder was given as (for messages)


def build_encoders(
    specs: Sequence[EncoderSpec | str],
    config: EvaluationConfig,
    loading: Callable[[str], None] | None = None,
    check: Callable[[Named], None] | None = None,
) -> tuple[Named, Given]:
    """Every encoder, built before any task runs, and the spec each was given as, when that
    is not its label. Every spec is parsed and its weights file found before any is loaded
    (a bad spec, an unknown name or a missing file fails first); ``check`` then gets the
    registered encoders whose weights are read from a file, as their configs describe them
    (see :func:`_unloaded`), to refuse one that cannot take a task's tiles before its load;
    ``loading`` gets a line as each of those begins to load (minutes for a large one)."""
    from wsi_ssl.encoders import create_encoder, locate_weights

    if not specs:
        raise ConfigError("encoders is empty; give at least one encoder to evaluate")
    parsed = [s if isinstance(s, EncoderSpec) else EncoderSpec.parse(s) for s in specs]
    files = [  # a missing file is advised as a spec, as the caller gives the weights here
        locate_weights(
            s.spec, weights=s.weights, how=f"give the encoder as '{s.spec},weights=PATH'"
        )
        for s in parsed
    ]
    if check is not None:
        check(_unloaded(parsed, files))
    built = []
    for s, text, path in zip(parsed, specs, files, strict=True):
        text = text if isinstance(text, str) else s.spec
        if path is not None and loading is not None:
            loading(f"loading encoder {text}" + ("" if str(path) in text else f" ({path})"))
        overrides = {"resize": s.resize} if s.resize else {}
        encoder = create_encoder(
            s.spec, weights=s.weights, seed=s.seed, device=config.device, **overrides
        )
        built.append((s, encoder))
    ids = [e.encoder_id for _, e in built]
    if len(set(ids)) < len(ids):
        raise ConfigError(f"the same encoder is listed twice ({ids}); give each once")
    names = [e.config.name for _, e in built]
    labels = [
        s.label or (e.config.name if names.count(e.config.name) == 1 else e.encoder_id)
        for s, e in built
    ]
    if len(set(labels)) < len(labels):
        raise ConfigError(f"two encoders share a label ({labels}); give distinct labels")
    given = {
        label: text if isinstance(text, str) else text.spec
        for label, text, (s, _) in zip(labels, specs, built, strict=True)
        if not s.label and s.spec != label
    }
    return [(label, e) for label, (_, e) in zip(labels, built, strict=True)], given


def _unloaded(parsed: Sequence[EncoderSpec], files: Sequence[Path | None]) -> Named:
    """The registered encoders of ``parsed`` whose weights are read from a file, each on its
    config alone (an empty module: its size and scale checks need no weights), labelled as
    given (else by name)."""
    import torch

    from wsi_ssl.encoders import Encoder
    from wsi_ssl.encoders.registry import ENCODERS

    out: Named = []
    for s, path in zip(parsed, files, strict=True):
        if path is None or s.spec not in ENCODERS:
            continue
        encoder_config = ENCODERS.get(s.spec).config
        if s.resize:
            encoder_config = dataclasses.replace(encoder_config, resize=s.resize)
        out.append((s.label or s.spec, Encoder(torch.nn.Identity(), encoder_config)))
    return out


def square_resized(image: np.ndarray, size: int) -> np.ndarray:
    """``image`` padded with white to a centred square, then resized to ``size`` x ``size``."""
    from PIL import Image

    h, w = image.shape[:2]
    side = max(h, w)
    square = np.full((side, side, 3), 255, dtype=np.uint8)
    top, left = (side - h) // 2, (side - w) // 2
    square[top : top + h, left : left + w] = image[..., :3]
    if side == size:
        return square
    return np.asarray(Image.fromarray(square).resize((size, size), Image.Resampling.BILINEAR))


def _images_key(encoder: Encoder, paths: Sequence[str]) -> str:
    digest = hashlib.sha256(encoder.encoder_id.encode())
    digest.update(json.dumps(encoder.config.stain, sort_keys=True).encode())
    for p in paths:
        st = os.stat(p)
        digest.update(f"{Path(p).resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def image_features(
    encoder: Encoder,
    images: LabelledImages,
    cache: Path | None,
    batch_size: int = 64,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> np.ndarray:
    """(N, D) float32 vectors of the task's images, from ``cache`` when the files are unchanged;
    else embedded, after a line to ``log``, with an images progress bar when ``progress``."""
    key = _images_key(encoder, images.paths)
    npy = cache / f"{encoder.encoder_id}.npy" if cache else None
    meta = npy.with_suffix(".json") if npy else None
    if (
        npy
        and meta
        and npy.is_file()
        and meta.is_file()
        and json.loads(meta.read_text()).get("key") == key
    ):
        return np.load(npy, allow_pickle=False)
    if log is not None:
        log(f"embedding {len(images.paths)} image(s)")
    size = encoder.input_size
    stack = np.stack([square_resized(im, size) for im in images.images])
    stain = _trained_stain(encoder)
    if stain is not None:
        import torch

        stack = stain(torch.from_numpy(stack).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    feats = _embedded(encoder, stack, batch_size, progress)
    if npy and meta:
        npy.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_with(npy, lambda tmp: np.save(tmp, feats, allow_pickle=False))
        meta.write_text(json.dumps({"key": key, "n": len(feats), "encoder_id": encoder.encoder_id}))
    return feats


def _embedded(encoder: Encoder, stack: np.ndarray, batch_size: int, progress: bool) -> np.ndarray:
    """``encoder``'s vectors of ``stack``, a batch at a time under a progress bar."""
    from tqdm.auto import tqdm

    parts = []
    desc = f"embed {encoder.config.name}"[:30]  # as the embed job's bar
    bar = tqdm(total=len(stack), unit="image", desc=desc, disable=not progress, dynamic_ncols=True)
    with bar:
        for start in range(0, len(stack), batch_size):
            batch = stack[start : start + batch_size]
            parts.append(encoder.embed_images(batch, batch_size=batch_size))
            bar.update(len(parts[-1]))
    return np.concatenate(parts).astype(np.float32)


def _trained_stain(encoder: Encoder) -> Any:
    """The stain normaliser ``encoder`` was pretrained with (None: it was not)."""
    from wsi_ssl.embedding.config import EmbedConfig
    from wsi_ssl.embedding.slides import stain_normalizer

    return stain_normalizer(_as_pretrained(EmbedConfig(), encoder))[0]


def _as_pretrained(config: EmbedConfig, encoder: Encoder) -> EmbedConfig:
    """``config`` normalising stains as ``encoder`` was pretrained (evaluation has no switch
    to turn that off: the reference image must be where pretraining recorded it)."""
    from wsi_ssl.embedding.slides import encoder_stain

    advice = "put that image back: evaluate normalises as the encoder was pretrained"
    return encoder_stain(config, encoder, advice)


def embed_archive(
    root: Path,
    encoder: Encoder,
    slides: Sequence[str],
    config: EvaluationConfig,
    progress: bool = False,
) -> dict[str, str]:
    """Embed ``slides`` with the embed job (resumable; its tiles progress bar when
    ``progress``); returns ``{slide_id: error}`` of the slides that failed (the others are
    embedded)."""
    from wsi_ssl.embedding import EmbedConfig, embed
    from wsi_ssl.errors import InputSizeMismatchError

    settings = EmbedConfig(
        batch_size=config.batch_size,
        device=config.device,
        workers=config.workers,
        check_mpp=config.check_mpp,
    )
    try:
        settings = _as_pretrained(settings, encoder)
        summary = embed(root, encoder, settings, slides=list(slides), progress=progress)
    except InputSizeMismatchError as err:  # every slide, for the same reason
        return {sid: f"InputSizeMismatchError: {err}" for sid in slides}
    return {o.slide: f"{o.error_type}: {o.error}" for o in summary.failed}


def tile_features(root: Path, encoder_id: str, tiles: LabelledTiles) -> np.ndarray:
    """(N, D) float32 stored vectors of the labelled tiles, in the order of ``tiles.y``.

    Every labelled tile is scored (labels are the ground truth, the same tiles for every
    encoder): :func:`embed_archive` embeds without ``skip_flagged_tiles``, which completes a
    slide embedded with it (only the missing tiles are encoded).

    Raises:
        TilesNotEmbeddedError: a labelled tile has no vector (never a NaN into a metric).
    """
    from wsi_ssl.errors import TilesNotEmbeddedError
    from wsi_ssl.storage import open_store
    from wsi_ssl.storage.embeddings import read_embeddings

    archive = open_store(root)
    parts = []
    for sid, rows in tiles.rows.items():
        emb = read_embeddings(archive.slide(sid), encoder_id)
        absent = rows[~emb.embedded[rows]]
        if len(absent):
            raise TilesNotEmbeddedError(archive.store_path(sid), encoder_id, absent.tolist())
        parts.append(np.asarray(emb.features)[rows])
    return np.concatenate(parts).astype(np.float32)
