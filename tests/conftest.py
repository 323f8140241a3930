"""Test-wide settings: offline hub, Triton through its CPU interpreter, deterministic seeds."""
import os

# Set before anything imports triton or open_clip.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))

# The kernel tests run on CPU tensors through Triton's interpreter; with TRITON_INTERPRET=0 on a
# machine with CUDA (`make test-gpu`) the same tests run the compiled kernels on the GPU.
KERNEL_DEVICE = torch.device("cuda" if os.environ["TRITON_INTERPRET"] == "0" and torch.cuda.is_available() else "cpu")


@pytest.fixture
def kernel_device() -> torch.device:
    """Where the float64-expectation kernel tests put their tensors (see KERNEL_DEVICE)."""
    return KERNEL_DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
