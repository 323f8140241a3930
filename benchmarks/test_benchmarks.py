"""pytest-benchmark wrapper: one test per ``bench_*.py`` module of this folder, each calling its
``run(quick)`` once (its own cases are timed inside, with percentiles and peak memory) and
writing ``<module>[_quick].json`` for ``report.py``; the rows and environment also go into
pytest-benchmark's ``extra_info`` so ``--benchmark-json`` holds them."""
import importlib
from pathlib import Path

import pytest

from common import env_info, write_results

MODULES = sorted(p.stem for p in Path(__file__).resolve().parent.glob("bench_*.py"))


@pytest.mark.parametrize("module", MODULES)
def test_benchmark(module, benchmark, bench_quick, bench_out):
    mod = importlib.import_module(module)
    rows = benchmark.pedantic(mod.run, args=(bench_quick,), rounds=1, iterations=1)
    assert rows, f"{module}.run returned no rows"
    path = write_results(module + ("_quick" if bench_quick else ""), rows, bench_out)
    benchmark.extra_info.update(env=env_info(), rows=rows, json=str(path))
