"""Which implementation runs: the backend names and the one rule that resolves them.

The loss (``degla_fast.functional``) takes ``backend="auto" | "reference" | "torch" | "gemm" |
"triton"`` and resolves it with :func:`resolve_loss_backend`; the EMA updates
(``degla_fast.ema``, ``degla_fast.optim_ema``) take ``"auto" | "torch" | "triton"`` and resolve
it with :func:`resolve_backend`, per call and device:

* ``triton`` and ``gemm`` need Triton to import and CUDA tensors, or CPU tensors under
  ``TRITON_INTERPRET=1`` (Triton's interpreter, how the tests run the kernels); otherwise a
  ConfigError.
* ``auto`` is ``torch`` for CPU tensors (never the interpreter, which is for tests). For CUDA
  tensors, the EMA takes ``triton``; the loss takes, in this order:

  1. the fastest backend *measured* on this GPU model (compute capability) and input dtype at
     the nearest measured size, from the committed table :data:`AUTO_TABLE` that
     ``make gpu-check`` writes (:func:`write_auto_table`), where one exists;
  2. otherwise the modelled rule: ``triton``, which by count (docs/loss.md) is within a few per
     cent of the three-GEMM floor where its logits are kept (16-bit, fitting in ``chunk_bytes``)
     and five passes where they are recomputed, against ``gemm``'s 2.5x (its cuBLAS GEMMs are
     faster per FLOP than Triton's; only a measurement can say by how much, hence step 1).

  fp64 inputs take ``torch`` (the fused kernels compute in fp32 at most); an explicit ``gemm`` or
  ``triton`` with fp64 inputs is a ConfigError.

  The loss's choice is logged once per (device, dtype, choice) on the ``degla_fast`` logger,
  with the reason, and kept in :data:`LAST_LOSS_CHOICE` for the trainer's start line.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ConfigError

if TYPE_CHECKING:
    import torch

# torch is imported inside the functions that take devices and dtypes: the names and checks here
# are what the training configuration's fields use, and ``degla-fast train --help`` must not pay
# for torch's import (seconds) to list them.

LOSS_BACKENDS = ("auto", "reference", "torch", "gemm", "triton")
EMA_BACKENDS = ("auto", "torch", "triton")
#: The committed measurements ``auto`` reads (written by ``benchmarks/gpu_check.py``).
AUTO_TABLE = Path(__file__).resolve().parent / "auto_backends.json"
#: (backend, reason) of the loss's last ``auto`` resolution, for logs (None before the first).
LAST_LOSS_CHOICE: tuple[str, str] | None = None

_log = logging.getLogger("degla_fast")
_logged: set = set()


@functools.cache
def triton_importable() -> bool:
    """Whether ``import triton`` succeeds (an import, not a lookup: a broken install counts as absent)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_usable(device: torch.device) -> bool:
    """Whether the Triton kernels can run on tensors of ``device``: CUDA tensors, or CPU tensors
    under the interpreter, and Triton imports."""
    import torch

    device = torch.device(device)
    interpret = device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1"
    return (device.type == "cuda" or interpret) and triton_importable()


def check_backend(backend: str, choices: tuple[str, ...] = EMA_BACKENDS) -> str:
    """``backend`` if it is one of ``choices``, else a ConfigError naming them."""
    if backend not in choices:
        raise ConfigError(f"backend must be one of {', '.join(choices)}; got {backend!r}")
    return backend


def _check_usable(backend: str, device: torch.device) -> str:
    if backend in ("triton", "gemm") and not triton_usable(device):
        raise ConfigError(f"backend={backend!r} needs Triton and CUDA tensors (or TRITON_INTERPRET=1 for CPU "
                          f"tensors); got {device} tensors")
    return backend


def resolve_backend(backend: str, device: torch.device, *, choices: tuple[str, ...] = EMA_BACKENDS) -> str:
    """The EMA's concrete backend for ``backend`` on ``device`` (see the module doc)."""
    import torch

    check_backend(backend, choices)
    device = torch.device(device)
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_importable() else "torch"
    return _check_usable(backend, device)


def modelled_loss_backend(rows: int, columns: int, dtype: torch.dtype, chunk_bytes: int) -> tuple[str, str]:
    """(backend, reason) of the modelled rule for a CUDA loss of ``rows`` x ``columns`` logits."""
    import torch

    kept = 4 if dtype == torch.float32 else 2
    need = rows * columns * kept
    how = (f"keeps its {need >> 20} MiB of logits (chunk_bytes={chunk_bytes}): 3 GEMM passes"
           if need <= chunk_bytes else f"recomputes its logits ({need >> 20} MiB > chunk_bytes={chunk_bytes})")
    return "triton", f"modelled: triton {how}; no GPU measurements for this device"


@functools.cache
def _table(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        return {}
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConfigError(f"{p}: not a backend table ({err})") from None


def measured_loss_backend(capability: tuple[int, int], rows: int, columns: int, dtype: torch.dtype,
                          table_path: str | Path = AUTO_TABLE) -> tuple[str, str] | None:
    """(backend, reason) from the table's entry for this compute capability and dtype at the
    nearest measured number of logits (log scale), or None without such an entry."""
    table = _table(str(table_path))
    cap = f"{capability[0]}.{capability[1]}"
    dtype_name = str(dtype).replace("torch.", "")
    entries = [e for e in table.get("entries", []) if e["capability"] == cap and e["dtype"] == dtype_name]
    if not entries:
        return None
    logits = max(1, rows * columns)
    best = min(entries, key=lambda e: abs(math.log(e["logits"]) - math.log(logits)))
    return best["backend"], (f"measured: fastest on {table.get('device', 'this GPU')} ({table.get('date', '?')}) at "
                             f"B={best['B']}, {dtype_name} ({best['p50_ms']:.3g} ms; table {Path(table_path).name})")


def device_capability(device: torch.device) -> tuple[int, int]:
    """The CUDA compute capability of ``device`` (a function, so tests can stand in for a GPU)."""
    import torch

    return torch.cuda.get_device_capability(device)


def resolve_loss_backend(backend: str, device: torch.device, *, rows: int, columns: int, dtype: torch.dtype,
                         chunk_bytes: int, table_path: str | Path = AUTO_TABLE) -> str:
    """The loss's concrete backend for ``backend`` on ``device``, for ``rows`` x ``columns``
    image-to-text logits of ``dtype`` inputs (see the module doc). Raises ConfigError for a name
    not in :data:`LOSS_BACKENDS` or an unusable ``triton``/``gemm``."""
    import torch

    global LAST_LOSS_CHOICE
    check_backend(backend, LOSS_BACKENDS)
    device = torch.device(device)
    if backend in ("gemm", "triton") and dtype == torch.float64:
        raise ConfigError(f"backend={backend!r} computes in fp32 at most; float64 features need backend='torch', "
                          "'reference' or 'auto'")
    if backend != "auto":
        return _check_usable(backend, device)
    if device.type != "cuda" or not triton_importable():
        choice = ("torch", f"{device.type} tensors" if device.type != "cuda" else "Triton does not import")
    elif dtype == torch.float64:
        choice = ("torch", "float64 features: the fused kernels compute in fp32 at most")
    else:
        choice = (measured_loss_backend(device_capability(device), rows, columns, dtype, table_path)
                  or modelled_loss_backend(rows, columns, dtype, chunk_bytes))
    LAST_LOSS_CHOICE = choice
    key = (str(device), str(dtype), choice[0])
    if key not in _logged:
        _logged.add(key)
        _log.info("degla-fast loss: backend auto -> %s (%s)", *choice)
    return choice[0]


def write_auto_table(rows: list[dict], env: dict, capability: tuple[int, int], path: str | Path = AUTO_TABLE) -> dict:
    """The table :func:`measured_loss_backend` reads, from bench_loss rows of one GPU run: per
    (dtype, B), the loss backend (``torch``, ``gemm`` at its default chunk budget, ``triton``)
    with the lowest p50. Written atomically; returns it."""
    from .io import write_json_atomic

    candidates = {"torch": "torch", "gemm": "gemm", "triton": "triton"}
    best: dict = {}
    for row in rows:
        backend = candidates.get(row.get("impl"))
        if backend is None or row.get("skipped") or row.get("p50_ms") is None:
            continue
        key = (row["dtype"], row["B"])
        if key not in best or row["p50_ms"] < best[key]["p50_ms"]:
            best[key] = {"capability": f"{capability[0]}.{capability[1]}", "dtype": row["dtype"], "B": row["B"],
                         "K": row["K"], "D": row["D"], "logits": row["B"] * row["B"] * (1 + row["K"]),
                         "backend": backend, "p50_ms": row["p50_ms"]}
    table = {"written_by": "benchmarks/gpu_check.py (bench_loss rows)", "device": env.get("device"),
             "date": env.get("date"), "torch": env.get("torch"), "triton": env.get("triton"),
             "entries": [best[k] for k in sorted(best)]}
    write_json_atomic(Path(path), table)
    _table.cache_clear()
    return table
