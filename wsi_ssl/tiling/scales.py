"""Where each scale of a tiling job goes: ``root`` itself for one scale, ``<root>/mpp-<mpp>``
(an archive of its own) for each of several."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from wsi_ssl.config import TilingConfig
from wsi_ssl.errors import ConfigError
from wsi_ssl.storage.archive import is_archive_root, multi_scale_roots

__all__ = ["scale_root", "scale_roots"]


def scale_root(root: str | Path, mpp: float) -> Path:
    """The archive root of one scale of a multi-scale job: ``<root>/mpp-<mpp>`` (``mpp-0.5``,
    ``mpp-1``), a complete archive of its own (catalog, ``slides/<slide_id>.zarr``, locks)."""
    return Path(root) / f"mpp-{mpp:g}"


def scale_roots(
    root: str | Path, config: TilingConfig, mpps: Sequence[float] | None
) -> list[tuple[Path, TilingConfig]]:
    """Where each scale of a job goes, with its config: ``root`` itself for one scale
    (``mpps`` None or of one value), :func:`scale_root` of each for several.

    Raises:
        ConfigError: an mpp is not positive, or two name the same scale; one scale into the
            output of a multi-scale tiling (it holds ``mpp-*`` archives, is none itself) or
            into one of its ``mpp-*`` archives at another scale; several scales into an
            archive of one.
    """
    root = Path(root)
    if not mpps or len(mpps) == 1:
        if per_scale := multi_scale_roots(root):  # a multi-scale tiling's output
            raise ConfigError(
                f"{root}: holds the per-scale archives of a multi-scale tiling "
                f"({', '.join(p.name for p in per_scale)}); give all scales (mpps) or tile "
                "into one of those folders",
                parameters=("mpps", "mpp"),
            )
        mpp = float(mpps[0]) if mpps else config.mpp
        if root in multi_scale_roots(root.parent) and root != scale_root(root.parent, mpp):
            raise ConfigError(
                f"{root}: the {root.name} archive of a multi-scale tiling; tile it at its "
                f"own scale ({root.name.removeprefix('mpp-')} µm/px), not {mpp:g}, or give "
                f"{root.parent} all scales",
                parameters=("mpps", "mpp"),
            )
        return [(root, replace(config, mpp=mpp))]
    if is_archive_root(root):
        raise ConfigError(
            f"{root}: an archive of one scale; several scales ({', '.join(f'{m:g}' for m in mpps)}"
            ") go into a folder of their own, one mpp-* archive each",
            parameters=("mpps", "mpp"),
        )
    scales = [(scale_root(root, m), replace(config, mpp=float(m))) for m in mpps]
    if len({path for path, _ in scales}) < len(scales):
        raise ConfigError(
            f"mpps {list(mpps)} name one scale twice; give each scale once",
            parameters=("mpps", "mpp"),
        )
    return scales
