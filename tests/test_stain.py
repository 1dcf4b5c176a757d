"""Stain normalisation against the published formulations (reference computations written here
from the papers, in numpy / skimage / scikit-learn) and on real H&E tiles."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.color import lab2rgb, rgb2lab
from sklearn.decomposition import DictionaryLearning

from wsi_ssl.errors import StainNormalizationError
from wsi_ssl.stain import (
    METHODS,
    StainNormalizer,
    lab_to_rgb,
    macenko_stains,
    normalize_array,
    optical_density,
    rgb_to_lab,
    vahadane_stains,
)

TILE = "tissue-level0-4302-10273-4814-10785.png"
OTHER = "medium-nuclei-score-level1.png"


def crop(patches_dir: Path, name: str, size: int = 160) -> np.ndarray:
    rgb = np.asarray(Image.open(patches_dir / name).convert("RGB"))
    return np.array(rgb[:size, :size])


@pytest.fixture(scope="module")
def tile(patches_dir: Path) -> np.ndarray:
    return crop(patches_dir, TILE)


def shifted(image: np.ndarray) -> np.ndarray:
    """The same tissue with other stains: each channel's optical density rescaled."""
    od = -np.log((image.astype(np.float64) + 1) / 240)
    out = 240 * np.exp(-od * np.array([1.35, 0.8, 1.15])) - 1
    return out.round().clip(0, 255).astype(np.uint8)


def reference_macenko(image: np.ndarray, alpha: float = 1, beta: float = 0.15) -> np.ndarray:
    """Macenko et al. 2009 in numpy: the (2, 3) stain vectors, haematoxylin first."""
    od = -np.log((image.reshape(-1, 3).astype(np.float64) + 1) / 240)
    od_hat = od[~np.any(od < beta, axis=1)]
    _, vectors = np.linalg.eigh(np.cov(od_hat.T))
    plane = vectors[:, 1:3] * np.where(vectors[:, 1:3].sum(0) < 0, -1, 1)
    that = od_hat @ plane
    phi = np.arctan2(that[:, 1], that[:, 0])
    lo, hi = np.percentile(phi, alpha), np.percentile(phi, 100 - alpha)
    v1 = plane @ np.array([np.cos(lo), np.sin(lo)])
    v2 = plane @ np.array([np.cos(hi), np.sin(hi)])
    he = np.array([v1, v2]) if v1[0] > v2[0] else np.array([v2, v1])
    return he / np.linalg.norm(he, axis=1, keepdims=True)


def reference_macenko_normalize(image: np.ndarray, ref: np.ndarray) -> np.ndarray:
    def conc(img: np.ndarray, he: np.ndarray) -> np.ndarray:
        od = -np.log((img.reshape(-1, 3).astype(np.float64) + 1) / 240)
        return np.linalg.lstsq(he.T, od.T, rcond=None)[0]  # (2, P)

    he_ref, he_src = reference_macenko(ref), reference_macenko(image)
    c_ref, c_src = conc(ref, he_ref), conc(image, he_src)
    max_ref, max_src = np.percentile(c_ref, 99, axis=1), np.percentile(c_src, 99, axis=1)
    c = c_src * (max_ref / max_src)[:, None]
    return np.clip(240 * np.exp(-he_ref.T @ c), 0, 255).T.reshape(image.shape)


def reference_reinhard(image: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Reinhard et al. 2001: per-channel mean/std matching, in skimage's CIE Lab."""
    lab, lab_ref = rgb2lab(image), rgb2lab(ref)
    mean, std = lab.mean((0, 1)), lab.std((0, 1))
    out = (lab - mean) / std * lab_ref.std((0, 1)) + lab_ref.mean((0, 1))
    return np.clip(lab2rgb(out), 0, 1) * 255


def cosines(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_lab_matches_skimage(tile: np.ndarray) -> None:
    rgb = torch.from_numpy(tile / 255.0)
    lab = rgb_to_lab(rgb)
    np.testing.assert_allclose(lab.numpy(), rgb2lab(tile), atol=1e-4)
    np.testing.assert_allclose(lab_to_rgb(lab).numpy(), tile / 255.0, atol=1e-9)


def test_macenko_matches_published_formulation(patches_dir: Path, tile: np.ndarray) -> None:
    other = crop(patches_dir, OTHER)
    od = optical_density(torch.from_numpy(other.reshape(-1, 3).astype(np.float64)))
    ours = macenko_stains(od[(od >= 0.15).all(1)])
    np.testing.assert_allclose(ours.numpy(), reference_macenko(other), atol=1e-6)
    out = normalize_array(other, "macenko", tile)
    expected = reference_macenko_normalize(other, tile)
    assert np.abs(out - expected).max() <= 1.0  # rounding to uint8 only


@pytest.mark.filterwarnings("ignore:Conversion from CIE-LAB")
def test_reinhard_matches_published_formulation(patches_dir: Path, tile: np.ndarray) -> None:
    other = crop(patches_dir, OTHER)
    out = normalize_array(other, "reinhard", tile)
    assert np.abs(out - reference_reinhard(other, tile)).max() <= 1.0


def sparse_dictionary(od: np.ndarray) -> np.ndarray:
    """scikit-learn's positive dictionary learning of ``od`` (P, 3) with Vahadane's L1 weight:
    two unit stain rows, haematoxylin (more red OD) first: the reference for vahadane_stains."""
    learner = DictionaryLearning(
        n_components=2,
        alpha=0.1,
        fit_algorithm="cd",
        positive_dict=True,
        positive_code=True,
        random_state=0,
    )
    atoms = learner.fit(od).components_
    atoms = atoms / np.linalg.norm(atoms, axis=1, keepdims=True)
    return np.ascontiguousarray(atoms if atoms[0, 0] > atoms[1, 0] else atoms[::-1])


def test_vahadane_matches_sparse_dictionary_learning() -> None:
    """On planted sparse stains (most pixels hold one stain), our sparse NMF finds the same
    stains as scikit-learn's positive dictionary learning, and both lie near the planted ones
    (the L1 penalty pulls the optimum off them a little: eosin at cosine 0.995)."""
    rng = np.random.default_rng(0)
    truth = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]])
    truth /= np.linalg.norm(truth, axis=1, keepdims=True)
    conc = rng.gamma(2.0, 0.4, size=(3000, 2)) * (rng.random((3000, 2)) < [0.6, 0.7])
    od = conc @ truth + rng.normal(0, 0.01, size=(3000, 3))
    od = od[(od >= 0.15).all(1)]
    atoms = sparse_dictionary(od)
    ours = vahadane_stains(torch.from_numpy(od)).numpy()
    assert cosines(ours, atoms).min() > 0.9999
    assert cosines(ours, truth).min() > 0.99


@pytest.mark.parametrize(
    ("method", "tolerance"), [("macenko", 3), ("reinhard", 0.5), ("vahadane", 4)]
)
def test_normalising_to_itself_is_near_identity(
    tile: np.ndarray, method: str, tolerance: float
) -> None:
    out = normalize_array(tile, method, tile)
    assert out.shape == tile.shape and out.dtype == np.uint8
    assert np.abs(out.astype(float) - tile).mean() < tolerance


@pytest.mark.parametrize("method", ["macenko", "vahadane"])
def test_shifted_stains_brought_back_to_reference(tile: np.ndarray, method: str) -> None:
    """Each method measures its own stains: Vahadane's, re-fitted on the normalised tile, are the
    reference's again (before, its fit settled on a one-channel atom, cosine 0.79)."""
    normalizer = StainNormalizer(method, tile)
    moved = shifted(tile)
    assert cosines(normalizer.stain_matrix(moved), normalizer.stains).min() < 0.99
    out = normalizer(torch.from_numpy(moved).permute(2, 0, 1))
    assert cosines(normalizer.stain_matrix(out), normalizer.stains).min() > 0.995
    assert np.abs(out.permute(1, 2, 0).numpy().astype(float) - tile).mean() < 6


def test_reinhard_brings_shifted_statistics_to_reference(tile: np.ndarray) -> None:
    out = normalize_array(shifted(tile), "reinhard", tile)
    lab, lab_ref = rgb2lab(out), rgb2lab(tile)
    np.testing.assert_allclose(lab.mean((0, 1)), lab_ref.mean((0, 1)), atol=0.5)
    np.testing.assert_allclose(lab.std((0, 1)), lab_ref.std((0, 1)), atol=0.5)


@pytest.mark.parametrize("method", METHODS)
def test_blank_tile(patches_dir: Path, tile: np.ndarray, method: str) -> None:
    blank = crop(patches_dir, "no-tissue.png")
    with pytest.raises(StainNormalizationError, match="min_tissue_pixels"):
        StainNormalizer(method, blank)
    with pytest.raises(StainNormalizationError):
        StainNormalizer(method, tile, on_blank="raise")(torch.from_numpy(blank).permute(2, 0, 1))
    keeper = StainNormalizer(method, tile)
    batch = torch.from_numpy(np.stack([blank, tile])).permute(0, 3, 1, 2)
    out = keeper(batch)
    assert out.dtype == torch.uint8 and out.shape == batch.shape
    assert torch.equal(out[0], batch[0]) and keeper.kept_blank == 1


@pytest.mark.parametrize("method", METHODS)
def test_a_greyscale_reference_is_refused(tmp_path: Path, tile: np.ndarray, method: str) -> None:
    """A grey copy of an H&E tile has stained pixels but no colour: both stain vectors came
    out (0.577, 0.577, 0.577) and every normalised tile was grey; saved as a grey PNG too."""
    grey = np.repeat(np.asarray(Image.fromarray(tile).convert("L"))[..., None], 3, axis=2)
    Image.fromarray(grey[..., 0]).save(tmp_path / "grey.png")
    for reference in (grey, tmp_path / "grey.png"):
        with pytest.raises(StainNormalizationError, match="has no colour") as info:
            StainNormalizer(method, reference)
        assert info.value.parameters == ("stain_reference",)
    normalizer = StainNormalizer(method, tile)  # the colour tile itself fits
    out = normalizer(torch.from_numpy(tile).permute(2, 0, 1)).permute(1, 2, 0).numpy()
    assert (out.max(axis=2).astype(int) - out.min(axis=2)).mean() > 20


def test_reference_file_and_unknown_method(patches_dir: Path, tmp_path: Path) -> None:
    normalizer = StainNormalizer("macenko", patches_dir / TILE)
    assert normalizer.reference_name.endswith(TILE)
    with pytest.raises(ValueError, match="method='nope'"):
        StainNormalizer("nope", patches_dir / TILE)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(StainNormalizationError, match=r"bad\.png"):
        StainNormalizer("macenko", bad)


def test_cli_embed_with_stain_normalization(
    cmu_small: Path, patches_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`wsi-ssl embed --stain-normalize reinhard --stain-reference IMAGE`: the vectors are the
    encoder's on the normalised tiles, the provenance names the method and reference, and
    embedding again without normalisation redoes the slide (not "already complete")."""
    from wsi_ssl.cli.main import main
    from wsi_ssl.config import TilingConfig
    from wsi_ssl.encoders import create_encoder
    from wsi_ssl.storage import open_store
    from wsi_ssl.storage.embeddings import read_embeddings
    from wsi_ssl.tiling.batch import tile_slide

    root = tmp_path / "root"
    tile_slide(cmu_small, root, TilingConfig(tile_size=224, codec="zstd", tiles_per_chunk=16))
    reference = patches_dir / TILE
    common = ["--encoder", "random-cnn", "--device", "cpu", "--workers", "0", "--batch-size", "16"]
    stain = ["--stain-normalize", "reinhard", "--stain-reference", str(reference)]
    assert main(["embed", str(root), *common, *stain, "--quiet"]) == 0
    store = open_store(root).slide(open_store(root).slide_ids[0])
    enc = create_encoder("random-cnn")
    emb = read_embeddings(store, enc.encoder_id)
    assert emb.attrs["stain"]["method"] == "reinhard"
    assert (
        emb.attrs["stain"]["reference"] == TILE
        and len(emb.attrs["stain"]["reference_sha256"]) == 64
    )
    normalizer = StainNormalizer("reinhard", reference)
    tiles = torch.from_numpy(store.tiles[:16])
    normalised = normalizer(tiles.permute(0, 3, 1, 2)).permute(0, 2, 3, 1).contiguous()
    with torch.inference_mode():
        direct = enc(normalised).numpy().astype(np.float16)
    assert np.array_equal(emb.features[:16], direct)
    assert not np.array_equal(emb.features[:16], enc(tiles).numpy().astype(np.float16))
    # embedding again without normalisation would replace them: refused, kept, until asked
    capsys.readouterr()
    assert main(["embed", str(root), *common]) == 1
    out = capsys.readouterr().out
    assert "EmbeddingsWouldBeReplacedError" in out and "without stain normalisation" in out
    assert read_embeddings(store, enc.encoder_id).attrs["stain"]["method"] == "reinhard"
    assert main(["embed", str(root), *common, "--no-resume"]) == 0
    assert "0 already complete" in capsys.readouterr().out
    assert "stain" not in read_embeddings(store, enc.encoder_id).attrs
