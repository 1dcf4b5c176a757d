"""``wsi-ssl demo``: the whole pipeline on synthetic slides (or the slides given).

tile -> DINO pretraining (CPU, a minute or two) -> embeddings -> FAISS region search ->
cross-validated ABMIL with an attention heatmap. Each stage prints its summary lines and
leaves its picture in the output folder; re-running resumes every stage.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from wsi_ssl.config import TilingConfig
from wsi_ssl.errors import ConfigError
from wsi_ssl.outcome import ErrorText

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
    """Run every stage on the demo slides (written here) or on ``slides``.

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

    Size: one short block per stage, in pipeline order, so the demo reads as the pipeline
    does.
    """
    from wsi_ssl.embedding import embed_for_demo
    from wsi_ssl.mil.demo import mil_for_demo
    from wsi_ssl.search.demo import demo_region_gallery
    from wsi_ssl.ssl.demo import demo_pretrain
    from wsi_ssl.storage import open_store
    from wsi_ssl.storage.archive import is_archive_root
    from wsi_ssl.tiling.batch import tile_slides

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
    out = Path(out)
    root = out / "archive"
    result = DemoResult(root, [Path(s) for s in slides])
    show = echo or (lambda _: None)

    def say(*lines: str) -> None:
        result.lines.extend(lines)
        for line in lines:
            show(line)

    if not slides:  # said before the ~25 s it takes to write them
        demo = demo_slides(out, progress=progress, echo=say)
        result.slides = list(demo)
        labels = {path.name: label for path, label in demo.items()} if labels is None else labels
    say("== tile")
    summary = tile_slides(result.slides, root, tiling or TilingConfig(), progress=progress)
    for r in summary.outcomes:
        if r.status == "failed":
            result.failed = True
            say(f"FAILED {r.slide}: {r.message(error_text)}")
    archive = open_store(root) if is_archive_root(root) else None
    result.tiled = len(archive.slide_ids) if archive is not None else 0
    if archive is None or not result.tiled:
        failed = sum(r.status == "failed" for r in summary.outcomes)
        why = " (the FAILED lines above say why)" if failed > 1 else " (the FAILED line says why)"
        say(f"no slide was tiled{why if failed else ''}; the later stages need at least one")
        result.failed = True
        return result
    for r in summary.outcomes:
        if r.status == "failed":
            continue
        store = archive.slide(r.details["slide_id"])
        picture = archive.plot_tiles(store.slide_id, out / f"{Path(r.slide).stem}_tiles.png")
        result.pictures.append(picture)
        w, h = store.source["dimensions"]
        say(
            f"{Path(r.slide).name}: {w}x{h} px at {store.source['mpp']:.3f} µm/px "
            f"({store.source['mpp_source']}, {store.source['reader']}) -> {store.n_tiles} tiles "
            f"of {store.tiling['tile_size']} px at {store.tiling['mpp']} µm/px, {r.status}"
        )

    say("== pretrain (DINO, CPU backbone)")
    run = demo_pretrain(root, out / "pretrain", steps=pretrain_steps, progress=progress)
    speed = f"{run.images_per_s:.1f} images/s" if run.images_per_s else "resumed"
    loss = f"{run.final_loss:.3f}" if run.final_loss is not None else "n/a"
    say(f"{run.step}/{run.total_steps} steps, final loss {loss}, {speed}")
    if run.loss_plot is not None:
        loss_plot = out / "pretrain" / run.loss_plot.name  # as the other pictures are named
        say(f"loss curve: {loss_plot}")
        result.pictures.append(loss_plot)

    say("== embed")
    embedded = embed_for_demo(root, run.out_dir, progress=progress)
    say(*embedded.lines())

    say("== search (region query)")
    _, gallery, lines = demo_region_gallery(root, out / "gallery.png", encoder=embedded.encoder_id)
    say(*lines)
    say(f"browse it: wsi-ssl serve {root} --index {embedded.encoder_id}")
    result.pictures.append(gallery)

    say("== MIL (attention MIL, cross-validated)")
    if labels is None:
        say("skipped: give labels (a CSV with columns slide,label) to train a slide classifier")
        return result
    # the labelled slides that failed to tile (said above) are left out, and named
    mil = mil_for_demo(
        root, labels, out / "mil", encoder=embedded.encoder_id, skip_missing=result.failed
    )
    say(*mil.lines)
    result.pictures.extend(mil.pictures)
    return result
