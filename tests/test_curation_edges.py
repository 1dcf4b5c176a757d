"""A curation file applied to tiles it does not name: a store re-tiled since the curation,
another scale of the same slides (a multi-scale archive's ``mpp-0.5`` and ``mpp-1`` share
slide ids), slides of other roots; and the coverage plot's left panel (every selected count
visible, outlines over each cluster's whole width)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import wsi_ssl
from tests.conftest import run_cli
from wsi_ssl.config import TilingConfig
from wsi_ssl.errors import ConfigError
from wsi_ssl.ssl.config import PretrainConfig
from wsi_ssl.ssl.curation import curate
from wsi_ssl.ssl.runtime import DistContext
from wsi_ssl.ssl.selection import select_tiles
from wsi_ssl.ssl.stores import scan_stores
from wsi_ssl.ssl.trainer import Trainer
from wsi_ssl.synthetic import write_synthetic_slide

TILING = TilingConfig(tile_size=64, tiles_per_chunk=32)


@pytest.fixture(scope="module")
def scales(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One synthetic slide tiled at 0.5 and 1 µm/px (``arch/mpp-0.5``, ``arch/mpp-1``, the
    same slide id), both embedded with the random-init CNN; and another slide's archive
    ``other`` (tiled, not embedded). Tests copy what they change."""
    from wsi_ssl.embedding.config import EmbedConfig
    from wsi_ssl.encoders import create_encoder

    base = tmp_path_factory.mktemp("curation_edges")
    slide = write_synthetic_slide(base / "s1.tiff", (1024, 768), seed=1)
    wsi_ssl.tile_slides([slide], base / "arch", TILING, mpps=[0.5, 1.0], progress=False)
    encoder = create_encoder("random-cnn", input_size=64)
    for scale in ("mpp-0.5", "mpp-1"):
        summary = wsi_ssl.embed(
            base / "arch" / scale, encoder, EmbedConfig(batch_size=64, device="cpu", workers=0)
        )
        assert not summary.failed, summary.failed
    other = write_synthetic_slide(base / "s2.tiff", (512, 512), seed=2)
    wsi_ssl.tile_slide(other, base / "other", TILING)
    return {
        "slide": slide,
        "fine": base / "arch" / "mpp-0.5",
        "coarse": base / "arch" / "mpp-1",
        "other": base / "other",
    }


def _curate(root: Path, out: Path) -> dict:
    curate(root, out, n_tiles=12, n_clusters=2, dedup_threshold=None)
    return json.loads(out.read_text())


def _as_old_file(data: dict, out: Path) -> Path:
    """The curation as written before the stores' tiles and the root were recorded."""
    out.write_text(json.dumps({k: v for k, v in data.items() if k not in ("stores", "root")}))
    return out


def test_a_store_retiled_since_the_curation_is_refused(
    scales: dict[str, Path], tmp_path: Path
) -> None:
    root = shutil.copytree(scales["fine"], tmp_path / "root")
    cur = tmp_path / "cur.json"
    data = _curate(root, cur)
    (slide_id,) = data["slides"]
    store = wsi_ssl.open_store(root).slide(slide_id)
    record = data["stores"][slide_id]
    assert data["root"] == str(root.resolve())
    assert (record["mpp"], record["tile_size"]) == (0.5, 64)
    keep = select_tiles(scan_stores(root), curation=cur)  # the same tiles: trained on
    assert keep is not None and keep[0].tolist() == data["slides"][slide_id]
    n_before = store.n_tiles
    wsi_ssl.tile_slides(
        [scales["slide"]],
        root,
        TilingConfig(tile_size=64, tiles_per_chunk=32, tissue_threshold=0.0),
        discard_embeddings=True,
        progress=False,
    )
    n_after = wsi_ssl.open_store(root).slide(slide_id).n_tiles
    assert n_after > n_before  # every tile numbered anew, the curated numbers in range
    assert max(data["slides"][slide_id]) < n_after
    with pytest.raises(ConfigError) as err:
        select_tiles(scan_stores(root), curation=cur)
    message = str(err.value)
    assert message.startswith(f"{cur}: {slide_id}'s tiles in ")
    assert "coordinates differ" in message and "re-tiled since the curation" in message
    assert f"curate again (wsi-ssl curate {root.resolve()} --out FILE)" in message
    # a file from before the tiles were recorded: today's range check, nothing more
    old = _as_old_file(data, tmp_path / "old.json")
    keep = select_tiles(scan_stores(root), curation=old)
    assert keep is not None and keep[0].tolist() == data["slides"][slide_id]
    data["slides"][slide_id].append(n_after)
    with pytest.raises(ConfigError, match=f"tiles of {slide_id} beyond its {n_after} tiles"):
        select_tiles(scan_stores(root), curation=_as_old_file(data, old))


def test_another_scale_of_the_curated_slides_is_refused_as_such(
    scales: dict[str, Path], tmp_path: Path
) -> None:
    cur = tmp_path / "cur.json"
    data = _curate(scales["fine"], cur)
    (slide_id,) = data["slides"]
    entries = scan_stores(scales["coarse"])
    assert [e.slide_id for e in entries] == [slide_id]  # another scale, the same slide id
    with pytest.raises(ConfigError) as err:
        select_tiles(entries, curation=cur)
    message = str(err.value)
    assert message.startswith(f"{cur}: {slide_id} was curated at 0.5 µm/px in 64 px tiles")
    assert "is another scale of the slide, 1 µm/px in 64 px tiles" in message
    assert "curate again" in message and "changed" not in message
    out = tmp_path / "run"
    code, _, err_text = run_cli(
        ["pretrain", str(scales["coarse"]), "--out", str(out), "--preset", "cpu-small",
         "--steps", "1", "--batch-size", "4", "--device", "cpu", "--num-workers", "0",
         "--quiet", "--curation", str(cur)]
    )  # fmt: skip
    assert code == 2 and err_text.count("\n") == 1, err_text
    assert "is another scale of the slide" in err_text
    assert not (out / "encoder.pt").exists()
    # both scales (--mixed-scales): the scale curated is trained on as curated, the other left
    # out and noted (refused, and curating that one refused the first: no curation passed)
    from wsi_ssl.ssl.curation import curation_notes

    both = scan_stores([scales["fine"], scales["coarse"]], mixed_scales=True)
    keep = select_tiles(both, curation=cur)
    assert keep is not None and [k.tolist() for k in keep] == [data["slides"][slide_id], []]
    (note,) = curation_notes(cur, both)
    assert "names no tile of 1 of the 2 slides" in note and "another scale of a curated" in note


def test_slides_the_curation_does_not_name_are_noted_and_none_named_is_said(
    scales: dict[str, Path], tmp_path: Path
) -> None:
    from wsi_ssl.ssl.curation import curation_notes

    cur = tmp_path / "cur.json"
    data = _curate(scales["fine"], cur)
    both = scan_stores([scales["fine"], scales["other"]])
    keep = select_tiles(both, curation=cur)
    assert keep is not None and [len(k) for k in keep] == [12, 0]
    other = scales["other"].resolve()
    assert curation_notes(cur, both) == [
        f"the curation {cur} names no tile of 1 of the 2 slides (in {other}): training leaves "
        f"them out; 1 of them are not in the archive curated (it was curated on "
        f"{scales['fine'].resolve()}): curate an archive that holds them to train on them"
    ]
    assert curation_notes(cur, scan_stores(scales["fine"])) == []
    config = PretrainConfig.preset("cpu-small", curation=str(cur), batch_size=4, device="cpu")
    trainer = Trainer(
        [scales["fine"], scales["other"]], config, tmp_path / "run", resume=False,
        until_step=None, ctx=DistContext(),
    )  # fmt: skip
    assert trainer.notes[0] == curation_notes(cur, both)[0]  # said when the run starts
    old = _as_old_file(data, tmp_path / "old.json")
    assert curation_notes(old, both) == [
        f"the curation {old} names no tile of 1 of the 2 slides (in {other}): training leaves "
        "them out"
    ]
    for path, curated_on in ((cur, f"it was curated on {scales['fine'].resolve()}"),
                             (old, "the archive it was curated on is not recorded")):  # fmt: skip
        with pytest.raises(ConfigError) as err:
            select_tiles(scan_stores(scales["other"]), curation=path)
        assert str(err.value) == (
            f"{path}: the curation names none of the slides in {other} (1 stores; "
            f"{curated_on}); curate the archive you train on (wsi-ssl curate ROOT --out FILE) "
            "or train on the one it was curated on"
        )


def test_no_tile_left_names_only_the_tests_that_were_on(
    scales: dict[str, Path], tmp_path: Path
) -> None:
    cur = tmp_path / "cur.json"
    data = _curate(scales["fine"], cur)
    (slide_id,) = data["slides"]
    data["slides"][slide_id] = []  # names the slide, but no tile of it
    cur.write_text(json.dumps(data))
    with pytest.raises(ConfigError) as err:
        select_tiles(scan_stores(scales["fine"]), curation=cur)
    assert str(err.value) == f"no tile of 1 stores passes curation {cur}; curate again"
    with pytest.raises(ConfigError) as err:
        select_tiles(scan_stores(scales["fine"]), min_tissue=1.5)
    assert str(err.value) == "no tile of 1 stores passes min_tissue=1.5; lower the thresholds"


def test_coverage_plot_shows_every_selected_count_over_whole_clusters() -> None:
    """Clusters of 3000 tiles beside ones of 40: each selected bar (13, 1) stands above the
    axis bottom on the log scale, and the all/unique outlines span the bars, 0.5 .. k + 0.5."""
    from matplotlib.patches import Rectangle

    from wsi_ssl.ssl.curation import coverage_figure

    sizes = [3000, 900, 40, 13, 1]
    labels = np.repeat(np.arange(len(sizes)), sizes)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(len(labels), 8)).astype(np.float32)
    chosen = np.concatenate([np.flatnonzero(labels == c)[:13] for c in range(len(sizes))])
    keep = np.arange(len(labels))[::2]  # half of every cluster unique
    left = coverage_figure(x, labels, keep, chosen, len(sizes)).axes[0]
    bottom, top = left.get_ylim()
    bars = [p for p in left.patches if isinstance(p, Rectangle)]
    assert [b.get_height() for b in bars] == [13, 13, 13, 13, 1]
    assert all(b.get_height() >= 2 * bottom for b in bars)  # at least 0.3 decades tall
    assert [(b.get_x(), b.get_x() + b.get_width()) for b in bars] == [
        (r - 0.5, r + 0.5) for r in range(1, 6)
    ]
    assert top >= 3000 and left.get_xlim() == (0.5, 5.5)
    outlines = {a.get_label(): a for a in left.get_children() if a.get_label() in
                ("all tiles", "unique")}  # fmt: skip
    assert set(outlines) == {"all tiles", "unique"}
    for artist in outlines.values():
        edges = artist.get_data().edges  # a StepPatch: counts between cluster edges
        assert edges.tolist() == [0.5, 1.5, 2.5, 3.5, 4.5, 5.5]
    assert outlines["all tiles"].get_data()[0].tolist() == sizes
