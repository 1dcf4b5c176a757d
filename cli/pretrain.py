"""``wsi-ssl pretrain ROOT --out RUN_DIR``: self-supervised pretraining on tile stores
(``--method dino | dinov2 | mae``; ``--init NAME --weights FILE`` continues from an encoder).

Multi-GPU (or multi-process on CPUs): ``torchrun --nproc-per-node N -m wsi_ssl.cli.main
pretrain ...`` (or ``-m wsi_ssl.cli.pretrain``, which runs this command alone).
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from wsi_ssl.cli.report import reports_here
from wsi_ssl.cli.toml_config import read_toml_config
from wsi_ssl.errors import CheckpointError, ConfigError, WsiSslError
from wsi_ssl.ssl.backbones import backbone_names
from wsi_ssl.ssl.config import (
    AUGMENTS,
    DEVICES,
    METHODS,
    PRECISIONS,
    PRESETS,
    SAMPLINGS,
    STAIN_METHODS,
    PretrainConfig,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pretrain",
        help="train an encoder (DINO, DINOv2, MAE) on the tiles of archive roots",
        description="Self-supervised pretraining on Zarr tile stores (torchrun for multi-GPU). "
        "Settings come from --preset, then --config (TOML of PretrainConfig fields), then the "
        "flags.",
    )
    add_arguments(p)
    p.set_defaults(
        func=run,
        after_interrupt="re-run with --resume to go on from the last checkpoint (before the "
        "first, it starts again with the run's recorded settings)",
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("roots", nargs="+", metavar="ROOT", help="archive root(s) or slide stores")
    p.add_argument("--out", required=True, type=Path, metavar="RUN_DIR", help="run directory")
    p.add_argument("--preset", choices=sorted(PRESETS), help="starting point (default vit-s16)")
    p.add_argument("--config", type=Path, help="TOML file of PretrainConfig values")
    p.add_argument("--method", choices=METHODS, help="pretext recipe (default dino)")
    p.add_argument("--arch", choices=backbone_names(), help="backbone (default vit_small_patch16)")
    p.add_argument(
        "--init",
        metavar="ENCODER",
        help="continue from an encoder: a registry name (uni), timm/<arch> or a previous run",
    )
    p.add_argument(
        "--weights", dest="init_weights", type=str, metavar="FILE", help="weights file for --init"
    )
    p.add_argument("--layer-decay", type=float, help="layer-wise lr decay (default 1: off)")
    p.add_argument("--freeze-blocks", type=int, help="freeze the first N blocks (default 0)")
    p.add_argument("--warmup-epochs", type=float, help="linear learning-rate warm-up (default 10)")
    p.add_argument(
        "--teacher-warmup-epochs", type=float, help="heads only, teacher copies (default 0)"
    )
    length = p.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=float, help="passes over the tiles (default 100)")
    length.add_argument("--steps", type=int, help="optimiser steps (overrides epochs)")
    p.add_argument("--batch-size", type=int, help="tiles per step per process (default 64)")
    p.add_argument(
        "--lr",
        dest="base_lr",
        metavar="LR",
        type=float,
        help="base learning rate per 256 tiles (default 5e-4)",
    )
    p.add_argument("--device", choices=DEVICES, help="auto (default), cpu or cuda")
    p.add_argument("--precision", choices=PRECISIONS, help="auto: bf16 on a GPU, else fp32")
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile the backbones (default: on CUDA only)",
    )
    p.add_argument("--augment", choices=AUGMENTS, help="crops in loader workers or on the device")
    p.add_argument("--num-workers", type=int, help="DataLoader workers (default min(8, cores-1))")
    p.add_argument("--num-threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--global-crop-size", type=int, help="global crop side (default 224)")
    p.add_argument("--local-crop-size", type=int, help="local crop side (default 96)")
    p.add_argument("--n-local-crops", type=int, help="local crops per tile (default 6)")
    p.add_argument("--out-dim", type=int, help="DINO head prototypes (default 65536)")
    p.add_argument("--seed", type=int, help="run seed (default 0)")
    p.add_argument("--checkpoint-every", type=int, help="steps between checkpoints")
    p.add_argument("--log-every", type=int, help="steps between metrics rows")
    p.add_argument("--resume", action="store_true", help="continue the run in RUN_DIR")
    p.add_argument("--until-step", type=int, help="stop after this step (with a checkpoint)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the run summary as JSON")
    _add_tile_arguments(p.add_argument_group("tiles", "which tiles the run reads, and how"))


def _add_tile_arguments(g: argparse._ArgumentGroup) -> None:
    g.add_argument(
        "--mixed-scales",
        action="store_true",
        default=None,
        help="train on stores at several magnifications, balanced per scale",
    )
    g.add_argument("--min-tissue", type=float, help="skip tiles with less tissue (0-1)")
    g.add_argument("--min-tile-std", type=float, help="skip flat tiles (grey std, 0-255)")
    g.add_argument("--curation", type=str, metavar="FILE", help="train on a curated selection")
    g.add_argument(
        "--skip-flagged-tiles",
        action="store_true",
        default=None,
        help="leave out the tiles the store's QC flagged (blur, pen, little tissue, dark)",
    )
    g.add_argument(
        "--stain-normalize",
        choices=STAIN_METHODS,
        metavar="METHOD",
        help="normalise tile stains before augmentation: macenko, reinhard or vahadane",
    )
    g.add_argument(
        "--stain-reference", metavar="IMAGE", help="reference image for --stain-normalize"
    )
    g.add_argument("--sampling", choices=SAMPLINGS, help="uniform over tiles or balanced slides")
    g.add_argument("--tile-size", type=int, help="refuse stores with another tile size")
    g.add_argument("--mpp", type=float, help="refuse stores at another scale")
    g.add_argument(
        "--skip-incomplete", action="store_true", default=None, help="ignore incomplete stores"
    )


def pretrain_config(args: argparse.Namespace, base: PretrainConfig | None = None) -> PretrainConfig:
    """``base`` (or the preset) overlaid with the TOML file, then with the flags given."""
    names = {f.name for f in fields(PretrainConfig)}
    values: dict[str, Any] = {}
    if base is not None:
        values.update(base.to_dict())
    elif args.preset:
        values.update(PretrainConfig.preset(args.preset).to_dict())
    values.update(read_toml_config(args.config, PretrainConfig))
    for field, value in vars(args).items():
        if field in names and value is not None:
            values[field] = value
    if args.steps is not None:
        values["steps"] = args.steps
    elif args.epochs is not None:
        values["steps"] = None
    if args.quiet or args.json:
        values["progress"] = False
    return PretrainConfig.from_dict(values)


def run(args: argparse.Namespace) -> int:
    from wsi_ssl.ssl.checkpoint import latest_checkpoint
    from wsi_ssl.ssl.resume import resumed_config
    from wsi_ssl.ssl.train import pretrain

    if args.resume and not Path(args.out).exists():
        raise CheckpointError(
            f"{args.out}: no such run folder to resume; check the path, or drop --resume to "
            "start a new run there"
        )
    base = resumed_config(args.out, args.arch) if args.resume else None
    if base is not None and args.preset:
        if latest_checkpoint(Path(args.out)) is not None:
            raise ConfigError(
                "--preset applies to new runs; --resume takes the checkpoint's config"
            )
        base = None  # stopped before a checkpoint: the preset must give its recorded settings
    config = pretrain_config(args, base)
    asked = _asked_arch(args)  # before training: the --config file may change meanwhile

    def say_notes(settled: PretrainConfig, notes: list[str]) -> list[str]:
        """Print the notes known before training at its start (not hours later), to stderr
        under --json, in the command's flags; they are recorded so in summary.json."""
        worded = [_in_flags(args, note) for note in notes]  # a resumed run's: said once
        said = list(dict.fromkeys([*_arch_note(args, asked, base, settled), *worded]))
        if reports_here():
            for note in said:
                print(
                    f"note        {note}", file=sys.stderr if args.json else sys.stdout, flush=True
                )
        return said

    result = pretrain(
        args.roots,
        config,
        out=args.out,
        resume=args.resume,
        until_step=args.until_step,
        on_start=say_notes,
    )
    if result.digests.get("ranks") is not None and not reports_here():
        return 0
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    loss = "-" if result.final_loss is None else f"{result.final_loss:.4f}"
    speed = "-" if result.images_per_s is None else f"{result.images_per_s:.1f}"
    print(
        f"step {result.step}/{result.total_steps}  loss {loss}  {speed} tiles/s  "
        f"({result.world_size} process{'es' if result.world_size > 1 else ''})"
    )
    print(f"checkpoint  {result.checkpoint}")
    if result.finished:
        print(f"encoder     {result.encoder_path}")
    else:  # its encoder.pt is refused by embed until the run ends
        roots = " ".join(shlex.quote(str(root)) for root in args.roots)
        print(
            f"stopped     at step {result.step} of {result.total_steps}; resume it with "
            f"`wsi-ssl pretrain {roots} --out {shlex.quote(str(args.out))} --resume`, "
            "or name the checkpoint to use it as it is"
        )
    if Path(result.metrics_path).is_file():  # none before the first log_every boundary
        print(f"metrics     {result.metrics_path}")
    if result.loss_plot is not None:
        print(f"loss plot   {result.loss_plot}")
    return 0


_FIELDS = tuple(f.name for f in fields(PretrainConfig))


def _in_flags(args: argparse.Namespace, note: str) -> str:
    """A library note in the command's words: the settings it advises (``set
    global_crop_size=64``) as flags, and the flags of the settings it names otherwise."""
    named = [
        name
        for name in _FIELDS
        if re.search(rf"(?<![\w-]){name}(?![\w-])", note) and ("_" in name or f"{name}=" in note)
    ]
    return str(args.error_text(WsiSslError(note, parameters=named)))


def _asked_arch(args: argparse.Namespace) -> tuple[str, str] | None:
    """The arch the command asked for and where it asked: ``--arch``, else the ``--config``
    file, else the ``--preset`` (None: the default)."""
    if args.arch:
        return args.arch, f"--arch {args.arch}"
    arch = read_toml_config(args.config, PretrainConfig).get("arch")
    if arch is not None:
        return arch, f"arch {arch} of --config {args.config}"
    if args.preset:
        arch = PretrainConfig.preset(args.preset).arch
        return arch, f"arch {arch} of --preset {args.preset}"
    return None


def _arch_note(
    args: argparse.Namespace,
    asked: tuple[str, str] | None,
    base: PretrainConfig | None,
    trained: PretrainConfig,
) -> list[str]:
    """A note when a new run's init decided the architecture over the one the command asked
    for (the init's weights need its own; the choice was dropped without a word)."""
    if asked is None or base is not None or trained.init is None or trained.arch == asked[0]:
        return []
    init = f"--init {args.init}" if args.init else f"init {trained.init}"
    return [f"{asked[1]} not used: {init} continues its own {trained.arch}"]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m wsi_ssl.cli.pretrain ...``: this command alone (e.g. under torchrun), with
    the errors reported as ``wsi-ssl pretrain`` reports them."""
    from wsi_ssl.cli.main import main as cli_main

    return cli_main(["pretrain", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
