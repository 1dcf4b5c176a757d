"""The embedding job: every complete slide store (or those named) -> ``embeddings/<encoder_id>``.

:func:`embed` opens the archive and the encoder, prepares each slide (resume, one writer per
slide, damaged stores reported: :mod:`wsi_ssl.embedding.slides`), runs the loop over the slides
left to do (:mod:`wsi_ssl.embedding.runner`) and returns an
:class:`~wsi_ssl.embedding.summary.EmbedSummary` with one
:class:`~wsi_ssl.outcome.SlideOutcome` per slide: a slide that fails never stops the others.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

from wsi_ssl.embedding.batch_size import auto_batch_size
from wsi_ssl.embedding.config import EmbedConfig
from wsi_ssl.embedding.runner import EmbedRunner
from wsi_ssl.embedding.slides import EmbedSlide, EmbedTarget, encoder_stain, stain_normalizer
from wsi_ssl.embedding.summary import EmbedSummary
from wsi_ssl.encoders import Encoder, create_encoder
from wsi_ssl.errors import (
    CheckpointError,
    ConfigError,
    InputSizeMismatchError,
    SchemaMismatchError,
    StoreCorruptError,
    UnknownSlideError,
    WsiSslError,
)
from wsi_ssl.listing import one_or_many
from wsi_ssl.outcome import SlideOutcome, interrupt_report
from wsi_ssl.storage import Archive, open_store
from wsi_ssl.storage.archive import damaged_slide_id
from wsi_ssl.storage.resolve import resolve_slide

__all__ = ["embed", "embed_for_demo", "embed_slide", "precision_note"]


def requested_slide_ids(archive: Archive, slides: Sequence[str]) -> list[str]:
    """``slides`` as slide ids, in order, once each (see :func:`_slide_id`): what ``embed``
    and the sharded runs key their outcomes by."""
    return [_slide_id(archive, name) for name in dict.fromkeys(one_or_many(slides))]


@dataclasses.dataclass(frozen=True)
class Unlisted:
    """What a job over the whole archive says of the stores it does not embed: the damaged
    ones (failed, with their error) and those not complete (left out, noted)."""

    damaged: list[SlideOutcome]
    incomplete: list[str]

    def added_to(self, summary: EmbedSummary) -> EmbedSummary:
        """``summary`` with these in it."""
        summary.outcomes[:0] = self.damaged
        summary.incomplete = self.incomplete
        return summary


def job_slides(archive: Archive, slides: Sequence[str] | None) -> tuple[list[str], Unlisted]:
    """The slide ids a job embeds (``slides`` as ids, its outcomes' keys in one process or
    sharded; None: every complete store) and what it says of the archive's other stores."""
    if slides is not None:
        return requested_slide_ids(archive, slides), Unlisted([], [])
    scan = archive.scan()
    damaged = [SlideOutcome.failure(damaged_slide_id(err), err) for err in scan.damaged]
    return scan.complete, Unlisted(damaged, scan.incomplete + archive.swapping())


def _slide_id(archive: Archive, name: str) -> str:
    """A slide id as given when its store exists (complete or not), else resolved from a file
    name, stem or unique prefix; unresolvable names are kept (their store "is missing")."""
    if archive.store_path(name).exists():
        return name
    try:
        return resolve_slide(archive, name)
    except WsiSslError:
        return name


ENCODER_SETTINGS = ("resize", "precision")
"""Options of :func:`embed` that make the encoder (as ``create_encoder``'s), not the job."""


def _as_encoder(
    encoder: Encoder | str | Path, weights: str | Path | None, settings: dict[str, Any]
) -> Encoder:
    if isinstance(encoder, Encoder):
        if settings:
            raise ConfigError(
                f"{', '.join(settings)} make an encoder: pass them to create_encoder, or give "
                "embed the encoder's name"
            )
        return encoder
    return create_encoder(encoder, weights=weights, device="cpu", **settings)


def _split_options(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``options`` as (EmbedConfig fields, encoder settings); refuse any other name."""
    fields = {f.name for f in dataclasses.fields(EmbedConfig)}
    unknown = sorted(set(options) - fields - set(ENCODER_SETTINGS))
    if unknown:
        raise ConfigError(
            f"embed has no option {', '.join(map(repr, unknown))}; the job's are EmbedConfig's "
            f"fields ({', '.join(sorted(fields))}), the encoder's {', '.join(ENCODER_SETTINGS)}"
        )
    job = {k: v for k, v in options.items() if k in fields}
    return job, {k: v for k, v in options.items() if k in ENCODER_SETTINGS}


def embed(
    root: str | Path,
    encoder: Encoder | str | Path,
    config: EmbedConfig | None = None,
    *,
    slides: Sequence[str] | None = None,
    weights: str | Path | None = None,
    progress: bool = False,
    **options: Any,
) -> EmbedSummary:
    """Embed the complete slide stores under ``root`` into ``<slide>.zarr/embeddings/<encoder_id>``.

    Args:
        root: an archive root written by ``wsi-ssl tile``.
        encoder: an :class:`~wsi_ssl.encoders.Encoder`, a registered name, ``timm/<arch>``,
            ``torchvision/<arch>`` or a ``wsi-ssl pretrain`` run/checkpoint path.
        config: job settings; ``options`` (e.g. ``batch_size=64, device="cpu"``) replace fields,
            and ``resize``/``precision`` set a named encoder's (as ``wsi-ssl embed --resize``).
        slides: slide ids to embed (default: every complete store; named stores that are
            missing or incomplete fail with a typed error in the summary).
        weights: weights file for a named encoder (``"random"`` for a seeded init).
        progress: show a tiles/s progress bar.

    Returns:
        An :class:`EmbedSummary`; a failing slide never stops the others (see ``.failed``).

    Raises:
        StoreNotFoundError: ``root`` is not an archive.
        EncoderNotFoundError, WeightsNotFoundError, CheckpointError, DeviceUnavailableError:
            before any slide is touched.
        InputSizeMismatchError: every slide's tiles are a size the encoder does not take (a
            setting to change; when only some are, those slides fail and the others go on).
    """
    job, settings = _split_options(options)
    config = dataclasses.replace(config or EmbedConfig(), **job)
    started = time.perf_counter()
    archive = open_store(root)
    enc = _as_encoder(encoder, weights, settings).to(config.device)
    if config.batch_size is None:
        config = dataclasses.replace(config, batch_size=auto_batch_size(enc))
    if config.compile:
        enc.compile()
    config = encoder_stain(config, enc)
    stain, stain_attrs = stain_normalizer(config)
    target = EmbedTarget(enc, config, stain_attrs)
    ids, unlisted = job_slides(archive, slides)
    prepared: list[EmbedSlide | SlideOutcome] = [*unlisted.damaged]
    prepared += [_unknown_slide(archive, s) or target.prepare(archive, s) for s in ids]
    _refuse_wrong_size_everywhere(archive.root, prepared)
    runner = EmbedRunner(target, stain, progress)
    summary = EmbedSummary(
        root=str(root),
        encoder_id=enc.encoder_id,
        encoder=enc.describe(),
        config=config.to_dict(),
        compute=enc.compute,
        incomplete=unlisted.incomplete,
    )
    to_embed = [p for p in prepared if isinstance(p, EmbedSlide)]
    names = {sid: name for sid, (_, name) in archive.source_files(ids).items()}
    with interrupt_report(summary, lambda: [p.store.slide_id for p in to_embed if not p.done]):
        try:
            runner.run(to_embed)
        finally:  # the outcomes so far, for an interrupt's report too
            summary.outcomes = [o for p in prepared if (o := _outcome(p)) is not None]
            for outcome in summary.outcomes:  # the report names each slide's file too
                if outcome.slide in names:
                    outcome.details.setdefault("name", names[outcome.slide])
            summary.seconds = time.perf_counter() - started
            summary.loader_wait_s = runner.loader_wait
    return summary


def precision_note(encoder: Encoder, devices: Sequence[str]) -> str | None:
    """The line saying that a job over ``devices`` (checked names) that mixes CUDA and the CPU
    stores ``encoder``'s vectors, under one encoder id, from two precisions: its reduced one
    (bf16 or fp16: autocast, used on CUDA only) and fp32 on the CPU. None otherwise: on the
    CPU alone it runs in fp32, as the embeddings record, and nothing there would change it."""
    asked = encoder.config.precision
    cuda = [d for d in devices if d.startswith("cuda")]
    if asked == "fp32" or "cpu" not in devices or not cuda:
        return None
    return (
        f"{encoder.encoder_id} computes in {asked} on {', '.join(dict.fromkeys(cuda))} but in "
        "fp32 on the CPU (autocast is used on CUDA only): its vectors, under one encoder id, "
        "come from two precisions (each slide's embeddings record which); --devices of one "
        "kind gives one"
    )


def _refuse_wrong_size_everywhere(root: Path, prepared: Sequence[Any]) -> None:
    """One error, not one a slide, when every slide's tiles (two or more) are a size the
    encoder does not take (a setting to change, not a slide to fix).

    Raises:
        InputSizeMismatchError: naming the archive and how many slides.
    """
    errors = [getattr(p, "exception", None) for p in prepared]
    if len(errors) < 2 or not all(isinstance(e, InputSizeMismatchError) for e in errors):
        return  # one slide's own error says it as well
    first = cast(InputSizeMismatchError, errors[0])
    where = f"{root}: all {len(errors)} slide(s)"
    raise InputSizeMismatchError(where, first.tile_size, first.input_size, first.encoder)


def _unknown_slide(archive: Archive, name: str) -> SlideOutcome | None:
    """The failure of a named slide without any store (a typo, or never tiled): the
    resolver's error, which lists the archive's slides; None when it has a store."""
    if archive.store_path(name).exists():
        return None
    try:
        resolve_slide(archive, name)
    except (UnknownSlideError, StoreCorruptError, SchemaMismatchError) as err:  # or damaged
        return SlideOutcome.failure(name, err)
    return None


def _outcome(prepared: EmbedSlide | SlideOutcome) -> SlideOutcome | None:
    """The slide's outcome (None: not done yet, when the job was interrupted)."""
    return prepared if isinstance(prepared, SlideOutcome) else prepared.outcome


def embed_slide(
    root: str | Path,
    slide_id: str,
    encoder: Encoder | str | Path,
    config: EmbedConfig | None = None,
    **options: Any,
) -> SlideOutcome:
    """Embed one slide; raises its error instead of recording it (see :func:`embed`)."""
    summary = embed(root, encoder, config, slides=[slide_id], **options)
    [outcome] = summary.outcomes
    if outcome.status == "failed":
        if outcome.exception is not None:
            raise outcome.exception
        raise WsiSslError(f"{slide_id}: {outcome.error_type}: {outcome.error}")
    return outcome


def embed_for_demo(
    root: str | Path, checkpoint: str | Path, *, progress: bool = True
) -> EmbedSummary:
    """Embed the demo archive with the CNN the demo just trained (its ``cpu-small`` pretrain
    checkpoint or run directory) at the tiles' own size; ``summary.lines()`` gives the report.

    The CPU preset's CNN trains on 64 px crops for speed; fully convolutional, it takes a whole
    256 px tile (0.5 µm/px), where the lesions' nuclei are resolved: on the demo slides its
    MIL AUC is 1.0 over three seeds, against 0.56-0.78 on tiles shrunk to 64 px. So the scale
    check, which would refuse the other input size, is off here.
    """
    if not Path(checkpoint).exists():
        raise CheckpointError(f"{checkpoint}: no such pretrain run or checkpoint")
    archive = open_store(root)
    sizes = {int(archive.slide(s).tiling["tile_size"]) for s in archive.slide_ids}
    whole: dict[str, Any] = {"input_size": sizes.pop()} if len(sizes) == 1 else {}
    encoder = create_encoder(Path(checkpoint), device="cpu", **whole)
    return embed(root, encoder, progress=progress, check_mpp=False)
