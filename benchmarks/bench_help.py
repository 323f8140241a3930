"""How long the command line takes to answer: ``degla-fast --help``, ``train --help`` and
``train --help-config``, each in a fresh process (what a user waits for), beside a bare
interpreter start and ``import torch`` (what the help no longer imports; it took 6-8 s before).

Each case runs ``--iters`` times in turn with the others (so a change of machine load hits all
alike); rows give wall-clock percentiles, the cores this process may use and the 1-minute load
average at the start and the end, since on a shared machine the load is most of the answer.

    python benchmarks/bench_help.py [--quick] [--iters N]

``tests/test_cli_help.py`` checks what this times without timing it: no help imports torch.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from common import percentiles, report_run

REPO = Path(__file__).resolve().parents[1]
CASES = (
    ("python (bare start)", ["-c", "pass"]),
    ("python -c 'import torch'", ["-c", "import torch"]),
    ("degla-fast --help", ["-m", "degla_fast", "--help"]),
    ("degla-fast train --help", ["-m", "degla_fast", "train", "--help"]),
    ("degla-fast train --help-config", ["-m", "degla_fast", "train", "--help-config"]),
)


def _once(args: list[str]) -> float:
    """Milliseconds of one run of ``python ARGS`` to its exit (output discarded)."""
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return (time.perf_counter() - start) * 1e3


def run(quick: bool, iters: int | None = None) -> list[dict]:
    iters = iters or (1 if quick else 10)
    load_before = os.getloadavg()[0]
    for _, args in CASES if not quick else ():  # one warm-up each: the first start reads every file from disk
        _once(args)
    samples: dict[str, list[float]] = {name: [] for name, _ in CASES}
    for _ in range(iters):
        for name, args in CASES:
            samples[name].append(_once(args))
    load_after = os.getloadavg()[0]
    cores = len(os.sched_getaffinity(0))
    return [{"name": name, "impl": "fresh process", "iters": iters, "cores": cores,
             "load_1min": f"{load_before:.1f}-{load_after:.1f}", **percentiles(samples[name])}
            for name, _ in CASES]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 run per case, no warm-up (proves the benchmark runs)")
    parser.add_argument("--iters", type=int, default=None, help="runs per case (default 10; 1 with --quick)")
    args = parser.parse_args(argv)
    rows = run(args.quick, args.iters)
    report_run("bench_help", rows, ["name", "p20_ms", "p50_ms", "p80_ms", "iters", "cores", "load_1min"],
               quick=args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
