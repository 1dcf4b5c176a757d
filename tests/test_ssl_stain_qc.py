"""Pretraining data that fits histology: QC-flagged tiles left out and stains normalised, on
real H&E tiles (CMU-1-Small-Region tiled at 64 px, whose QC flags some tiles) and a real H&E
reference patch; through the Python API and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import wsi_ssl
from tests.conftest import run_cli
from wsi_ssl.errors import ConfigError, StainNormalizationError, StainReferenceError
from wsi_ssl.search import SearchIndex
from wsi_ssl.ssl import PretrainConfig, pretrain
from wsi_ssl.ssl.dataset import TileDataset
from wsi_ssl.ssl.selection import select_tiles
from wsi_ssl.ssl.stores import scan_stores
from wsi_ssl.stain import StainNormalizer, normalize_array, rgb_to_lab
from wsi_ssl.storage import open_store
from wsi_ssl.tiling.qc import kept_tiles

pytestmark = pytest.mark.slow  # tiles a real slide and trains a few steps

REFERENCE = "tissue-level0-4302-10273-4814-10785.png"
TINY = [
    "--preset", "cpu-small", "--arch", "resnet18_tiny", "--global-crop-size", "32",
    "--local-crop-size", "16", "--out-dim", "64", "--batch-size", "8", "--steps", "2",
    "--device", "cpu", "--num-workers", "0", "--quiet",
]  # fmt: skip


@pytest.fixture(scope="module")
def cmu_root(cmu_small: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cmu_qc")
    wsi_ssl.tile_slide(cmu_small, root, wsi_ssl.TilingConfig(tile_size=64, tiles_per_chunk=32))
    return root


@pytest.fixture(scope="module")
def reference(patches_dir: Path) -> Path:
    return patches_dir / REFERENCE


def _tiny(**changes: object) -> PretrainConfig:
    base = {
        "arch": "resnet18_tiny",
        "global_crop_size": 32,
        "local_crop_size": 16,
        "out_dim": 64,
        "batch_size": 8,
        "steps": 2,
        "device": "cpu",
        "num_workers": 0,
        "progress": False,
    }
    return PretrainConfig.preset("cpu-small", **{**base, **changes})


def test_qc_flagged_tiles_are_left_out(cmu_root: Path, tmp_path: Path) -> None:
    entries = scan_stores(cmu_root)
    store = open_store(entries[0].root).slide(entries[0].slide_id)
    ok = kept_tiles(store)
    assert 0 < int((~ok).sum()) < len(ok)  # the real slide has flagged tiles
    focus, flagged = store.qc()["focus"], np.flatnonzero(~ok)
    keep = select_tiles(entries, skip_flagged=True)
    assert keep is not None and keep[0].tolist() == np.flatnonzero(ok).tolist()
    assert (focus[keep[0]] >= store.tiling["qc_min_focus"]).all()
    dataset = TileDataset(entries, keep=keep)
    assert len(dataset) == int(ok.sum())
    assert all(dataset.locate(i)[1] not in set(flagged.tolist()) for i in range(len(dataset)))
    run = pretrain(cmu_root, _tiny(skip_flagged_tiles=True), out=tmp_path / "run")
    assert run.sources["n_selected"] == int(ok.sum()) < run.sources["n_tiles"]
    # combined with another filter, still only unflagged tiles
    both = select_tiles(entries, min_tile_std=5.0, skip_flagged=True)
    assert both is not None and set(both[0].tolist()) <= set(keep[0].tolist())


def test_stains_are_normalised_before_augmentation(cmu_root: Path, reference: Path) -> None:
    entries = scan_stores(cmu_root)
    normalizer = StainNormalizer("reinhard", reference)
    plain = TileDataset(entries)
    normed = TileDataset(entries, stain=normalizer)
    index = int(np.argmax([plain.read_tile(i).std() for i in range(0, len(plain), 25)])) * 25
    tile, out = plain[index].numpy(), normed[index].numpy()
    assert out.dtype == np.uint8 and out.shape == tile.shape
    np.testing.assert_array_equal(out, normalize_array(tile, "reinhard", reference))
    with Image.open(reference) as im:
        ref = np.asarray(im.convert("RGB"))

    def lab_mean(rgb: np.ndarray) -> np.ndarray:
        return (
            rgb_to_lab(torch.from_numpy(np.array(rgb)).double() / 255)
            .reshape(-1, 3)
            .mean(0)
            .numpy()
        )

    # Reinhard matches each Lab channel's mean to the reference's
    before = np.abs(lab_mean(tile) - lab_mean(ref)).max()
    after = np.abs(lab_mean(out) - lab_mean(ref)).max()
    assert after < 1.5 < before


def test_pretrain_with_stain_normalisation_through_the_api_and_cli(
    cmu_root: Path, reference: Path, tmp_path: Path
) -> None:
    run = pretrain(
        cmu_root,
        _tiny(stain_normalize="macenko", stain_reference=str(reference)),
        out=tmp_path / "api",
    )
    assert run.step == 2 and run.final_loss is not None and np.isfinite(run.final_loss)
    code, out, _ = run_cli(
        ["pretrain", str(cmu_root), "--out", str(tmp_path / "cli"), *TINY, "--json",
         "--stain-normalize", "reinhard", "--stain-reference", str(reference),
         "--skip-flagged-tiles"]
    )  # fmt: skip
    assert code == 0
    summary = json.loads(out)
    assert summary["config"]["stain_normalize"] == "reinhard"
    assert summary["config"]["stain_reference"] == str(reference)
    assert summary["config"]["skip_flagged_tiles"] is True and summary["step"] == 2


def test_bad_stain_settings_are_refused_before_anything_is_written(
    cmu_root: Path, patches_dir: Path, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match="stain_normalize and stain_reference go together"):
        _tiny(stain_normalize="macenko")
    blank = patches_dir / "almost-white-1.png"
    with pytest.raises(StainNormalizationError):
        pretrain(
            cmu_root,
            _tiny(stain_normalize="macenko", stain_reference=str(blank)),
            out=tmp_path / "blank",
        )
    assert not (tmp_path / "blank").exists()
    code, _, err = run_cli(
        ["pretrain", str(cmu_root), "--out", str(tmp_path / "x"), *TINY,
         "--stain-normalize", "macenko"]
    )  # fmt: skip
    assert code == 2 and err.count("\n") == 1
    assert "stain_reference" in err and "--stain-reference" in err  # the CLI's flag hint
    assert not (tmp_path / "x").exists()


def test_embedding_follows_the_stain_normalisation_of_pretraining(
    cmu_root: Path, reference: Path, patches_dir: Path, tmp_path: Path
) -> None:
    """A run pretrained on Reinhard-normalised tiles records the reference; `embed` and the
    evaluation harness then normalise as it did (the vectors are the encoder's on normalised
    tiles), `--stain-normalize none` turns it off, and a reference gone since is one line."""
    import shutil

    from wsi_ssl.embedding import embed
    from wsi_ssl.encoders import create_encoder
    from wsi_ssl.evaluation.features import image_features, square_resized
    from wsi_ssl.evaluation.tasks import LabelledImages
    from wsi_ssl.search.vectors import normalise
    from wsi_ssl.storage.embeddings import read_embeddings

    ref = tmp_path / "ref.png"
    shutil.copy(reference, ref)
    run = pretrain(
        cmu_root, _tiny(stain_normalize="reinhard", stain_reference=str(ref)), out=tmp_path / "run"
    )
    enc = create_encoder(str(run.out_dir))
    assert enc.config.stain is not None and enc.config.stain["method"] == "reinhard"
    assert enc.config.stain["reference_path"] == str(ref.resolve())
    normalizer = StainNormalizer("reinhard", ref)

    def on_normalised(tiles: np.ndarray) -> np.ndarray:
        x = normalizer(torch.from_numpy(tiles).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        with torch.inference_mode():
            return enc(x.contiguous()).numpy()

    summary = embed(cmu_root, enc, device="cpu", workers=0, batch_size=16)
    assert not summary.failed
    assert "tiles stain-normalised (reinhard) to ref.png" in summary.total_lines()
    store = open_store(cmu_root).slide(open_store(cmu_root).slide_ids[0])
    emb = read_embeddings(store, enc.encoder_id)
    assert (
        emb.attrs["stain"]["method"] == "reinhard" and emb.attrs["stain"]["reference"] == "ref.png"
    )
    tiles = np.asarray(store.tiles[:8])
    assert np.array_equal(emb.features[:8], on_normalised(tiles).astype(np.float16))

    # the evaluation harness's labelled images: normalised the same way
    paths = sorted(str(p) for p in patches_dir.glob("*.png"))[:3]
    images = tuple(np.asarray(Image.open(p).convert("RGB")) for p in paths)
    labelled = LabelledImages(tuple(paths), images, np.zeros(3, int), ("a",))
    feats = image_features(enc, labelled, None, batch_size=4)
    stack = np.stack([square_resized(im, enc.input_size) for im in images])
    np.testing.assert_allclose(feats, on_normalised(stack), rtol=1e-5, atol=1e-5)

    # the index records the normalisation; a picture query is normalised the same way
    index = SearchIndex.build(cmu_root, enc.encoder_id, kind="flat")
    assert index.record["stain"]["method"] == "reinhard"
    code, out, err = run_cli(["search", str(cmu_root), "--list"])  # says how, in one line
    assert code == 0 and "\n  tiles stain-normalised: reinhard to ref.png\n" in out, err
    query = index.query_image(patches_dir / "high-nuclei-score-level0.png", encoder=enc)
    size = int(index.tiling["tile_size"])
    padded = np.pad(query.image, ((0, size), (0, size), (0, 0)), constant_values=255)
    cut = np.stack([padded[y : y + size, x : x + size] for x, y in query.tile_coords])
    # a query holds unit vectors
    np.testing.assert_allclose(query.vectors, normalise(on_normalised(cut)), rtol=1e-4, atol=1e-5)
    with torch.inference_mode():
        raw_vectors = normalise(enc(torch.from_numpy(cut)).numpy())
    assert not np.allclose(query.vectors, raw_vectors, rtol=1e-3, atol=1e-3)
    assert query.stain == "reinhard to ref.png"
    said = "stain-normalised (reinhard to ref.png) as the index's slides"
    assert said in index.search(query, k=1).table()
    # an index whose embeddings did not record the reference's path (made before it was):
    # the picture is embedded as it is, as before, not refused
    recorded = dict(index.record["stain"])
    index.record["stain"] = {k: v for k, v in recorded.items() if k != "reference_path"}
    unrecorded = index.query_image(patches_dir / "high-nuclei-score-level0.png", encoder=enc)
    np.testing.assert_allclose(unrecorded.vectors, raw_vectors, rtol=1e-4, atol=1e-5)
    assert unrecorded.stain is None
    index.record["stain"] = recorded
    # a MIL run trained on these vectors notes a slide embedded otherwise
    from wsi_ssl.mil.config import MILConfig
    from wsi_ssl.mil.run import MILRun

    info = {"encoder_id": enc.encoder_id, "stain": emb.attrs["stain"], "checkpoints": []}
    trained_on_normalised = MILRun(tmp_path, info, MILConfig(), [], [], torch.device("cpu"))
    assert trained_on_normalised.slide_note(store) == ""

    argv = ["embed", str(cmu_root), "--encoder", str(run.out_dir), "--device", "cpu"]
    argv += ["--workers", "0", "--batch-size", "16", "--quiet"]
    code, out, err = run_cli([*argv, "--stain-normalize", "none"])  # would replace them
    assert code == 1 and "were made from tiles stain-normalised (reinhard) to ref.png" in out
    assert "pass --no-resume to replace them" in out, out
    code, _, err = run_cli([*argv, "--stain-normalize", "none", "--no-resume"])
    assert code == 0, err
    plain = read_embeddings(store, enc.encoder_id)
    assert "stain" not in plain.attrs
    assert trained_on_normalised.slide_note(store) == (
        "embedded with another stain normalisation than the training slides "
        "(this slide: none; training: reinhard to ref.png)"
    )
    code, _, err = run_cli(["index", str(cmu_root), "--add", "--quiet"])
    assert code == 2 and "embedded with another stain normalisation than the index" in err, err
    with torch.inference_mode():
        direct = enc(torch.from_numpy(tiles)).numpy().astype(np.float16)
    assert np.array_equal(plain.features[:8], direct)
    ref.write_bytes(ref.read_bytes() + b"\0")  # changed since pretraining
    code, out, err = run_cli([*argv, "--no-resume"])
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "stain-normalised (reinhard)" in err and "changed" in err and "none" in err
    assert "stain" not in read_embeddings(store, enc.encoder_id).attrs  # nothing was touched
    with pytest.raises(StainReferenceError, match="a picture query is normalised with that"):
        index.query_image(patches_dir / "high-nuclei-score-level0.png", encoder=enc)
    with pytest.raises(StainReferenceError, match="put that image back"):  # evaluate: no switch
        image_features(enc, labelled, None, batch_size=4)


def test_a_job_whose_slides_all_failed_does_not_say_it_normalised_tiles() -> None:
    from wsi_ssl.embedding.summary import EmbedSummary
    from wsi_ssl.outcome import SlideOutcome

    config = {"stain_normalize": "macenko", "stain_reference": "/refs/ref.png"}
    failed = SlideOutcome.failure("a", ValueError("unreadable"))
    lines = EmbedSummary(outcomes=[failed], root="r", encoder_id="e", config=config).lines()
    assert not any("stain-normalised" in line for line in lines)
    done = SlideOutcome("b", "complete", 3)
    lines = EmbedSummary(outcomes=[failed, done], root="r", encoder_id="e", config=config).lines()
    assert "tiles stain-normalised (macenko) to ref.png" in lines


def test_a_reference_changed_in_place_is_told_apart_in_the_refusal(
    small_archive: Path, tmp_path: Path
) -> None:
    """The same reference path with other content: the refusal says so (both sides read
    "macenko to ref.png", which named no difference)."""
    import shutil

    from PIL import Image

    root = shutil.copytree(small_archive, tmp_path / "root")
    slide = open_store(root).slide(open_store(root).slide_ids[0])
    tiles = slide.tiles[:]
    darkest = tiles.reshape(len(tiles), -1).mean(1).argsort()
    reference = tmp_path / "ref.png"
    Image.fromarray(tiles[darkest[0]]).save(reference)
    argv = ["embed", str(root), "--encoder", "random-cnn", "--quiet", "--workers", "0"]
    argv += ["--stain-normalize", "macenko", "--stain-reference", str(reference)]
    code, _, err = run_cli([*argv, "--no-resume"])
    assert code == 0, err
    Image.fromarray(tiles[darkest[1]]).save(reference)  # exported again, other pixels
    code, out, _ = run_cli(argv)
    assert code == 1 and "(a reference of other content: sha256 " in out, out
