"""``wsi-ssl embed`` and ``wsi-ssl export``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from wsi_ssl.cli.arg_types import add_encoder_id, seconds
from wsi_ssl.cli.hints import RESUME_ADVICE
from wsi_ssl.cli.report import print_report
from wsi_ssl.embedding.config import DECODE_MODES, EmbedConfig
from wsi_ssl.errors import ConfigError
from wsi_ssl.stain_settings import METHODS as STAIN_METHODS

if TYPE_CHECKING:
    from wsi_ssl.encoders import Encoder

# The library's choices, spelled here so that building the parser imports no zarr (0.9 s):
# storage.embeddings.EMBEDDING_DTYPES, embedding.mil_files.EXPORT_FORMATS and NAME_BY;
# tests/test_startup.py checks that they agree.
EMBEDDING_DTYPES = ("float16", "float32")
EXPORT_FORMATS = ("clam-h5", "pt")
NAME_BY = ("stem", "slide_id")


def register(sub: argparse._SubParsersAction) -> None:
    """Declare the command's arguments.

    Size: one argparse declaration per flag and nothing else; splitting it would scatter them.
    """
    p = sub.add_parser(
        "embed",
        help="embed the tiles of every complete slide store under ROOT with an encoder",
        description="Writes <slide>.zarr/embeddings/<encoder_id>; slides already embedded with "
        "the same encoder (complete, every chunk readable) are skipped, anything else redone. "
        "A slide another job is writing is reported busy (exit 1) unless --wait; a damaged "
        "store is reported and skipped (exit 1), the others are done.",
    )
    p.add_argument("root", type=Path, metavar="ROOT", help="archive root (wsi-ssl tile --out)")
    p.add_argument(
        "--encoder",
        required=True,
        metavar="NAME_OR_CHECKPOINT",
        help="registered encoder name, timm/<arch>, torchvision/<arch>, or a wsi-ssl pretrain "
        "run/checkpoint path",
    )
    p.add_argument(
        "--weights", help="local weights file for a named encoder ('random': seeded init)"
    )
    p.add_argument(
        "--seed", type=int, help="init seed of random-init encoders (default 0; refused otherwise)"
    )
    p.add_argument(
        "--slides",
        nargs="+",
        metavar="SLIDE",
        help="only these slides: ids, file names or stems (or a unique id prefix)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        help="tiles per forward pass (default: 256 on the CPU; on CUDA the largest that fits "
        "the free device memory, measured by a probe)",
    )
    p.add_argument(
        "--device", help="auto (default), cpu, cuda or cuda:N (not with --devices, which names all)"
    )
    p.add_argument("--workers", type=int, help="tile-decoding worker processes (0: none)")
    p.add_argument("--dtype", choices=EMBEDDING_DTYPES, default="float16", help="stored dtype")
    p.add_argument(
        "--precision",
        choices=("fp32", "bf16", "fp16"),
        help="override the encoder's CUDA precision (changes the encoder_id)",
    )
    p.add_argument(
        "--resize",
        choices=("never", "bilinear"),
        help="override the encoder's resize policy (changes the encoder_id)",
    )
    p.add_argument("--no-resume", action="store_true", help="redo slides already embedded")
    p.add_argument(
        "--no-mpp-check",
        dest="check_mpp",
        action="store_false",
        help="embed slides tiled at another µm/px than the encoder was trained at",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the encoder (CUDA)")
    p.add_argument(
        "--stain-normalize",
        choices=(*STAIN_METHODS, "none"),
        metavar="METHOD",
        help="normalise tile stains before the encoder: macenko, reinhard or vahadane; none: "
        "off (default: as the encoder was pretrained, a wsi-ssl run that normalised its tiles)",
    )
    p.add_argument(
        "--stain-reference", metavar="IMAGE", help="reference image for --stain-normalize"
    )
    p.add_argument(
        "--decode",
        choices=DECODE_MODES,
        default="auto",
        help="where JPEG tiles are decoded: cpu (loader workers), device (the encoder's device, "
        "nvJPEG on CUDA; workers only read bytes), auto (default: device on CUDA, else cpu)",
    )
    p.add_argument(
        "--skip-flagged-tiles",
        action="store_true",
        help="neither read nor encode the tiles the store's QC flagged (their rows stay, "
        "marked not embedded, vectors embedded before cleared; search, export, MIL and "
        "evaluation leave them out)",
    )
    p.add_argument(
        "--devices",
        metavar="DEV,DEV,...",
        help="shard the slides across these devices, one process each (e.g. cuda:0,cuda:1)",
    )
    p.add_argument(
        "--wait",
        type=seconds,
        default=0.0,
        metavar="SECONDS",
        help="wait up to SECONDS for a slide another job is embedding with the same encoder (or "
        "tiling); default 0: report it as busy, go on with the others and exit 1",
    )
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_embed, after_interrupt=RESUME_ADVICE)

    p = sub.add_parser(
        "export",
        help="write embeddings as one file per slide for MIL code (CLAM/TRIDENT h5, torch .pt)",
    )
    p.add_argument("root", type=Path, metavar="ROOT")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--format", choices=EXPORT_FORMATS, default="clam-h5")
    add_encoder_id(p, "the embeddings to export")
    p.add_argument(
        "--slides",
        nargs="+",
        metavar="SLIDE",
        help="only these slides: ids, file names or stems (or a unique id prefix)",
    )
    p.add_argument(
        "--name-by",
        choices=NAME_BY,
        help="file names from the slide file stem or the slide id (default: as the export "
        "already in --out names them, else stem)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    p.set_defaults(func=run_export)


def _job_devices(args: argparse.Namespace) -> list[str]:
    """The devices the job would use (each checked), one per process with ``--devices``.

    Raises:
        ConfigError: ``--device`` beside ``--devices`` (it would be ignored).
    """
    from wsi_ssl.embedding.devices import parse_devices

    if args.devices and args.device is not None:
        raise ConfigError(
            f"--device {args.device} with --devices {args.devices}: --devices names every device "
            "the job uses (one process each); leave --device out"
        )
    return parse_devices(args.devices or args.device or "auto")


def _say_notes(args: argparse.Namespace, encoder: Encoder, devices: list[str]) -> None:
    """Print on stderr, before the work, what the job will do otherwise than asked: the
    encoder's reduced precision on CUDA devices beside fp32 on the CPU ones, CPU device
    processes sharing the usable CPUs. With --quiet too, as the report's notes are (it hides
    the progress bar)."""
    import torch

    from wsi_ssl.embedding.devices import cpu_share_note, usable_cpus
    from wsi_ssl.embedding.job import precision_note

    notes = [precision_note(encoder, devices)]
    if args.devices:
        notes.append(cpu_share_note(devices, usable_cpus(), torch.get_num_threads()))
    for note in notes:
        if note is not None:
            print(f"note: {note}", file=sys.stderr, flush=True)


def run_embed(args: argparse.Namespace) -> int:
    from wsi_ssl.embedding.job import embed
    from wsi_ssl.embedding.torchrun import embed_torchrun, torchrun_rank
    from wsi_ssl.encoders import create_encoder

    config = EmbedConfig(
        batch_size=args.batch_size,
        device=args.device or "auto",
        workers=args.workers,
        dtype=args.dtype,
        resume=not args.no_resume,
        wait=args.wait,
        check_mpp=args.check_mpp,
        compile=args.compile,
        stain_normalize=args.stain_normalize,
        stain_reference=args.stain_reference,
        decode=args.decode,
        skip_flagged_tiles=args.skip_flagged_tiles,
    )
    devices = _job_devices(args)
    if args.precision not in (None, "fp32") and all(d == "cpu" for d in devices):
        raise ConfigError(
            f"--precision {args.precision} is a CUDA setting: on the CPU the encoder runs in "
            "fp32, so its other encoder id would only duplicate the fp32 vectors; leave it out"
        )
    encoder = create_encoder(
        args.encoder,
        weights=args.weights,
        seed=0 if args.seed is None else args.seed,
        device="cpu",
        precision=args.precision,
        resize=args.resize,
    )
    if args.seed is not None and encoder.config.source != "random":
        raise ConfigError(
            f"--seed sets the weights of a random init, but {encoder.encoder_id}'s come from "
            f"{encoder.config.weights_path}; leave --seed out"
        )
    progress = not (args.quiet or args.json)
    rank = torchrun_rank()
    if rank is None or rank.rank == 0:  # under torchrun rank 0 speaks for all
        _say_notes(args, encoder, devices)
    if rank is not None:
        summary = embed_torchrun(
            args.root, encoder, rank, config, slides=args.slides, progress=progress
        )
        if rank.rank != 0:  # rank 0 reports for all
            return summary.exit_code
    elif args.devices:
        from wsi_ssl.embedding.devices import embed_on_devices

        summary = embed_on_devices(
            args.root, encoder, args.devices, config, slides=args.slides, progress=progress
        )
    else:
        summary = embed(args.root, encoder, config, slides=args.slides, progress=progress)
    return print_report(summary, args)


def run_export(args: argparse.Namespace) -> int:
    from wsi_ssl.embedding.mil_files import export

    summary = export(
        args.root,
        args.out,
        format=args.format,
        encoder=args.encoder,
        slides=args.slides,
        name_by=args.name_by,
        progress=not (args.quiet or args.json),
    )
    return print_report(summary, args)
