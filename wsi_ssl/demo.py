"""``wsi-ssl demo``: the whole pipeline built so far on a synthetic slide (or the slides given)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from wsi_ssl.config import TilingConfig


@dataclass
class DemoResult:
    root: Path
    slides: list[Path]
    lines: list[str] = field(default_factory=list)
    pictures: list[Path] = field(default_factory=list)


def run_demo(
    out: str | Path, slides: Sequence[str | Path] = (), *, progress: bool = True
) -> DemoResult:
    """Write demo slides (unless given), tile them, and draw the kept tiles on the thumbnail."""
    from wsi_ssl.storage import open_store
    from wsi_ssl.synthetic import write_synthetic_slide
    from wsi_ssl.tiling.batch import tile_slides

    out = Path(out)
    root = out / "archive"
    if not slides:
        slides = [
            write_synthetic_slide(out / "slides" / f"demo-{seed}.tiff", (4096, 3072), seed=seed)
            for seed in range(2)
        ]
    result = DemoResult(root, [Path(s) for s in slides])
    summary = tile_slides(result.slides, root, TilingConfig(), progress=progress)
    archive = open_store(root)
    for r in summary.results:
        if r.status == "failed":
            result.lines.append(f"FAILED {r.path}: {r.error}")
            continue
        store = archive.slide(r.slide_id)  # type: ignore[arg-type]
        picture = archive.plot_tiles(store.slide_id, out / f"{Path(r.path).stem}_tiles.png")
        result.pictures.append(picture)
        w, h = store.source["dimensions"]
        result.lines.append(
            f"{Path(r.path).name}: {w}x{h} px at {store.source['mpp']:.3f} µm/px "
            f"({store.source['mpp_source']}, {store.source['reader']}) -> {store.n_tiles} tiles "
            f"of {store.tiling['tile_size']} px at {store.tiling['mpp']} µm/px, {r.status}"
        )
    return result
