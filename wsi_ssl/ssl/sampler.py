"""The step-indexed batch sampler of a pretraining run.

:class:`StepBatchSampler` yields the batch of every optimiser step from a start step: the
order of epoch ``e`` is a function of ``(seed, e)`` only (:func:`epoch_order`), each rank of a
multi-process run takes its slice of the global batch, and every item carries its own
augmentation seed (:func:`mix_seed`). A run resumed at step ``s`` therefore sees exactly the
tiles, in the same order and with the same augmentations, as an uninterrupted run, whatever
the number of loader workers.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

from wsi_ssl.ssl.config import SAMPLINGS

__all__ = ["StepBatchSampler", "epoch_order", "mix_seed"]


def mix_seed(*values: int) -> int:
    """A well-spread 63-bit integer from a few integers (splitmix64 steps)."""
    x = 0x9E3779B97F4A7C15
    mask = (1 << 64) - 1
    for v in values:
        x = (x ^ (v & mask)) & mask
        x = (x + 0x9E3779B97F4A7C15) & mask
        z = x
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        x = z ^ (z >> 31)
    return x >> 1


def epoch_order(
    slide_sizes: Sequence[int],
    *,
    seed: int,
    epoch: int,
    sampling: str = "uniform",
    groups: Sequence[int] | None = None,
) -> torch.Tensor:
    """Dataset indices of one epoch (as many as there are tiles), a function of (seed, epoch).

    ``"uniform"``: a permutation of all tiles. ``"balanced"``: each draw picks a slide
    uniformly, then a tile of it uniformly (with replacement), so every slide contributes
    equally whatever its size. ``groups`` (a scale index per slide, several scales): each
    draw first picks a scale uniformly, then a slide (``"balanced"``) or a tile of that scale.
    """
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {', '.join(SAMPLINGS)}; got {sampling!r}")
    g = torch.Generator().manual_seed(mix_seed(seed, epoch, 0x5A3))
    sizes = torch.tensor(list(slide_sizes), dtype=torch.int64)
    n = int(sizes.sum())
    if groups is not None and len(set(groups)) > 1:
        return _scale_balanced(sizes, torch.tensor(list(groups)), sampling, g)
    if sampling == "uniform":
        return torch.randperm(n, generator=g)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)[:-1]])
    slide = torch.randint(len(sizes), (n,), generator=g)
    within = (torch.rand(n, generator=g, dtype=torch.float64) * sizes[slide]).long()
    return offsets[slide] + torch.minimum(within, sizes[slide] - 1)


def _scale_balanced(
    sizes: torch.Tensor, groups: torch.Tensor, sampling: str, g: torch.Generator
) -> torch.Tensor:
    """``sum(sizes)`` draws: a scale uniformly, then a slide of it (uniformly when balanced,
    else in proportion to its tiles), then a tile of the slide uniformly."""
    n = int(sizes.sum())
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)[:-1]])
    n_groups = int(groups.max()) + 1
    scale = torch.randint(n_groups, (n,), generator=g)
    weights = (
        torch.ones_like(sizes, dtype=torch.float64) if sampling == "balanced" else sizes.double()
    )
    slide = torch.empty(n, dtype=torch.int64)
    for k in range(n_groups):
        members = (groups == k).nonzero().flatten()
        picks = scale == k
        w = weights[members] * (sizes[members] > 0)
        slide[picks] = members[torch.multinomial(w, int(picks.sum()), True, generator=g)]
    within = (torch.rand(n, generator=g, dtype=torch.float64) * sizes[slide]).long()
    return offsets[slide] + torch.minimum(within, sizes[slide] - 1)


class StepBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches of ``(dataset index, augmentation seed)``, one per optimiser step.

    Args:
        slide_sizes: tiles per slide, in dataset order.
        batch_size: items per step for this process.
        steps_per_epoch: steps in one epoch (tiles // global batch).
        start_step: first step to yield (a resumed run starts where it stopped).
        total_steps: yield steps ``start_step .. total_steps - 1``.
        seed: run seed.
        sampling: ``"uniform"`` or ``"balanced"``.
        rank: this process's rank.
        world_size: number of processes; global batch = ``batch_size * world_size``.
        groups: scale index of every slide (several scales: drawn equally often).
    """

    def __init__(
        self,
        slide_sizes: Sequence[int],
        *,
        batch_size: int,
        steps_per_epoch: int,
        start_step: int,
        total_steps: int,
        seed: int,
        sampling: str = "uniform",
        rank: int = 0,
        world_size: int = 1,
        groups: Sequence[int] | None = None,
    ) -> None:
        if steps_per_epoch < 1:
            raise ValueError("steps_per_epoch must be >= 1")
        if steps_per_epoch * batch_size * world_size > sum(slide_sizes):
            raise ValueError("steps_per_epoch * global batch exceeds the number of tiles")
        self.slide_sizes = list(slide_sizes)
        self.batch_size = batch_size
        self.steps_per_epoch = steps_per_epoch
        self.start_step = start_step
        self.total_steps = total_steps
        self.seed = seed
        self.sampling = sampling
        self.rank = rank
        self.world_size = world_size
        self.groups = None if groups is None else list(groups)
        self._epoch: int | None = None
        self._order: torch.Tensor | None = None

    def __len__(self) -> int:
        return max(0, self.total_steps - self.start_step)

    def batch(self, step: int) -> list[tuple[int, int]]:
        """The items of ``step`` for this rank."""
        epoch, within = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._order = epoch_order(
                self.slide_sizes,
                seed=self.seed,
                epoch=epoch,
                sampling=self.sampling,
                groups=self.groups,
            )
            self._epoch = epoch
        assert self._order is not None
        start = (within * self.world_size + self.rank) * self.batch_size
        indices = self._order[start : start + self.batch_size].tolist()
        return [(int(i), mix_seed(self.seed, epoch, start + j)) for j, i in enumerate(indices)]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start_step, self.total_steps):
            yield self.batch(step)
