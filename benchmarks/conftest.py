"""pytest options of the benchmark suite: ``--bench-quick`` (small CPU sizes; the default where
no GPU is present) and ``--bench-out`` (folder of the per-benchmark JSON files)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--bench-quick", action="store_true", default=False,
                     help="small CPU sizes (always the case without a GPU)")
    parser.addoption("--bench-out", default=None, help="folder for the JSON results (default benchmarks/results)")


@pytest.fixture
def bench_quick(request) -> bool:
    return request.config.getoption("--bench-quick") or not torch.cuda.is_available()


@pytest.fixture
def bench_out(request):
    from common import RESULTS_DIR

    return request.config.getoption("--bench-out") or RESULTS_DIR
