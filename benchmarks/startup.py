"""Start-up cost of the CLI: `wsi-ssl info SLIDE` and `wsi-ssl --help`, end to end.

Two commits are measured side by side (``--base``, default the commit before the start-up
work, and ``--head``, default HEAD): each is exported with ``git archive`` into a temporary
folder laid out as installed (``storage/`` and ``cli/`` inside ``wsi_ssl/``) and run by a fresh
``python -S`` whose path is that folder, then site-packages (no .pth files, so both sides start
alike). Each case runs ``--repeat`` times; the table gives the fastest and median wall time,
the fastest CPU time (user + system: steadier than wall time on a loaded machine), the modules
loaded, the sum of ``-X importtime`` self times of one run, and the heavy libraries loaded.
The floor is ``import numpy, PIL.Image, openslide``, what any command that opens a slide needs.

    python benchmarks/startup.py [--slide PATH] [--repeat N] [--base REV] [--head REV]

Writes ``benchmarks/results/startup.json``.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
from pathlib import Path

HEAVY = ("tiffslide", "zarr", "dask", "distributed", "torch", "faiss", "fsspec", "scipy")
RESULTS = Path(__file__).parent / "results" / "startup.json"
DEFAULT_SLIDE = (
    Path(__file__).resolve().parents[2] / "shared/fixtures/slides/CMU-1-Small-Region.svs"
)

_PROBE = """
import sys
sys.path[:0] = [{tree!r}]
sys.path.append({purelib!r})
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


def _run(code: str, importtime: bool = False) -> tuple[float, float, str]:
    """(wall s, CPU s, stderr) of one fresh ``python -S`` running ``code``."""
    cmd = [sys.executable, "-S", *(["-X", "importtime"] if importtime else []), "-c", code]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return wall, cpu, done.stderr


def _measure(body: str, tree: Path, repeat: int) -> dict[str, object]:
    purelib = sysconfig.get_paths()["purelib"]
    code = _PROBE.format(body=body, heavy=HEAVY, tree=str(tree), purelib=purelib)
    runs = [_run(code) for _ in range(repeat)]
    _, _, err = _run(code, importtime=True)
    self_us = 0
    for line in err.splitlines():
        field = line.split("|")[0].split(":")[-1].strip()
        if line.startswith("import time:") and field.isdigit():
            self_us += int(field)
    probe = next(line for line in err.splitlines() if line.startswith("MODULES"))
    _, count, *heavy = probe.split(" ")
    return {
        "min_s": round(min(r[0] for r in runs), 3),
        "median_s": round(statistics.median(r[0] for r in runs), 3),
        "min_cpu_s": round(min(r[1] for r in runs), 3),
        "modules": int(count),
        "import_s": round(self_us / 1e6, 3),
        "heavy_loaded": heavy[0].split(",") if heavy and heavy[0] else [],
    }


def _export(rev: str, into: Path) -> Path:
    """``rev``'s package exported into ``into`` in its installed layout; returns the path root."""
    repo = Path(__file__).resolve().parents[1]
    into.mkdir(parents=True)
    archive = into / "src.tar"
    with archive.open("wb") as out:
        subprocess.run(
            ["git", "archive", rev, "wsi_ssl", "cli", "storage"], cwd=repo, stdout=out, check=True
        )
    with tarfile.open(archive) as tar:
        tar.extractall(into / "src", filter="data")
    package = into / "src" / "wsi_ssl"
    (into / "src" / "cli").rename(package / "cli")
    (into / "src" / "storage").rename(package / "storage")
    return into / "src"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slide", type=Path, default=DEFAULT_SLIDE)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--base", default="57b01c3", help="commit measured as the baseline")
    parser.add_argument("--head", default="HEAD", help="commit measured against it")
    args = parser.parse_args()
    results: dict[str, object] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "python": sys.version.split()[0],
        "repeat": args.repeat,
    }
    print(f"{args.repeat} runs each, interleaved per case; wall and CPU seconds")
    print(
        f"{'case':38} {'rev':8} {'min s':>6} {'median':>7} {'cpu s':>6} {'modules':>8} "
        f"{'import s':>9}  heavy loaded"
    )
    with tempfile.TemporaryDirectory() as tmp:
        trees = {rev: _export(rev, Path(tmp) / rev) for rev in (args.base, args.head)}
        for name, body in _cases(args.slide).items():
            row = {rev: _measure(body, tree, args.repeat) for rev, tree in trees.items()}
            results[name] = row
            for rev, r in row.items():
                heavy = ",".join(r["heavy_loaded"]) or "-"  # type: ignore[arg-type]
                print(
                    f"{name:38} {rev[:8]:8} {r['min_s']:6.3f} {r['median_s']:7.3f} "
                    f"{r['min_cpu_s']:6.3f} {r['modules']:8d} {r['import_s']:9.3f}  {heavy}"
                )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
