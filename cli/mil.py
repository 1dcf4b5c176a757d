"""``wsi-ssl mil train`` and ``wsi-ssl mil predict``: slide-level MIL on tile embeddings."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from wsi_ssl.cli.arg_types import add_encoder_id, whole_number
from wsi_ssl.cli.report import print_report
from wsi_ssl.cli.toml_config import read_toml_config
from wsi_ssl.mil.config import BALANCE_MODES, BUILTIN_MODELS, MONITORS, MILConfig

# flag -> MILConfig field, for the flags that map one to one
_CONFIG_FLAGS = (
    "model",
    "folds",
    "epochs",
    "patience",
    "min_epochs",
    "monitor",
    "lr",
    "weight_decay",
    "balance",
    "max_tiles",
    "skip_flagged_tiles",
    "val_fraction",
    "hidden_dim",
    "attention_dim",
    "dropout",
    "n_heads",
    "n_layers",
    "k",
    "seed",
    "device",
    "workers",
    "threads",
    "cache_mb",
)

# the flags each built-in model leaves unused (a note names those given)
_UNUSED_FLAGS = {
    "abmil": ("n_heads", "n_layers", "k"),
    "meanpool": ("attention_dim", "n_heads", "n_layers", "k"),
    "transmil": ("attention_dim", "k"),
    "retrieval": (  # no training: a vote of the nearest slides
        *("epochs", "patience", "min_epochs", "monitor", "lr", "weight_decay", "balance"),
        *("max_tiles", "val_fraction", "workers", "hidden_dim", "attention_dim", "dropout"),
        *("n_heads", "n_layers"),
    ),
}


def register(sub: argparse._SubParsersAction) -> None:
    """Declare the command's arguments.

    Size: one argparse declaration per flag and nothing else; splitting it would scatter them.
    """
    p = sub.add_parser(
        "mil",
        help="slide-level MIL: cross-validated training and prediction with attention heatmaps",
        description="Attention MIL (ABMIL, TransMIL-style), mean pooling and a retrieval baseline "
        "on the tile embeddings of an archive.",
    )
    actions = p.add_subparsers(dest="mil_command", required=True, metavar="ACTION")

    t = actions.add_parser(
        "train",
        help="cross-validate a MIL model on labelled slides and save the run",
        description="k-fold cross-validation split by patient (when given) and stratified by "
        "label; writes RUN/metrics.json, RUN/roc.png, per-fold checkpoints and out-of-fold "
        "predictions.",
    )
    t.add_argument("root", type=Path, metavar="ROOT", help="archive root with embeddings")
    t.add_argument(
        "--labels",
        type=Path,
        required=True,
        metavar="CSV",
        help="CSV with columns slide,label[,patient][,fold]; slide = slide id, file name or stem",
    )
    add_encoder_id(t, "the embeddings to train on")
    t.add_argument("--out", type=Path, required=True, metavar="RUN", help="run directory to write")
    t.add_argument("--config", type=Path, help="TOML file of MILConfig values (flags win)")
    t.add_argument(
        "--model", help=f"{', '.join(BUILTIN_MODELS)} or a registered model (default abmil)"
    )
    t.add_argument("--folds", type=int, help="cross-validation folds (default 5)")
    t.add_argument("--epochs", type=int, help="most epochs per fold (default 50)")
    t.add_argument("--patience", type=int, help="early-stopping patience in epochs (default 10)")
    t.add_argument("--min-epochs", type=int, help="epochs before early stopping (default 5)")
    t.add_argument("--monitor", choices=MONITORS, help="validation metric (default auc)")
    t.add_argument("--lr", type=float, help="AdamW learning rate (default 2e-4)")
    t.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 1e-5)")
    t.add_argument("--balance", choices=BALANCE_MODES, help="class imbalance (default weights)")
    t.add_argument(
        "--max-tiles",
        type=whole_number(0),
        help="subsample larger bags when training (default 8192; 0: off)",
    )
    t.add_argument(
        "--skip-flagged-tiles",
        action="store_true",
        default=None,
        help="leave tiles flagged by the stores' QC (blur, pen, dark) out of every bag",
    )
    t.add_argument(
        "--val-fraction",
        type=float,
        help="training patients held out for early stopping (default 0.2; 0: off)",
    )
    t.add_argument("--hidden-dim", type=int, help="tile projection width (default 256)")
    t.add_argument("--attention-dim", type=int, help="ABMIL attention width (default 128)")
    t.add_argument("--dropout", type=float, help="dropout (default 0.25)")
    t.add_argument("--n-heads", type=int, help="TransMIL heads (default 8)")
    t.add_argument("--n-layers", type=int, help="TransMIL layers (default 2)")
    t.add_argument(
        "--k",
        type=int,
        help="retrieval: neighbours that vote, fewer than a fold's training slides (default 5)",
    )
    t.add_argument("--seed", type=int, help="seed of splits, init and sampling (default 0)")
    t.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    t.add_argument("--workers", type=int, help="bag-reading worker processes (default 0)")
    t.add_argument("--threads", type=whole_number(1), help="torch CPU threads (default: torch's)")
    t.add_argument(
        "--cache-mb", type=whole_number(0), help="MiB of bags kept in memory (default 2048)"
    )
    t.add_argument(
        "--skip-missing",
        action="store_true",
        help="leave out (and report) labelled slides without store, tiles or embeddings that "
        "decode (each bag is read once up front)",
    )
    t.add_argument("--overwrite", action="store_true", help="replace an existing run at --out")
    t.add_argument(
        "--json", action="store_true", help="print metrics.json on stdout (notes on stderr)"
    )
    t.add_argument("--verbose", action="store_true", help="print one line per epoch")
    t.set_defaults(
        func=run_train,
        after_interrupt="no run was written; the same command trains it again from the start",
    )

    q = actions.add_parser(
        "predict",
        help="predict slides with a trained run; write probabilities, heatmaps, galleries, GeoJSON",
    )
    q.add_argument("run", type=Path, metavar="RUN", help="a `wsi-ssl mil train` run directory")
    q.add_argument("root", type=Path, metavar="ROOT", help="archive root with embeddings")
    q.add_argument(
        "--slides", nargs="+", metavar="SLIDE", help="only these (slide id, file name or stem)"
    )
    q.add_argument("--out", type=Path, help="output folder (default RUN/predictions)")
    q.add_argument(
        "--top-k", type=whole_number(1), default=16, help="tiles in each gallery (default 16)"
    )
    q.add_argument(
        "--no-explain", action="store_true", help="only the CSV: no heatmaps, galleries, GeoJSON"
    )
    q.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    q.add_argument("--quiet", action="store_true", help="no progress bar")
    q.set_defaults(func=run_predict)


def mil_config(args: argparse.Namespace) -> MILConfig:
    """TOML values overlaid with the flags that were given."""
    values = read_toml_config(args.config, MILConfig)
    values.update({n: getattr(args, n) for n in _CONFIG_FLAGS if getattr(args, n) is not None})
    if values.get("max_tiles") == 0:
        values["max_tiles"] = None
    return MILConfig(**values)


def unused_flags_note(args: argparse.Namespace, model: str) -> str | None:
    """A note naming the flags given on the command line that ``model`` does not use."""
    given = [n for n in _UNUSED_FLAGS.get(model, ()) if getattr(args, n) is not None]
    if not given:
        return None
    flags = ", ".join("--" + n.replace("_", "-") for n in given)
    return f"note: --model {model} does not use {flags}; ignored"


def run_train(args: argparse.Namespace) -> int:
    from wsi_ssl.mil.training import train

    config = mil_config(args)
    note = unused_flags_note(args, config.model)
    if note:
        print(note, file=sys.stderr)
    result = train(
        args.root,
        args.labels,
        args.encoder,
        args.out,
        config,
        skip_missing=args.skip_missing,
        overwrite=args.overwrite,
        progress=args.verbose,
        log=(lambda line: print(line, file=sys.stderr)) if args.verbose else None,
    )
    if args.json:
        print(result.metrics_path.read_text())
        # what the report says besides the metrics: slides left out, the folds' notes
        for note in [*result.report.lines()[1:], *result.notes]:
            print(f"note: {note}", file=sys.stderr)
    else:
        print("\n".join(result.lines()))
    return 0


def run_predict(args: argparse.Namespace) -> int:
    from wsi_ssl.mil.prediction import predict

    result = predict(
        args.run,
        args.root,
        args.out,
        args.slides,
        top_k=args.top_k,
        explain=not args.no_explain,
        progress=not (args.quiet or args.json),
    )
    return print_report(result, args)
