"""Start-up cost of the CLI: `wsi-ssl info SLIDE` and `wsi-ssl --help`, end to end.

Each case runs as a fresh interpreter (as a user's shell would) several times; the table gives
the fastest and median wall time, the modules loaded, the total import time ``-X importtime``
reports (sum of self times, µs, of one run) and which heavy libraries were loaded. The baseline
is a bare ``python -c pass`` and ``python -c "import numpy, PIL.Image, openslide"`` (the floor
of any command that opens a slide), measured side by side.

    python benchmarks/startup.py [--slide PATH] [--repeat N] [--label before|after]

Results are merged into ``benchmarks/results/startup.json`` under ``--label``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HEAVY = ("tiffslide", "zarr", "dask", "distributed", "torch", "faiss", "fsspec", "scipy")
RESULTS = Path(__file__).parent / "results" / "startup.json"
DEFAULT_SLIDE = (
    Path(__file__).resolve().parents[2] / "shared/fixtures/slides/CMU-1-Small-Region.svs"
)

_PROBE = """
import sys
{body}
heavy = {heavy!r}
print("MODULES", len(sys.modules), ",".join(h for h in heavy if h in sys.modules), file=sys.stderr)
"""


def _cases(slide: Path) -> dict[str, str]:
    run_cli = "from wsi_ssl.cli.main import main; main({argv!r})"
    return {
        "python -c pass": "pass",
        "import numpy, PIL.Image, openslide": "import numpy, PIL.Image, openslide",
        "wsi-ssl info SLIDE": run_cli.format(argv=["info", str(slide)]),
        "wsi-ssl --help": "import contextlib\nwith contextlib.suppress(SystemExit):\n    "
        + run_cli.format(argv=["--help"]),
    }


def _run(code: str, importtime: bool = False) -> tuple[float, str]:
    cmd = [sys.executable, *(["-X", "importtime"] if importtime else []), "-c", code]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return time.perf_counter() - start, done.stderr


def _measure(body: str, repeat: int) -> dict[str, object]:
    code = _PROBE.format(body=body, heavy=HEAVY)
    times = [_run(code)[0] for _ in range(repeat)]
    _, err = _run(code, importtime=True)
    self_us = sum(
        int(line.split("|")[0].split(":")[1])
        for line in err.splitlines()
        if line.startswith("import time:") and line.split("|")[0].split(":")[1].strip().isdigit()
    )
    probe = next(line for line in err.splitlines() if line.startswith("MODULES"))
    _, count, *heavy = probe.split(" ")
    return {
        "min_s": round(min(times), 3),
        "median_s": round(statistics.median(times), 3),
        "modules": int(count),
        "import_s": round(self_us / 1e6, 3),
        "heavy_loaded": [h for h in (heavy[0].split(",") if heavy and heavy[0] else [])],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slide", type=Path, default=DEFAULT_SLIDE)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--label", default="after")
    args = parser.parse_args()
    rows = {name: _measure(body, args.repeat) for name, body in _cases(args.slide).items()}
    print(f"{args.label}: {args.repeat} runs each")
    print(f"{'case':38} {'min s':>7} {'median s':>9} {'modules':>8} {'import s':>9}  heavy loaded")
    for name, r in rows.items():
        heavy = ",".join(r["heavy_loaded"]) or "-"  # type: ignore[arg-type]
        print(
            f"{name:38} {r['min_s']:7.3f} {r['median_s']:9.3f} {r['modules']:8d} "
            f"{r['import_s']:9.3f}  {heavy}"
        )
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results[args.label] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "python": sys.version.split()[0],
        "repeat": args.repeat,
        "cases": rows,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
