"""Which loss backend ``auto`` runs, and why: :func:`resolve_backend`, the one rule.

For CPU tensors ``auto`` is ``torch`` (never Triton's interpreter, which is for tests). For CUDA
tensors, in this order:

1. the fastest backend *measured* on this GPU model (compute capability) and input dtype at the
   nearest measured size, from the committed table :data:`AUTO_TABLE` that ``make gpu-check``
   writes (:func:`write_auto_table`), where one exists;
2. otherwise the modelled rule: ``triton``, which by count (docs/loss.md) is within a few per
   cent of the three-GEMM floor where its logits are kept (16-bit, fitting in ``chunk_bytes``)
   and five passes where they are recomputed, against ``gemm``'s 2.5x (its cuBLAS GEMMs are
   faster per FLOP than Triton's; only a measurement can say by how much, hence step 1).

fp64 features take ``torch`` (the fused kernels compute in fp32 at most); an explicit ``gemm`` or
``triton`` with fp64 features, or without Triton and CUDA tensors (or ``TRITON_INTERPRET=1``
for CPU tensors), is a ConfigError. Each choice is logged once per (device, dtype, choice) on the
``degla_fast`` logger with its reason; the trainer's start line prints it too.
"""
from __future__ import annotations

import functools
import json
import logging
import math
from pathlib import Path
from typing import NamedTuple

import torch

from ..backends import check_backend, check_usable, triton_importable
from ..errors import ConfigError
from .spec import LOSS_BACKENDS, LossSpec

#: The committed measurements ``auto`` reads (written by ``benchmarks/gpu_check.py``).
AUTO_TABLE = Path(__file__).resolve().parent.parent / "auto_backends.json"

_log = logging.getLogger("degla_fast")
_logged: set = set()


class BackendChoice(NamedTuple):
    """The backend a call runs and why (``"modelled: ..."``, ``"measured: ..."``, ``"cpu tensors"``,
    ``"asked for"``)."""

    name: str
    reason: str


def resolve_backend(spec: LossSpec, *, batch: int, device: torch.device | str, dtype: torch.dtype,
                    world_size: int = 1, table_path: str | Path = AUTO_TABLE) -> BackendChoice:
    """The backend ``spec.backend`` runs for calls of ``batch`` samples per rank (``dtype``
    features on ``device``) in a job of ``world_size`` processes: ``auto`` sized by this rank's
    image-to-text logits, its anchor rows (its own with ``local_loss``, else every rank's) times
    every rank's caption rows. The loss calls it per call; the trainer before its first step, to
    print the choice and its reason."""
    anchors = batch * (1 if spec.local_loss else world_size)
    return choose(spec.backend, device, rows=anchors, columns=batch * (1 + spec.num_negatives) * world_size,
                  dtype=dtype, chunk_bytes=spec.chunk_bytes, table_path=table_path)


def choose(backend: str, device: torch.device, *, rows: int, columns: int, dtype: torch.dtype, chunk_bytes: int,
           table_path: str | Path = AUTO_TABLE) -> BackendChoice:
    """:func:`resolve_backend` for ``rows`` x ``columns`` image-to-text logits of ``dtype`` features
    on ``device`` (see the module doc)."""
    check_backend(backend, LOSS_BACKENDS)
    device = torch.device(device)
    if backend in ("gemm", "triton") and dtype == torch.float64:
        raise ConfigError(f"backend={backend!r} computes in fp32 at most; float64 features need backend='torch', "
                          "'reference' or 'auto'")
    if backend != "auto":
        return BackendChoice(check_usable(backend, device), "asked for")
    if device.type != "cuda" or not triton_importable():
        choice = BackendChoice("torch", f"{device.type} tensors" if device.type != "cuda" else
                               "Triton does not import")
    elif dtype == torch.float64:
        choice = BackendChoice("torch", "float64 features: the fused kernels compute in fp32 at most")
    else:
        choice = (measured_choice(device_capability(device), rows, columns, dtype, table_path)
                  or modelled_choice(rows, columns, dtype, chunk_bytes))
    key = (str(device), str(dtype), choice.name)
    if key not in _logged:
        _logged.add(key)
        _log.info("degla-fast loss: backend auto -> %s (%s)", *choice)
    return choice


def modelled_choice(rows: int, columns: int, dtype: torch.dtype, chunk_bytes: int) -> BackendChoice:
    """The modelled rule for a CUDA loss of ``rows`` x ``columns`` logits."""
    kept = 4 if dtype == torch.float32 else 2
    need = rows * columns * kept
    how = (f"keeps its {need >> 20} MiB of logits (chunk_bytes={chunk_bytes}): 3 GEMM passes"
           if need <= chunk_bytes else f"recomputes its logits ({need >> 20} MiB > chunk_bytes={chunk_bytes})")
    return BackendChoice("triton", f"modelled: triton {how}; no GPU measurements for this device")


@functools.cache
def _table(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        return {}
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConfigError(f"{p}: not a backend table ({err})") from None


def measured_choice(capability: tuple[int, int], rows: int, columns: int, dtype: torch.dtype,
                    table_path: str | Path = AUTO_TABLE) -> BackendChoice | None:
    """The choice from the table's entry for this compute capability and dtype at the
    nearest measured number of logits (log scale), or None without such an entry."""
    table = _table(str(table_path))
    cap = f"{capability[0]}.{capability[1]}"
    dtype_name = str(dtype).replace("torch.", "")
    entries = [e for e in table.get("entries", []) if e["capability"] == cap and e["dtype"] == dtype_name]
    if not entries:
        return None
    logits = max(1, rows * columns)
    best = min(entries, key=lambda e: abs(math.log(e["logits"]) - math.log(logits)))
    where = f"{table.get('device', 'this GPU')} ({table.get('date', '?')})"
    return BackendChoice(best["backend"], f"measured: fastest on {where} at B={best['B']}, {dtype_name} "
                                          f"({best['p50_ms']:.3g} ms; table {Path(table_path).name})")


def device_capability(device: torch.device) -> tuple[int, int]:
    """The CUDA compute capability of ``device`` (a function, so tests can stand in for a GPU)."""
    return torch.cuda.get_device_capability(device)


def write_auto_table(rows: list[dict], env: dict, capability: tuple[int, int], path: str | Path = AUTO_TABLE) -> dict:
    """The table :func:`measured_choice` reads, from bench_loss rows of one GPU run: per
    (dtype, B), the loss backend (``torch``, ``gemm`` at its default chunk budget, ``triton``)
    with the lowest p50. Written atomically; returns it."""
    from ..io import write_json_atomic

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
