"""``wsi-ssl demo``: the whole pipeline on synthetic slides (or the slides given).

tile -> DINO pretraining (CPU, a minute or two) -> embeddings -> FAISS region search ->
cross-validated ABMIL with an attention heatmap. Each stage prints its summary lines and
leaves its picture in the output folder; re-running resumes every stage.
"""

from __future__ import annotations

import importlib
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from wsi_ssl.config import TilingConfig
from wsi_ssl.errors import ConfigError
from wsi_ssl.outcome import ErrorText, SlideOutcome

if TYPE_CHECKING:
    from wsi_ssl.storage.archive import Archive

DEMO_SLIDES = 12
"""Synthetic demo slides; the odd seeds carry a lesion (crowded nuclei), labelled "tumour"."""

DEMO_SIZE = (4096, 3072)


@dataclass
class DemoResult:
    root: Path
    slides: list[Path]
    lines: list[str] = field(default_factory=list)
    pictures: list[Path] = field(default_factory=list)
    failed: bool = False
    tiled: int = 0
    """Slides in the archive after the tile stage (0: no archive to show, no later stage)."""


def demo_slides(
    out: Path, *, progress: bool = False, echo: Callable[[str], None] | None = None
) -> dict[Path, str]:
    """Write (once) the labelled synthetic demo slides; returns ``{path: label}``.

    Args:
        progress: a progress bar (on stderr) while slides are written (seconds each).
        echo: told first how many slides are to be written, when some are.
    """
    from tqdm.auto import tqdm

    from wsi_ssl.storage.atomic import atomic_path
    from wsi_ssl.synthetic import write_synthetic_slide

    paths = [out / "slides" / f"demo-{seed}.tiff" for seed in range(DEMO_SLIDES)]
    missing = [seed for seed, path in enumerate(paths) if not path.exists()]
    if missing and echo is not None:
        echo(f"== slides: writing {len(missing)} synthetic slide{'s' * (len(missing) > 1)}")
    bar = tqdm(missing, desc="slides", unit="slide", disable=not progress, dynamic_ncols=True)
    for seed in bar:
        paths[seed].parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(paths[seed]) as tmp:
            write_synthetic_slide(tmp, DEMO_SIZE, seed=seed, lesion=seed % 2 == 1)
    return {path: "tumour" if seed % 2 == 1 else "normal" for seed, path in enumerate(paths)}


_LATER_STAGES = ("wsi_ssl.ssl.demo", "wsi_ssl.embedding", "wsi_ssl.search.demo", "wsi_ssl.mil.demo")
"""Imported before the tile stage: without the ``ml`` extra (torch) the demo stops at once, not
after tiling."""


class _Say(Protocol):
    """Keeps a stage's summary lines and echoes each one."""

    def __call__(self, *lines: str) -> None: ...


def run_demo(
    out: str | Path,
    slides: Sequence[str | Path] = (),
    *,
    labels: str | Path | Mapping[str, str] | None = None,
    pretrain_steps: int = 200,
    tiling: TilingConfig | None = None,
    progress: bool = True,
    echo: Callable[[str], None] | None = None,
    error_text: ErrorText | None = None,
) -> DemoResult:
    """Run every stage on the demo slides (written here) or on ``slides``; when no slide is
    tiled it stops there (``failed``), leaving no archive folder of its own.

    Args:
        out: output folder (the archive is ``out/archive``).
        slides: slide files; none: the synthetic demo slides, labelled for the MIL step.
        labels: a labels CSV (or mapping) for the MIL step when ``slides`` are given; without
            one the MIL step is skipped.
        pretrain_steps: DINO steps of the CPU pretraining run.
        tiling: the tiling settings (default ``TilingConfig()``: 256 px at 0.5 µm/px); an
            ``mpp_override`` or ``tissue_threshold`` for your own slides.
        progress: progress bars.
        echo: called with each summary line as soon as its stage ends.
        error_text: words a slide's error (the command's flags for the CLI).
    """
    for module in _LATER_STAGES:
        importlib.import_module(module)
    _check_inputs(slides, labels, pretrain_steps)
    out = Path(out)
    result = DemoResult(out / "archive", [Path(s) for s in slides])
    say = _sayer(result, echo)
    if not slides:  # said before the ~25 s it takes to write them
        demo = demo_slides(out, progress=progress, echo=say)
        result.slides = list(demo)
        labels = {path.name: label for path, label in demo.items()} if labels is None else labels
    if not _tile(result, out, tiling or TilingConfig(), say, progress, error_text):
        return result
    run_dir = _pretrain(result, out, pretrain_steps, say, progress)
    encoder_id = _embed(result.root, run_dir, say, progress)
    _search(result, out, encoder_id, say)
    _mil(result, out, labels, encoder_id, say)
    return result


def _check_inputs(
    slides: Sequence[str | Path],
    labels: str | Path | Mapping[str, str] | None,
    pretrain_steps: int,
) -> None:
    """Refuse no pretraining steps, and labels without slides, before anything is written."""
    if pretrain_steps < 1:
        raise ConfigError(
            f"pretrain_steps must be >= 1, got {pretrain_steps}", parameters=("pretrain_steps",)
        )
    if labels is not None and not slides:
        raise ConfigError(
            "labels are for your own slides: give the slide files too (the demo's synthetic "
            "slides come labelled)",
            parameters=("labels",),
        )


def _sayer(result: DemoResult, echo: Callable[[str], None] | None) -> _Say:
    """A function that keeps summary lines in ``result.lines`` and echoes each one."""
    show = echo or (lambda _: None)

    def say(*lines: str) -> None:
        result.lines.extend(lines)
        for line in lines:
            show(line)

    return say


def _tile(
    result: DemoResult,
    out: Path,
    tiling: TilingConfig,
    say: _Say,
    progress: bool,
    error_text: ErrorText | None,
) -> bool:
    """Tile ``result.slides`` into ``result.root`` and show each tiled slide; whether any was
    tiled (none: it says why, and leaves no archive folder that this run made)."""
    from wsi_ssl.storage import open_store
    from wsi_ssl.storage.archive import is_archive_root
    from wsi_ssl.tiling.batch import tile_slides

    existed = result.root.exists()
    say("== tile")
    summary = tile_slides(result.slides, result.root, tiling, progress=progress)
    failed = [r for r in summary.outcomes if r.status == "failed"]
    for r in failed:
        say(f"FAILED {r.slide}: {r.message(error_text)}")
    result.failed = bool(failed)
    archive = open_store(result.root) if is_archive_root(result.root) else None
    result.tiled = len(archive.slide_ids) if archive is not None else 0
    if archive is None or not result.tiled:
        said = "lines above say" if len(failed) > 1 else "line says"
        why = f" (the FAILED {said} why)" if failed else ""
        say(f"no slide was tiled{why}; the later stages need at least one")
        result.failed = True
        if not existed:
            _drop_unused_archive(result.root)
        return False
    for r in summary.outcomes:
        if r.status != "failed":
            _show_tiled(result, archive, out, r, say)
    return True


_UNUSED_ARCHIVE = {"catalog.sqlite"} | {f"catalog.sqlite-{s}" for s in ("journal", "wal", "shm")}
"""What a tile run that stored no slide leaves in a new archive root, besides ``.locks``."""


def _drop_unused_archive(root: Path) -> None:
    """Remove ``root`` (made by this run, no slide tiled) when it holds only the catalog of the
    failures said above and lock files; with anything else in it, it is left as it is."""
    for path in root.rglob("*"):
        inside = path.relative_to(root).parts
        if inside[0] == ".locks":
            if path.is_file() and path.suffix != ".lock":
                return
        elif len(inside) > 1 or path.name not in _UNUSED_ARCHIVE:
            return
    shutil.rmtree(root, ignore_errors=True)


def _show_tiled(
    result: DemoResult, archive: Archive, out: Path, outcome: SlideOutcome, say: _Say
) -> None:
    """Draw a tiled slide's tiles (``OUT/<slide>_tiles.png``) and say its scale and tiles."""
    slide = Path(outcome.slide)
    store = archive.slide(outcome.details["slide_id"])
    result.pictures.append(archive.plot_tiles(store.slide_id, out / f"{slide.stem}_tiles.png"))
    w, h = store.source["dimensions"]
    say(
        f"{slide.name}: {w}x{h} px at {store.source['mpp']:.3f} µm/px "
        f"({store.source['mpp_source']}, {store.source['reader']}) -> {store.n_tiles} tiles "
        f"of {store.tiling['tile_size']} px at {store.tiling['mpp']} µm/px, {outcome.status}"
    )


def _pretrain(result: DemoResult, out: Path, steps: int, say: _Say, progress: bool) -> Path:
    """DINO-pretrain a CPU backbone on the archive's tiles (``OUT/pretrain``); its run dir."""
    from wsi_ssl.ssl.demo import demo_pretrain

    say("== pretrain (DINO, CPU backbone)")
    run = demo_pretrain(result.root, out / "pretrain", steps=steps, progress=progress)
    speed = f"{run.images_per_s:.1f} images/s" if run.images_per_s else "resumed"
    loss = f"{run.final_loss:.3f}" if run.final_loss is not None else "n/a"
    say(f"{run.step}/{run.total_steps} steps, final loss {loss}, {speed}")
    if run.loss_plot is not None:
        loss_plot = out / "pretrain" / run.loss_plot.name  # as the other pictures are named
        say(f"loss curve: {loss_plot}")
        result.pictures.append(loss_plot)
    return run.out_dir


def _embed(root: Path, run_dir: Path, say: _Say, progress: bool) -> str:
    """Embed every tile with the pretrained backbone; its encoder_id."""
    from wsi_ssl.embedding import embed_for_demo

    say("== embed")
    embedded = embed_for_demo(root, run_dir, progress=progress)
    say(*embedded.lines())
    return embedded.encoder_id


def _search(result: DemoResult, out: Path, encoder_id: str, say: _Say) -> None:
    """Query a region of the first slide in the FAISS index (``OUT/gallery.png``)."""
    from wsi_ssl.search.demo import demo_region_gallery

    say("== search (region query)")
    _, gallery, lines = demo_region_gallery(result.root, out / "gallery.png", encoder=encoder_id)
    say(*lines)
    say(f"browse it: wsi-ssl serve {result.root} --index {encoder_id}")
    result.pictures.append(gallery)


def _mil(
    result: DemoResult,
    out: Path,
    labels: str | Path | Mapping[str, str] | None,
    encoder_id: str,
    say: _Say,
) -> None:
    """Cross-validate attention MIL on the labelled slides (``OUT/mil``); skipped without
    labels."""
    from wsi_ssl.mil.demo import mil_for_demo

    say("== MIL (attention MIL, cross-validated)")
    if labels is None:
        say("skipped: give labels (a CSV with columns slide,label) to train a slide classifier")
        return
    # the labelled slides that failed to tile (said above) are left out, and named
    mil = mil_for_demo(
        result.root, labels, out / "mil", encoder=encoder_id, skip_missing=result.failed
    )
    say(*mil.lines)
    result.pictures.extend(mil.pictures)
