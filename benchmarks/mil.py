"""MIL training throughput: data loading vs model time, side by side, and end to end.

Builds (once, cached under benchmarks/data/mil/) an archive of ``--bags`` slide stores whose
bags are ``--tiles`` x ``--dim`` float16 embeddings written with Zarr (the layout
``wsi-ssl embed`` writes), then measures in one run on the same cores:

(a) data loading only: every bag read through the training dataset (``BagDataset``: Zarr
    read and decompression, the one-off provenance check, float16 -> float32), no cache;
(b) model only, per model: forward + backward + AdamW step on bags already in memory (the
    median step, so that other load on a shared machine counts less);
(c) end to end: one training epoch over all bags with the training loop itself
    (``wsi_ssl.mil.fitting.fit``), bags read from Zarr every step (no cache), in the main
    process (workers=0) and with one DataLoader worker reading ahead (workers=1).

If data + model per bag is close to the end-to-end time per bag, loading is not hidden; with
a worker reading ahead, end to end approaches max(data, model). On a shared machine wall-clock
figures swing with other load, so bags per CPU second (this process and its workers) are
reported too.

Usage: python benchmarks/mil.py [--bags 1000] [--tiles 2000] [--dim 384] [--device cpu]
       [--threads 1]
Prints a table and writes benchmarks/results/mil.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wsi_ssl.mil import MILConfig
from wsi_ssl.mil.data import BagDataset, BagRef
from wsi_ssl.mil.fitting import fit
from wsi_ssl.mil.models import create_model
from wsi_ssl.testing.bags import write_bag_store

HERE = Path(__file__).resolve().parent
ENCODER_ID = "bench-384-000000000000"


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (DataLoader workers)."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def build_archive(root: Path, n_bags: int, n_tiles: int, dim: int) -> Path:
    """``n_bags`` stores of (n_tiles, dim) float16 embeddings; reused when already there."""
    marker = root / "bench.json"
    spec = {"bags": n_bags, "tiles": n_tiles, "dim": dim, "encoder_id": ENCODER_ID}
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        return root
    if root.exists():
        shutil.rmtree(root)
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    for i in range(n_bags):
        features = rng.standard_normal((n_tiles, dim), dtype=np.float32).astype(np.float16)
        write_bag_store(root, f"{i:016x}", features, encoder_id=ENCODER_ID)
        if i % 100 == 99:
            print(f"  wrote {i + 1}/{n_bags} bags ({time.perf_counter() - started:.0f}s)")
    marker.write_text(json.dumps(spec))
    return root


def refs(root: Path, n: int) -> list[BagRef]:
    return [BagRef(f"{i:016x}", root / "slides" / f"{i:016x}.zarr", i % 2) for i in range(n)]


def measure_data(root: Path, n: int) -> dict[str, Any]:
    data = BagDataset(refs(root, n), ENCODER_ID)  # no cache: every bag read from Zarr
    wall, cpu = time.perf_counter(), cpu_seconds()
    nbytes = 0
    for i in range(n):
        x, _, _ = data[i]
        nbytes += x.numel() * 2  # as stored, float16
    wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    second = time.perf_counter()
    for i in range(min(n, 200)):  # a later epoch: the provenance check is not repeated
        data[i]
    later = (time.perf_counter() - second) / min(n, 200)
    return {
        "bags": n,
        "seconds": round(wall, 3),
        "ms_per_bag": round(1e3 * wall / n, 3),
        "ms_per_bag_later_epochs": round(1e3 * later, 3),
        "bags_per_s": round(n / wall, 2),
        "bags_per_cpu_s": round(n / cpu, 2) if cpu else None,
        "MB_per_s": round(nbytes / wall / 1e6, 1),
    }


def measure_model(
    name: str, config: MILConfig, bags: list[torch.Tensor], device: torch.device, steps: int
) -> dict[str, Any]:
    """Training steps cycling over in-memory bags; the median step resists load spikes."""
    torch.manual_seed(0)
    model = create_model(name, bags[0].shape[1], 2, config).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr)
    loss_fn = torch.nn.CrossEntropyLoss()
    model.train()

    def step(x: torch.Tensor, y: int) -> None:
        logits, _ = model(x.to(device))
        loss = loss_fn(logits[None], torch.tensor([y], device=device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step(bags[0], 0)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    times = []
    wall, cpu = time.perf_counter(), cpu_seconds()
    for i in range(steps):
        t = time.perf_counter()
        step(bags[i % len(bags)], i % 2)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    return {
        "steps": steps,
        "ms_per_bag": round(1e3 * float(np.median(times)), 3),
        "ms_per_bag_mean": round(1e3 * wall / steps, 3),
        "bags_per_s": round(1 / float(np.median(times)), 2),
        "bags_per_cpu_s": round(steps / cpu, 2) if cpu else None,
    }


def measure_epoch(
    name: str, config: MILConfig, root: Path, n: int, workers: int, device: torch.device
) -> dict[str, Any]:
    torch.manual_seed(0)
    cfg = MILConfig(**{**config.to_dict(), "model": name, "workers": workers, "epochs": 1})
    model = create_model(name, config_dim(root), 2, cfg).to(device)
    data = BagDataset(refs(root, n), ENCODER_ID, max_tiles=cfg.max_tiles)
    wall, cpu = time.perf_counter(), cpu_seconds()
    fit(model, data, None, cfg, device, np.random.default_rng(0), ["a", "b"], None, 0)
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    return {
        "bags": n,
        "workers": workers,
        "seconds": round(wall, 3),
        "ms_per_bag": round(1e3 * wall / n, 3),
        "bags_per_s": round(n / wall, 2),
        "bags_per_cpu_s": round(n / cpu, 2) if cpu else None,
    }


def config_dim(root: Path) -> int:
    return int(json.loads((root / "bench.json").read_text())["dim"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bags", type=int, default=1000)
    parser.add_argument("--tiles", type=int, default=2000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", default="abmil,meanpool,transmil")
    parser.add_argument(
        "--slow-bags",
        type=int,
        default=10,
        help="bags for models slower than 200 ms/bag in (b) (TransMIL on a CPU)",
    )
    parser.add_argument(
        "--threads", type=int, help="torch CPU threads (default: torch's; 1 on a busy machine)"
    )
    parser.add_argument("--data", type=Path, default=HERE / "data" / "mil")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "mil.json")
    args = parser.parse_args()

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = MILConfig(device=args.device, threads=args.threads)
    print(f"building {args.bags} bags of {args.tiles} x {args.dim} float16 under {args.data}")
    root = build_archive(args.data, args.bags, args.tiles, args.dim)
    size_mb = sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) / 1e6
    load_before = os.getloadavg()

    print("(a) data loading")
    data = measure_data(root, args.bags)
    sample = BagDataset(refs(root, min(50, args.bags)), ENCODER_ID)
    in_memory = [sample[i][0] for i in range(len(sample))]

    rows: list[dict[str, Any]] = []
    for name in args.models.split(","):
        print(f"(b) model only: {name}")
        model = measure_model(name, config, in_memory, device, 5)
        slow = model["ms_per_bag"] > 200
        if not slow:
            model = measure_model(name, config, in_memory, device, 200)
        n_epoch = min(args.bags, args.slow_bags) if slow else args.bags
        print(f"(c) end to end: {name}, {n_epoch} bags, workers 0 and 1")
        e0 = measure_epoch(name, config, root, n_epoch, 0, device)
        e1 = measure_epoch(name, config, root, n_epoch, 1, device)
        rows.append(
            {"model": name, "model_only": model, "epoch_workers0": e0, "epoch_workers1": e1}
        )
    load_after = os.getloadavg()

    header = (
        f"{'model':<9} {'data ms/bag':>11} {'model ms/bag':>12} {'sum':>7} "
        f"{'e2e w0 ms/bag':>13} {'e2e w0 bags/s':>13} {'e2e w1 bags/s':>13} {'bags/cpu-s w0':>13}"
    )
    print()
    print(
        f"{args.bags} bags x {args.tiles} tiles x {args.dim} (float16, {size_mb:.0f} MB on disk), "
        f"device {device}, torch threads {torch.get_num_threads()}, "
        f"load average {load_before[0]:.1f} -> {load_after[0]:.1f}"
    )
    print(
        f"(a) data loading alone: {data['ms_per_bag']:.2f} ms/bag first epoch "
        f"({data['bags_per_s']:.0f} bags/s, {data['MB_per_s']:.0f} MB/s), "
        f"{data['ms_per_bag_later_epochs']:.2f} ms/bag later epochs"
    )
    print(header)
    for r in rows:
        m, e0, e1 = r["model_only"], r["epoch_workers0"], r["epoch_workers1"]
        d = data["ms_per_bag"]
        print(
            f"{r['model']:<9} {d:>11.2f} {m['ms_per_bag']:>12.2f} {d + m['ms_per_bag']:>7.2f} "
            f"{e0['ms_per_bag']:>13.2f} {e0['bags_per_s']:>13.1f} {e1['bags_per_s']:>13.1f} "
            f"{e0['bags_per_cpu_s']:>13.1f}"
        )
    result = {
        "benchmark": "mil",
        "bags": args.bags,
        "tiles": args.tiles,
        "dim": args.dim,
        "dtype": "float16",
        "archive_MB": round(size_mb, 1),
        "device": str(device),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "load_average": [round(load_before[0], 2), round(load_after[0], 2)],
        "config": config.to_dict(),
        "data_loading": data,
        "models": rows,
        "notes": (
            "data = BagDataset reads from Zarr without cache; model = forward+backward+AdamW on "
            "in-memory bags; e2e = one epoch of the training loop reading every bag from Zarr "
            "(w0: main process; w1: one DataLoader worker reading ahead). Wall-clock on a shared "
            "machine; bags/cpu-s is load-independent."
        ),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
