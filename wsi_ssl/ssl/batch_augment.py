"""The DINO multi-crop augmentation of :mod:`wsi_ssl.ssl.transforms`, batched on the device.

Per-tile PIL augmentation costs about 60 ms of CPU time per tile for 2 x 224 + 6 x 96 crops,
so a 16-core loader cannot feed a GPU that trains ViT-S/16 at thousands of tiles per second.
:class:`BatchDINOAugment` applies the same family of augmentations to a whole batch of uint8
tiles already on the training device, with a handful of batched kernels per crop group:

1. random resized crop (area ``scale``, aspect ratio in [3/4, 4/3]) fused with the flips and
   the 90-degree rotation into one affine ``grid_sample`` (bilinear) per group;
2. HED stain jitter (Tellez et al., 2018, https://arxiv.org/abs/1808.05896);
3. colour jitter: brightness, contrast, saturation, hue, in that fixed order (torchvision
   draws a random order per image), with the same clamping to [0, 1];
4. random grey, Gaussian blur (separable, per-image sigma), solarization of the second global
   crop (Caron et al., 2021, https://arxiv.org/abs/2104.14294), normalisation.

Probabilities and ranges come from the same :class:`~wsi_ssl.ssl.config.PretrainConfig`
fields as the per-tile transform. Randomness comes from a ``torch.Generator`` the caller
seeds (the training loop seeds it from the run seed, the step and the rank), so a run is
reproducible and resumes exactly.

Differences from the per-tile path: bilinear instead of bicubic resampling without
antialiasing (local crops are downscaled by at most ~1.7x at the default scales), and
the fixed colour-jitter order.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from wsi_ssl.ssl.config import PretrainConfig
from wsi_ssl.ssl.transforms import HED_FROM_RGB, RGB_FROM_HED

__all__ = ["BatchDINOAugment"]

_GREY = (0.299, 0.587, 0.114)


class BatchDINOAugment:
    """Multi-crop DINO views of a batch of tiles, computed where the tiles are.

    Args:
        config: crop sizes, scales and augmentation strengths.

    Calling it with ``tiles`` (uint8 ``(B, H, W, 3)`` or float ``(B, 3, H, W)`` in [0, 1])
    and a generator on the tiles' device returns ``2 + n_local_views`` float32 tensors (MAE: no local ones),
    ``(B, 3, G, G)`` twice then ``(B, 3, L, L)``, normalised with ``config.mean`` / ``std``.
    """

    def __init__(self, config: PretrainConfig) -> None:
        self.config = config

    def __call__(self, tiles: Tensor, generator: torch.Generator) -> list[Tensor]:
        c = self.config
        x = _as_float(tiles)
        b = x.shape[0]
        views: list[Tensor] = []
        groups = (
            (2, c.global_crop_size, c.global_crop_scale, (c.blur_probs[0], c.blur_probs[1])),
            (
                c.n_local_views,
                c.local_crop_size,
                c.local_crop_scale,
                (c.blur_probs[2],) * c.n_local_views,
            ),
        )
        for group, (n, size, scale, blur_probs) in enumerate(groups):
            if n == 0:
                continue
            src = x.repeat(n, 1, 1, 1)
            out = self._crop(src, size, scale, generator)
            out = self._hed(out, generator)
            out = self._color(out, generator)
            out = self._grey(out, generator)
            blur_p = torch.tensor(blur_probs, device=x.device).repeat_interleave(b)
            out = self._blur(out, blur_p, generator)
            if group == 0 and c.solarization_prob > 0:
                out = self._solarize(out, b, generator)
            out = self._normalize(out)
            views.extend(out.chunk(n))
        return views

    # -- geometry --------------------------------------------------------------------------
    def _crop(self, x: Tensor, size: int, scale: tuple[float, float], g: torch.Generator) -> Tensor:
        c = self.config
        n = x.shape[0]
        dev = x.device
        # torchvision's RandomResizedCrop: up to 10 draws of (area, aspect ratio) until the
        # crop fits in the tile, else the whole tile
        w = torch.ones(n, device=dev)  # fraction of the tile width
        h = torch.ones(n, device=dev)
        todo = torch.ones(n, dtype=torch.bool, device=dev)
        for _ in range(10):
            area = _uniform(n, scale[0], scale[1], g, dev)
            ratio = torch.exp(_uniform(n, math.log(3 / 4), math.log(4 / 3), g, dev))
            tw, th = torch.sqrt(area * ratio), torch.sqrt(area / ratio)
            fits = todo & (tw <= 1) & (th <= 1)
            w = torch.where(fits, tw, w)
            h = torch.where(fits, th, h)
            todo = todo & ~fits
        cx = (_uniform(n, 0, 1, g, dev) * (1 - w) + w / 2) * 2 - 1  # centre in [-1, 1]
        cy = (_uniform(n, 0, 1, g, dev) * (1 - h) + h / 2) * 2 - 1
        fx = torch.where(_bernoulli(n, c.hflip_prob, g, dev), -1.0, 1.0)
        fy = torch.where(_bernoulli(n, c.vflip_prob, g, dev), -1.0, 1.0)
        rot = _bernoulli(n, c.rot90_prob, g, dev)
        # output (u, v) -> flip -> rotate by 90 degrees -> scale to the crop -> shift.
        zero = torch.zeros_like(w)
        a11 = torch.where(rot, zero, fx)
        a12 = torch.where(rot, -fy, zero)
        a21 = torch.where(rot, fx, zero)
        a22 = torch.where(rot, zero, fy)
        theta = torch.stack(
            [
                torch.stack([w * a11, w * a12, cx], dim=1),
                torch.stack([h * a21, h * a22, cy], dim=1),
            ],
            dim=1,
        )
        grid = F.affine_grid(theta, [n, 3, size, size], align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    # -- colour ----------------------------------------------------------------------------
    def _hed(self, x: Tensor, g: torch.Generator) -> Tensor:
        c = self.config
        n = x.shape[0]
        if c.hed_sigma == 0 or c.hed_jitter_prob == 0:
            return x
        dev = x.device
        apply = _bernoulli(n, c.hed_jitter_prob, g, dev).view(n, 1, 1, 1)
        alpha = _uniform((n, 3), 1 - c.hed_sigma, 1 + c.hed_sigma, g, dev)
        beta = _uniform((n, 3), -c.hed_sigma, c.hed_sigma, g, dev)
        hed_from_rgb = torch.tensor(HED_FROM_RGB, dtype=x.dtype, device=dev)
        rgb_from_hed = torch.tensor(RGB_FROM_HED, dtype=x.dtype, device=dev)
        od = -torch.log(x.clamp(min=1e-6))  # optical density, as in transforms.hed_jitter
        hed = torch.einsum("nchw,cd->ndhw", od, hed_from_rgb)
        hed = hed * alpha.view(n, 3, 1, 1) + beta.view(n, 3, 1, 1)
        od = torch.einsum("ndhw,dc->nchw", hed, rgb_from_hed)
        return torch.where(apply, torch.exp(-od).clamp(0, 1), x)

    def _color(self, x: Tensor, g: torch.Generator) -> Tensor:
        c = self.config
        n = x.shape[0]
        dev = x.device
        apply = _bernoulli(n, c.color_jitter_prob, g, dev).view(n, 1, 1, 1)
        if c.color_jitter_prob == 0:
            return x
        out = x
        if c.brightness > 0:
            f = _uniform(n, 1 - c.brightness, 1 + c.brightness, g, dev).view(n, 1, 1, 1)
            out = (out * f).clamp(0, 1)
        if c.contrast > 0:
            f = _uniform(n, 1 - c.contrast, 1 + c.contrast, g, dev).view(n, 1, 1, 1)
            mean = _grey(out).mean(dim=(1, 2, 3), keepdim=True)
            out = ((out - mean) * f + mean).clamp(0, 1)
        if c.saturation > 0:
            f = _uniform(n, 1 - c.saturation, 1 + c.saturation, g, dev).view(n, 1, 1, 1)
            grey = _grey(out)
            out = ((out - grey) * f + grey).clamp(0, 1)
        if c.hue > 0:
            shift = _uniform(n, -c.hue, c.hue, g, dev).view(n, 1, 1)
            hsv = _rgb_to_hsv(out)
            hsv = torch.stack([(hsv[:, 0] + shift) % 1.0, hsv[:, 1], hsv[:, 2]], dim=1)
            out = _hsv_to_rgb(hsv)
        return torch.where(apply, out, x)

    def _grey(self, x: Tensor, g: torch.Generator) -> Tensor:
        p = self.config.grayscale_prob
        if p == 0:
            return x
        apply = _bernoulli(x.shape[0], p, g, x.device).view(-1, 1, 1, 1)
        return torch.where(apply, _grey(x).expand_as(x), x)

    def _blur(self, x: Tensor, prob: Tensor, g: torch.Generator) -> Tensor:
        n = x.shape[0]
        lo, hi = self.config.blur_sigma
        apply = torch.rand(n, generator=g, device=x.device) < prob
        sigma = _uniform(n, lo, hi, g, x.device)
        idx = apply.nonzero().flatten()
        if idx.numel() == 0:
            return x
        radius = max(1, math.ceil(3 * hi))
        offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
        kernel = torch.exp(-(offsets**2) / (2 * sigma[idx, None] ** 2))
        kernel = kernel / kernel.sum(dim=1, keepdim=True)  # (m, k)
        sel = x[idx]
        m, ch, hh, ww = sel.shape
        weight = kernel.repeat_interleave(ch, dim=0)  # (m * ch, k)
        flat = F.pad(sel.reshape(1, m * ch, hh, ww), (radius, radius, radius, radius), "reflect")
        flat = F.conv2d(flat, weight.view(m * ch, 1, 1, -1), groups=m * ch)
        flat = F.conv2d(flat, weight.view(m * ch, 1, -1, 1), groups=m * ch)
        out = x.clone()
        out[idx] = flat.view(m, ch, hh, ww)
        return out

    def _solarize(self, x: Tensor, b: int, g: torch.Generator) -> Tensor:
        """Solarize images of the second global crop (rows b..2b) with the configured prob."""
        n = x.shape[0]
        apply = _bernoulli(n, self.config.solarization_prob, g, x.device)
        apply[:b] = False
        apply = apply.view(n, 1, 1, 1)
        return torch.where(apply & (x >= 0.5), 1.0 - x, x)

    def _normalize(self, x: Tensor) -> Tensor:
        mean = torch.tensor(self.config.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.config.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std


def _as_float(tiles: Tensor) -> Tensor:
    if tiles.dtype == torch.uint8:
        if tiles.shape[-1] != 3:
            raise ValueError(f"uint8 tiles must be (B, H, W, 3); got {tuple(tiles.shape)}")
        return tiles.permute(0, 3, 1, 2).float().div_(255.0)
    if tiles.ndim != 4 or tiles.shape[1] != 3:
        raise ValueError(f"float tiles must be (B, 3, H, W); got {tuple(tiles.shape)}")
    return tiles.float()


def _uniform(
    shape: int | tuple[int, ...], lo: float, hi: float, g: torch.Generator, dev: torch.device
) -> Tensor:
    shape = (shape,) if isinstance(shape, int) else shape
    return torch.rand(shape, generator=g, device=dev) * (hi - lo) + lo


def _bernoulli(n: int, p: float, g: torch.Generator, dev: torch.device) -> Tensor:
    return torch.rand(n, generator=g, device=dev) < p


def _grey(x: Tensor) -> Tensor:
    r, gr, b = x.unbind(dim=1)
    return (_GREY[0] * r + _GREY[1] * gr + _GREY[2] * b).unsqueeze(1)


def _rgb_to_hsv(x: Tensor) -> Tensor:
    r, g, b = x.unbind(dim=1)
    maxc, _ = x.max(dim=1)
    minc, _ = x.min(dim=1)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    s = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), 0.0)
    rc = (maxc - r) / safe
    gc = (maxc - g) / safe
    bc = (maxc - b) / safe
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(delta > 0, (h / 6.0) % 1.0, torch.zeros_like(h))
    return torch.stack([h, s, maxc], dim=1)


def _hsv_to_rgb(x: Tensor) -> Tensor:
    h, s, v = x.unbind(dim=1)
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.to(torch.int64) % 6
    p = (v * (1 - s)).clamp(0, 1)
    q = (v * (1 - s * f)).clamp(0, 1)
    t = (v * (1 - s * (1 - f))).clamp(0, 1)
    choices = torch.stack(
        [
            torch.stack([v, t, p], 1),
            torch.stack([q, v, p], 1),
            torch.stack([p, v, t], 1),
            torch.stack([p, q, v], 1),
            torch.stack([t, p, v], 1),
            torch.stack([v, p, q], 1),
        ],
        dim=0,
    )  # (6, n, 3, h, w)
    index = i.unsqueeze(0).unsqueeze(2).expand(1, -1, 3, -1, -1)
    return choices.gather(0, index).squeeze(0)
