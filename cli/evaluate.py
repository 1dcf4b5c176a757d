"""``wsi-ssl evaluate``: encoders x tasks, one comparison table."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from wsi_ssl.cli.arg_types import whole_number


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="compare encoders on labelled tasks (probes, slide MIL, retrieval)",
        description="Score every --encoder on every task with the same items, folds, seeds and "
        "bootstrap resamples: k-NN and linear probes on labelled patches (balanced accuracy, "
        "macro-F1), cross-validated ABMIL on slide labels (AUC), and retrieval (mMV@k, "
        "precision@k). Prints one table, writes OUT/evaluation.json and OUT/evaluation.png, "
        "and says which encoder ranks first on each task and whether the lead exceeds the "
        "intervals. Archive embeddings are computed by the embed job and kept in the stores. "
        "Each step is said on stderr as it starts or ends, with progress bars while embedding.",
    )
    p.add_argument(
        "--encoder",
        action="append",
        required=True,
        metavar="SPEC",
        help="NAME[,weights=FILE|random][,seed=N][,label=TEXT][,resize=bilinear]: a registered name, "
        "timm/<arch>, torchvision/<arch> or a pretrain run/checkpoint (repeat to compare)",
    )
    p.add_argument(
        "--patches",
        action="append",
        type=Path,
        default=[],
        metavar="FOLDER|CSV",
        help="labelled images: one sub-folder per class, or a CSV with path,label (any size: "
        "padded white to a square and resized to each encoder's input, whatever its resize)",
    )
    p.add_argument("--root", type=Path, help="archive root (slide, retrieval and tile tasks)")
    p.add_argument(
        "--tile-labels",
        action="append",
        default=[],
        metavar="NAME",
        help="per-tile labels stored as labels/NAME in the slide stores under --root (folds "
        "and intervals keep each slide's tiles together)",
    )
    p.add_argument(
        "--region-labels",
        action="append",
        type=Path,
        default=[],
        metavar="CSV",
        help="labelled boxes slide,x,y,w,h,label (the web page's ROOT/labels/regions.csv): "
        "tiles under --root whose centre is in a box take its label",
    )
    p.add_argument(
        "--slide-labels",
        action="append",
        type=Path,
        default=[],
        metavar="CSV",
        help="slide labels (slide,label[,patient][,fold]) for cross-validated ABMIL",
    )
    p.add_argument(
        "--retrieval-labels",
        action="append",
        type=Path,
        default=[],
        metavar="CSV",
        help="slide labels (slide,label[,patient]) for retrieval (mMV@k, precision@k): "
        "leave one slide out, or with a patient column every slide of the query's patient",
    )
    _add_settings(p)
    p.set_defaults(func=run)


def _add_settings(p: argparse.ArgumentParser) -> None:
    """The evaluation's settings (``EvaluationConfig``) and where it writes."""
    p.add_argument(
        "--out", type=Path, default=Path("evaluation"), help="output folder (default evaluation/)"
    )
    p.add_argument("--folds", type=whole_number(2), default=5, help="CV folds (default 5)")
    p.add_argument("--seed", type=int, default=0, help="folds, probes, MIL and resamples")
    p.add_argument(
        "--bootstrap",
        type=whole_number(0),
        default=1000,
        help="resamples (default 1000); a task gets intervals when every class is in at least "
        "3 slides (patients when the labels name them, images for --patches)",
    )
    p.add_argument("--knn-k", type=whole_number(1), default=20, help="k-NN neighbours (default 20)")
    p.add_argument("--no-linear", action="store_true", help="skip the linear probe")
    p.add_argument(
        "--mil-epochs", type=whole_number(1), default=30, help="ABMIL epochs per fold (default 30)"
    )
    p.add_argument(
        "--mmv-k", type=whole_number(1), default=5, help="slides voting in mMV@k (default 5)"
    )
    p.add_argument(
        "--precision-k", type=whole_number(1), default=10, help="tiles of precision@k (default 10)"
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    p.add_argument("--batch-size", type=whole_number(1), default=64, help="images per batch")
    p.add_argument("--workers", type=whole_number(0), default=0, help="embed loader workers")
    p.add_argument(
        "--no-mpp-check",
        dest="check_mpp",
        action="store_false",
        help="embed slides tiled at another µm/px than an encoder was trained at",
    )
    p.add_argument(
        "--quiet",
        action="store_true",
        help="no progress bars (the lines saying each step still go to stderr)",
    )


def run(args: argparse.Namespace) -> int:
    from wsi_ssl.errors import ConfigError
    from wsi_ssl.evaluation import (
        EvaluationConfig,
        PatchTask,
        RegionLabelTask,
        RetrievalTask,
        SlideTask,
        TileLabelTask,
        evaluate_encoders,
    )
    from wsi_ssl.evaluation.tasks import Task

    archive_tasks = (
        args.tile_labels or args.region_labels or args.slide_labels or args.retrieval_labels
    )
    if archive_tasks and args.root is None:
        raise ConfigError(
            "--tile-labels, --region-labels, --slide-labels and --retrieval-labels need --root"
        )
    tasks: list[Task] = [
        *(PatchTask(p) for p in args.patches),
        *(TileLabelTask(args.root, name) for name in args.tile_labels),
        *(RegionLabelTask(args.root, p) for p in args.region_labels),
        *(SlideTask(args.root, p) for p in args.slide_labels),
        *(RetrievalTask(args.root, p) for p in args.retrieval_labels),
    ]
    if not tasks:
        raise ConfigError(
            "no task: give --patches, or --root with --tile-labels, --region-labels, "
            "--slide-labels or --retrieval-labels"
        )
    config = EvaluationConfig(
        folds=args.folds,
        seed=args.seed,
        n_bootstrap=args.bootstrap,
        knn_k=args.knn_k,
        linear=not args.no_linear,
        mil_epochs=args.mil_epochs,
        mmv_k=args.mmv_k,
        precision_k=args.precision_k,
        device=args.device,
        batch_size=args.batch_size,
        workers=args.workers,
        check_mpp=args.check_mpp,
    )
    report = evaluate_encoders(
        args.encoder, tasks, args.out, config, log=_say, progress=not args.quiet
    )
    print("\n".join(report.lines()))
    return 0


def _say(line: str) -> None:
    """A step of the evaluation, on stderr at once (stdout keeps the report alone)."""
    print(line, file=sys.stderr, flush=True)
