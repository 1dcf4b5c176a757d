"""A saved MIL run: ``wsi_ssl.mil.load(run)`` and ``run.predict(bag)``.

The fold models of a cross-validated run form an ensemble: a bag's class probabilities are
the mean of the fold models' probabilities and its attention the mean of their attentions
(each sums to 1, so the mean does too). ``load(run, fold=f)`` keeps one fold's model.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wsi_ssl.errors import (
    CheckpointError,
    EmptyBagError,
    EncoderMismatchError,
    SchemaMismatchError,
    StoreLockedError,
)
from wsi_ssl.mil.config import MILConfig
from wsi_ssl.mil.learners import Predictor, get_learner
from wsi_ssl.mil.rundir import CHECKPOINT_FORMAT, RUN_FORMAT, verify_checkpoints
from wsi_ssl.stain_settings import stain_key, stain_text
from wsi_ssl.storage import SlideStore
from wsi_ssl.storage.embeddings import Embeddings, embedding_ids
from wsi_ssl.storage.slide_store import same_scale

__all__ = ["IN_SAMPLE", "MILPrediction", "MILRun", "load", "run_id_of", "same_run"]

IN_SAMPLE = "in-sample: a training slide"
"""The note of a slide the models predicting it were trained on."""


@dataclass
class MILPrediction:
    """A slide's (or bag's) prediction.

    Attributes:
        probabilities: class probabilities (C,), the mean over the fold models.
        label: the most probable class.
        classes: class names, in the order of ``probabilities``.
        attention: tile weights (N,) summing to 1 (None for learners without attention,
            such as the retrieval baseline).
        per_fold: each fold model's probabilities (F, C).
        coords: level-0 x, y of the tiles when predicted from a slide store.
        slide_id: the slide, when predicted from a store.
        neighbours: the nearest labelled slides and similarities (retrieval baseline).
        n_tiles: the tiles in the bag predicted (fewer than ``coords`` when QC-flagged tiles
            or tiles without a vector were left out).
        bag_tiles: the store rows of the bag's tiles, when :meth:`MILRun.predict_slide` left
            some out (``attention`` is 0 for the others); None: every tile is in the bag.
    """

    probabilities: np.ndarray
    label: str
    classes: list[str]
    attention: np.ndarray | None
    per_fold: np.ndarray
    coords: np.ndarray | None = None
    slide_id: str | None = None
    neighbours: list[tuple[str, float]] = field(default_factory=list)
    n_tiles: int = 0
    bag_tiles: np.ndarray | None = None

    def top_tiles(self, k: int = 16) -> np.ndarray:
        """Indices of the ``k`` most attended tiles of the bag, most attended first."""
        if self.attention is None:
            return np.zeros(0, dtype=np.int64)
        order = np.argsort(-self.attention, kind="stable")
        if self.bag_tiles is not None:  # the tiles left out are not the least attended
            order = order[np.isin(order, self.bag_tiles)]
        return order[: min(k, len(order))]


class MILRun:
    """A trained run directory (see :mod:`wsi_ssl.mil.training`), ready to predict."""

    def __init__(
        self,
        path: Path,
        info: dict[str, Any],
        config: MILConfig,
        models: list[Predictor],
        folds: list[int],
        device: torch.device,
    ) -> None:
        self.path = path
        self.info = info
        self.config = config
        self.models = models
        self.folds = folds
        self.device = device

    def __repr__(self) -> str:
        return (
            f"MILRun({str(self.path)!r}, model={self.config.model!r}, "
            f"encoder_id={self.encoder_id!r}, classes={self.classes}, folds={self.folds})"
        )

    @property
    def encoder_id(self) -> str:
        return str(self.info["encoder_id"])

    @property
    def classes(self) -> list[str]:
        return list(self.info["classes"])

    @property
    def in_dim(self) -> int:
        return int(self.info["in_dim"])

    @property
    def run_id(self) -> str:
        """``<directory name>@<identity>``: the identity is the run's wherever it lies, a hash
        of its ``run.json`` (rewritten by each training) with the folds kept when they are not
        all of them; the name only says where it was (:func:`same_run` compares identities)."""
        every = len(self.info.get("checkpoints", [])) == len(self.folds)
        return run_id_of(self.path, None if every else self.folds)

    def slide_note(self, store: SlideStore) -> str:
        """What a prediction of ``store`` should be read with: the slide was in the training
        set (in-sample), it is embedded with another stain normalisation or tiled otherwise
        than the training slides; "" when none (or the run predates these records)."""
        notes = []
        fold = self.info.get("training_slides", {}).get(store.slide_id)
        if fold is not None and self.folds != [fold]:  # a fold's model never saw its test fold
            notes.append(IN_SAMPLE)
        if "stain" in self.info:  # runs from before do not say
            from wsi_ssl.storage.embeddings import read_embeddings

            here = read_embeddings(store, self.encoder_id, lazy=True).attrs.get("stain")
            if stain_key(here) != stain_key(self.info["stain"]):
                notes.append(
                    "embedded with another stain normalisation than the training slides "
                    f"(this slide: {stain_text(here)}; training: {stain_text(self.info['stain'])})"
                )
        trained = self.info.get("tilings") or []
        mpp, size = float(store.tiling["mpp"]), int(store.tiling["tile_size"])
        if trained and not any(same_scale(store.tiling, t) for t in trained):
            seen = ", ".join(f"{t['mpp']:g} µm/px {t['tile_size']} px" for t in trained)
            notes.append(f"tiled at {mpp:g} µm/px {size} px; the run was trained on {seen}")
        return "; ".join(notes)

    def check_encoder(self, encoder_id: str, where: str = "bag") -> None:
        """Refuse embeddings of another encoder than the run was trained on."""
        if encoder_id != self.encoder_id:
            raise EncoderMismatchError(
                f"{where}: embeddings are {encoder_id!r} but run {self.path} was trained on "
                f"{self.encoder_id!r}; embed the slides with that encoder "
                "(wsi_ssl.embed) or train a run on these embeddings"
            )

    def predict(
        self,
        bag: np.ndarray | torch.Tensor | Embeddings,
        *,
        encoder_id: str | None = None,
        where: str = "bag",
    ) -> MILPrediction:
        """Predict one bag of tile embeddings (N, D).

        Args:
            bag: the embeddings, or an :class:`~wsi_ssl.storage.embeddings.Embeddings` (whose
                ``encoder_id`` is checked against the run's; of its rows, those that hold
                vectors: the prediction's attention and coords cover them, and
                :meth:`predict_slide` spreads them over every tile of the store).
            encoder_id: the encoder of a plain array, checked when given.
            where: names the bag in error messages.

        Raises:
            EmptyBagError: the bag has no tiles.
            EncoderMismatchError: the embeddings are of another encoder or another width.
            SchemaMismatchError: a plain array holds rows that are not finite (the rows of
                tiles that hold no vector: pass the ``Embeddings`` instead).
        """
        coords = slide_id = None
        if isinstance(bag, Embeddings):
            bag = bag.embedded_only()
            encoder_id, coords, slide_id = bag.encoder_id, bag.coords, bag.slide_id
            where = slide_id if where == "bag" else where
            bag = np.asarray(bag.features)
        if encoder_id is not None:
            self.check_encoder(encoder_id, where)
        if not isinstance(bag, torch.Tensor):  # a list of rows, too
            bag = np.asarray(bag, dtype=np.float32)
        shape = tuple(bag.shape)
        if len(shape) != 2 or shape[0] == 0:
            if len(shape) == 2:
                raise EmptyBagError(where, encoder_id or self.encoder_id)
            raise EncoderMismatchError(f"{where}: a bag is (N, D) embeddings, got shape {shape}")
        if shape[1] != self.in_dim:
            raise EncoderMismatchError(
                f"{where}: embeddings have D={shape[1]} but run {self.path} takes D={self.in_dim} "
                f"(encoder {self.encoder_id!r}); use embeddings of that encoder"
            )
        features = np.asarray(bag) if not isinstance(bag, torch.Tensor) else bag
        if isinstance(features, torch.Tensor):
            unfinite = int((~torch.isfinite(features).all(1)).sum())
        else:  # a row's float32 sum is finite only when every value is
            unfinite = int((~np.isfinite(features.sum(1, dtype=np.float32))).sum())
        if unfinite:
            raise SchemaMismatchError(
                f"{where}: {unfinite} of {shape[0]} rows are not finite (tiles left out of the "
                "embedding by QC hold no vector); predict the Embeddings object, or its "
                "embedded_only() features, or the slide with predict_slide(store)"
            )
        probs, attns, neighbours = [], [], []
        for model in self.models:
            p, a, near = model.predict(features)  # type: ignore[arg-type]
            probs.append(p)
            if a is not None:
                attns.append(a)
            neighbours += near
        per_fold = np.stack(probs)
        attention = np.mean(attns, axis=0) if attns else None
        mean = per_fold.mean(axis=0)
        return MILPrediction(
            probabilities=mean,
            label=self.classes[int(mean.argmax())],
            classes=self.classes,
            attention=attention,
            per_fold=per_fold,
            coords=coords,
            slide_id=slide_id,
            neighbours=sorted(set(neighbours), key=lambda t: -t[1])[: self.config.k],
            n_tiles=int(shape[0]),
        )

    def predict_slide(
        self, store: SlideStore | str | Path, *, name: str | None = None
    ) -> MILPrediction:
        """Predict a slide store from its ``embeddings/<encoder_id>`` of the run's encoder.

        A run trained with ``skip_flagged_tiles`` predicts from the tiles that pass QC (and
        any slide from the tiles that hold vectors); the attention and coords still cover every
        tile of the store (0 for the tiles left out; ``bag_tiles`` holds the bag's rows).

        Raises:
            EncoderMismatchError: the store has embeddings, but none of the run's encoder.
            EmbeddingsNotFoundError: the store has no embeddings at all.
            EmptyBagError: the slide has no tiles (or none that pass QC).
        """
        from wsi_ssl.mil.data import read_bag

        if not isinstance(store, SlideStore):
            store = SlideStore.open(store)
        where = name or str(store.path)
        available = embedding_ids(store)
        if available and self.encoder_id not in available:
            raise EncoderMismatchError(
                f"{where}: has embeddings {', '.join(available)} but run {self.path} was trained "
                f"on {self.encoder_id!r}; embed the slide with that encoder first"
            )
        skip = self.config.skip_flagged_tiles
        bag = read_bag(store, self.encoder_id, name=where, skip_flagged=skip)
        prediction = self.predict(bag, where=where)
        rows = bag.tiles
        if rows is not None:  # back to the store's rows: tiles left out got no attention
            prediction.coords, prediction.bag_tiles = store.coords, np.asarray(rows)
            if prediction.attention is not None:
                attention = np.zeros(store.n_tiles, dtype=prediction.attention.dtype)
                attention[rows] = prediction.attention
                prediction.attention = attention
        return prediction


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(
            f"{path}: cannot read ({err}); is this a `wsi-ssl mil train` run?"
        ) from err


def run_id_of(run: Path, folds: list[int] | None = None) -> str:
    """:attr:`MILRun.run_id` of the run directory ``run`` (``folds``: the models kept, None:
    all)."""
    digest = hashlib.sha256((run / "run.json").read_bytes()).hexdigest()[:12]
    identity = digest if folds is None else f"{digest}-fold{'.'.join(map(str, folds))}"
    return f"{run.name}@{identity}"


def same_run(a: str, b: str) -> bool:
    """Whether two :attr:`MILRun.run_id` values are one run (wherever each lay)."""
    return a.rpartition("@")[2] == b.rpartition("@")[2]


def _restore_set_aside(path: Path) -> None:
    """Put back the run a ``mil train --overwrite`` killed between its two renames left
    aside (under the run's lock, as training does)."""
    from wsi_ssl.storage.atomic import aside_directory, restore_directory
    from wsi_ssl.storage.locks import hold_lock, run_lock_path

    aside = aside_directory(path)
    if path.exists() or not aside.is_dir():
        return
    try:
        with hold_lock(run_lock_path(path), path, remove=True):
            restore_directory(path)
    except StoreLockedError as err:
        raise CheckpointError(
            f"{err}; a `wsi-ssl mil train` job is replacing this run: load it once that job ends"
        ) from err
    except OSError as err:
        raise CheckpointError(
            f"{path}: the run is at {aside}, set aside by a `mil train --overwrite` that was "
            f"killed, and cannot be put back ({err.strerror}); rename it to {path.name}"
        ) from err


def load(run: str | Path, *, fold: int | None = None, device: str = "cpu") -> MILRun:
    """Load a run written by :func:`wsi_ssl.mil.train` (or ``wsi-ssl mil train``).

    Args:
        run: the run directory.
        fold: keep only this fold's model (default: all, as an ensemble).
        device: where the models run ("cpu", "cuda", "auto").

    Raises:
        CheckpointError: not a run, a checkpoint missing, unreadable or not the file training
            wrote (its sha256 differs from the one run.json records), or no such fold.
    """
    from wsi_ssl.device import resolve_device

    path = Path(run)
    _restore_set_aside(path)
    if not path.exists():
        raise CheckpointError(
            f"{path}: no such folder; give the folder a `wsi-ssl mil train` run wrote"
        )
    if not (path / "run.json").is_file():
        hint = " (a run that did not finish leaves only .<name>.partial)" if path.is_dir() else ""
        raise CheckpointError(f"{path}: no run.json; not a `wsi-ssl mil train` run{hint}")
    info = _read_json(path / "run.json")
    if info.get("format") != RUN_FORMAT:
        raise CheckpointError(
            f"{path}/run.json: format {info.get('format')!r}, expected {RUN_FORMAT!r}"
        )
    config = MILConfig.from_dict(info["config"])
    dev = resolve_device(device)
    checkpoints = list(info["checkpoints"])
    folds = list(range(len(checkpoints)))
    if fold is not None:
        if fold not in folds:
            raise CheckpointError(f"{path}: no fold {fold}; the run has folds {folds}")
        folds = [fold]
    verify_checkpoints(path, info, folds)  # the files training wrote, or refused
    models: list[Any] = []
    for f in folds:
        ckpt_path = path / checkpoints[f]
        try:
            ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, EOFError, ValueError) as err:
            raise CheckpointError(f"{ckpt_path}: cannot load checkpoint ({err})") from err
        if ckpt.get("format") != CHECKPOINT_FORMAT or ckpt.get("encoder_id") != info["encoder_id"]:
            raise CheckpointError(f"{ckpt_path}: not a checkpoint of this run")
        try:
            models.append(get_learner(config.model).load(ckpt, config, dev))
        except CheckpointError as err:
            raise CheckpointError(f"{ckpt_path}: {err}") from err
    return MILRun(path, info, config, models, folds, dev)
