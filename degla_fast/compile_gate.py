"""The kernel compile gate: every launcher configuration through Triton's real compiler, no GPU.

Triton's CPU interpreter (``TRITON_INTERPRET=1``, what the test suite runs) accepts kernels the
GPU compiler rejects: a read of a plain Python global, a tile whose shared memory no GPU has,
a per-thread tile that spills to local memory. This gate imports every kernel module, calls its
``gate_configs(arch)`` for sm_80 and sm_90 (one :class:`~degla_fast.kernels.configs.KernelConfig`
per variant a launcher can pick), compiles each distinct variant with ``triton.compile`` for a
``GPUTarget("cuda", arch, 32)`` (no driver needed) and reads what ptxas reports for the cubin
Triton built (the same ``ptxas -v`` run a real launch's compile makes).

It fails (exit status 1, one ``FAIL:`` line per problem) on
  * a compile error (Triton front end, MLIR passes or ptxas),
  * shared memory above the block limit of the arch (``configs.SHARED_LIMIT``),
  * any register spill (spill stores or loads > 0),
  * a kernel module that cannot be imported, has no ``gate_configs`` or returns no configs,
and prints one summary line per kernel (its variants, the most registers and shared memory any
of them uses, spills, tensor-core use, the result) and every failure in full. The table of every
variant (registers, shared memory, spills and tensor-core use) goes to a text file next to the
JSON report (``--print-table`` prints it too): hundreds of lines that ``make test`` does not
scroll past before its tests.

Usage::

    python -m degla_fast.compile_gate [--arch 80 90] [--json PATH] [--modules ema adamw_ema ...] [--print-table]

Every run compiles into a fresh temporary ``TRITON_CACHE_DIR`` (set before triton is imported),
so a cached kernel never hides a compile error. Compiles run in ``--jobs`` processes (default 2).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import io
import json
import multiprocessing
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool

DEFAULT_MODULES = tuple(f"degla_fast.kernels.{name}" for name in (
    "degla_loss", "gemm_loss", "loss_terms", "local_terms", "ema", "adamw_ema"))
DEFAULT_ARCHS = (80, 90)
#: Label keys shown first in the table, in this order; any others follow in order of appearance.
LEADING_LABELS = ("dtype", "D", "tile")

_REGISTERS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_STACK = re.compile(r"(\d+) bytes stack frame")
_STATIC_SMEM = re.compile(r"(\d+) bytes smem")
_PTXAS_TIME = re.compile(r"Compile time = ([\d.]+) ms")

#: Variants of the current run, by index; set before the worker processes fork.
_VARIANTS: list = []


# --------------------------------------------------------------------------------------------
# Pieces without triton: ptxas output, tensor-core detection, de-duplication, formatting.

def parse_ptxas(log: str) -> dict | None:
    """Registers, spill bytes, stack frame and static shared memory from ``ptxas -v`` output.

    ``None`` when the log holds no register line. Several functions in one log (non-inlined
    device functions): the largest register count and stack frame, the summed spills.
    """
    registers = [int(n) for n in _REGISTERS.findall(log)]
    if not registers:
        return None
    spills = [(int(s), int(l)) for s, l in _SPILLS.findall(log)]
    return {
        "registers": max(registers),
        "spill_stores": sum(s for s, _ in spills),
        "spill_loads": sum(l for _, l in spills),
        "stack_frame": max([int(n) for n in _STACK.findall(log)] or [0]),
        "static_shared": sum(int(n) for n in _STATIC_SMEM.findall(log)),
        "ptxas_ms": round(sum(float(t) for t in _PTXAS_TIME.findall(log)), 1),
    }


def tensor_cores(ptx: str) -> str:
    """``wgmma`` (Hopper warpgroup MMA), ``mma`` (``mma.sync``) or ``none``, from the PTX."""
    if re.search(r"\bwgmma\.", ptx):
        return "wgmma"
    if "mma.sync" in ptx:
        return "mma"
    return "none"


def variant_key(cfg) -> tuple:
    """What makes two configs the same compiled variant: kernel, signature, constexprs, options."""
    fn = getattr(cfg.kernel, "fn", cfg.kernel)
    return (getattr(fn, "__module__", ""), getattr(fn, "__qualname__", cfg.name), cfg.name,
            tuple((k, str(v)) for k, v in cfg.signature.items()),
            tuple(sorted((str(k), repr(v)) for k, v in cfg.constexprs.items())),
            cfg.num_warps, cfg.num_stages, cfg.arch, _divisible(cfg))


def _divisible(cfg) -> tuple:
    """Arguments compiled as multiples of 16: the config's own list (every pointer and the integers
    its launcher names, ``KernelConfig.divisible``), or every pointer for configs without one."""
    named = tuple(getattr(cfg, "divisible", ()) or ())
    return named or tuple(n for n, t in cfg.signature.items() if str(t).startswith("*"))


def deduplicate(configs: list) -> list[tuple[object, int]]:
    """The distinct variants of ``configs`` in first-seen order, each with how many configs it stands for."""
    seen: dict[tuple, int] = {}
    out: list[list] = []
    for cfg in configs:
        key = variant_key(cfg)
        if key in seen:
            out[seen[key]][1] += 1
        else:
            seen[key] = len(out)
            out.append([cfg, 1])
    return [(cfg, n) for cfg, n in out]


def error_summary(exc: BaseException) -> str:
    """One line for a compile error: the exception type, where, and the message proper.

    Triton's ``CompilationError`` text starts with ``at L:C:`` and the source excerpt and ends
    with the underlying error; ``PTXASError`` puts ptxas's own ``error`` line in the middle.
    """
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    name = type(exc).__name__
    if not lines:
        return name
    first = lines[0]
    detail = ""
    if re.fullmatch(r"at \d+:\d+:", first) and len(lines) > 1:
        detail = lines[-1]
    elif "ptxas" in first.lower():
        detail = next((line for line in lines[1:] if "error" in line.lower()), "")
    text = f"{name}: {first}" + (f" {detail}" if detail else "")
    return text if len(text) <= 240 else text[:237] + "..."


def label_columns(rows: list[dict]) -> list[str]:
    keys: list[str] = [k for k in LEADING_LABELS if any(k in r["label"] for r in rows)]
    for r in rows:
        for k in r["label"]:
            if k not in keys:
                keys.append(k)
    return keys


def _kib(n) -> str:
    return "-" if n is None else f"{n / 1024:.1f}K"


def format_table(rows: list[dict]) -> str:
    """The gate's table: one line per distinct variant."""
    labels = label_columns(rows)
    head = ["kernel", "arch", *labels, "warps", "stages", "regs", "shared", "spills", "stack", "tc", "result"]
    body = []
    for r in rows:
        compiled = r["error"] is None
        spills = "-" if not compiled else (
            "0" if r["spill_stores"] == 0 and r["spill_loads"] == 0 else f"{r['spill_stores']}/{r['spill_loads']}")
        body.append([
            r["kernel"], f"sm_{r['arch']}", *[str(r["label"].get(k, "-")) for k in labels],
            str(r["num_warps"]), str(r["num_stages"]),
            str(r["registers"]) if compiled else "-", _kib(r["shared"]) if compiled else "-", spills,
            str(r["stack_frame"]) if compiled else "-", r["tensor_cores"] if compiled else "-",
            "ok" if r["ok"] else ("ERROR" if not compiled else "FAIL"),
        ])
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
    fmt = lambda row: "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *map(fmt, body)])


def format_summary(rows: list[dict]) -> str:
    """One line per kernel (in the rows' order): its variants per arch, the most registers and
    shared memory any of them uses, how many spill, the tensor-core instructions, the result."""
    kernels: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        kernels.setdefault((r["kernel"], r["module"].rsplit(".", 1)[-1]), []).append(r)
    head = ["kernel", "module", "variants", "max regs", "max shared", "spilling", "tc", "result"]
    body = []
    for (kernel, module), group in kernels.items():
        compiled = [r for r in group if r["error"] is None]
        archs = sorted({r["arch"] for r in group})
        per_arch = ", ".join(f"sm_{a} {sum(r['arch'] == a for r in group)}" for a in archs)
        failed = sum(not r["ok"] for r in group)
        body.append([
            kernel, module, f"{len(group)} ({per_arch})",
            str(max((r["registers"] or 0) for r in compiled)) if compiled else "-",
            _kib(max(r["shared"] for r in compiled)) if compiled else "-",
            str(sum(bool(r["spill_stores"] or r["spill_loads"]) for r in compiled)),
            "/".join(sorted({r["tensor_cores"] for r in compiled} - {"none"})) or "none",
            "ok" if not failed else f"{failed} FAILED",
        ])
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
    fmt = lambda row: "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *map(fmt, body)])


def describe(row: dict) -> str:
    """Kernel and configuration of a row, as a failure line names them."""
    label = " ".join(f"{k}={v}" for k, v in row["label"].items())
    return (f"{row['kernel']} ({row['module']}) sm_{row['arch']}" + (f" [{label}]" if label else "")
            + f" warps={row['num_warps']} stages={row['num_stages']}")


def check(row: dict, shared_limit: dict) -> list[str]:
    """The failures of one compiled (or not) variant."""
    if row["error"] is not None:
        return [f"compile error: {row['error']}"]
    failures = []
    limit = shared_limit.get(row["arch"])
    if limit is not None and row["shared"] > limit:
        failures.append(f"shared memory {row['shared']} B > {limit} B per-block limit of sm_{row['arch']}")
    if row["spill_stores"] or row["spill_loads"]:
        failures.append(f"register spills: {row['spill_stores']} B stores, {row['spill_loads']} B loads "
                        f"({row['registers']} registers, {row['stack_frame']} B stack frame)")
    if row["registers"] is None:
        failures.append("no ptxas register report")
    return failures


# --------------------------------------------------------------------------------------------
# Compiling (worker processes; triton is imported by then).

def _ptxas_path(arch: int) -> str:
    import triton
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    return bundled if os.path.exists(bundled) else (shutil.which("ptxas") or bundled)


_PTXAS_CACHE: dict[str, dict | None] = {}


def _run_ptxas(ptx: str, arch: int) -> dict | None:
    """``ptxas -v`` on the PTX (only where Triton's own ptxas log was not captured); once per distinct PTX."""
    key = hashlib.sha256(f"{arch}\n{ptx}".encode()).hexdigest()
    if key not in _PTXAS_CACHE:
        gpu = "sm_90a" if arch == 90 else f"sm_{arch}"
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "kernel.ptx")
            with open(path, "w") as f:
                f.write(ptx)
            proc = subprocess.run([_ptxas_path(arch), "-v", "--gpu-name", gpu, path, "-o", os.devnull],
                                  capture_output=True, text=True)
        _PTXAS_CACHE[key] = parse_ptxas(proc.stderr + proc.stdout)
    return _PTXAS_CACHE[key]


def compile_config(cfg) -> dict:
    """Compile one config for its arch; the measurements, or ``error`` set to a one-line summary."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    result = {"error": None, "registers": None, "shared": None, "dynamic_shared": None, "static_shared": None,
              "spill_stores": None, "spill_loads": None, "stack_frame": None, "tensor_cores": None,
              "ptxas_source": None}
    start = time.perf_counter()
    log = io.StringIO()
    try:
        arg_names = cfg.kernel.arg_names
        # tt.divisibility 16 where a real launch specialises on it: every pointer (torch's
        # allocations are 16-byte aligned) and the integers the launcher says are multiples of 16.
        divisible = set(_divisible(cfg))
        attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(arg_names) if name in divisible}
        src = ASTSource(cfg.kernel, dict(cfg.signature), dict(cfg.constexprs), attrs)
        # TRITON_DUMP_PTXAS_LOG=1: Triton prints the log of the ptxas -v run that built the cubin.
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=GPUTarget("cuda", cfg.arch, 32),
                                      options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    except Exception as exc:  # noqa: BLE001 - every compile failure is a gate failure
        result["error"] = error_summary(exc)
        result["compile_s"] = round(time.perf_counter() - start, 3)
        return result
    ptx = compiled.asm["ptx"]
    usage = parse_ptxas(log.getvalue())
    result["ptxas_source"] = "triton"
    if usage is None:
        usage = _run_ptxas(ptx, cfg.arch)
        result["ptxas_source"] = "ptxas -v"
    dynamic = int(compiled.metadata.shared)
    result.update(dynamic_shared=dynamic, tensor_cores=tensor_cores(ptx))
    if usage is not None:
        result.update(usage)
        result["shared"] = dynamic + usage["static_shared"]
    else:
        result["shared"] = dynamic
    result["compile_s"] = round(time.perf_counter() - start, 3)
    return result


def _compile_index(index: int) -> tuple[int, dict]:
    return index, compile_config(_VARIANTS[index])


def _pool_round(ctx, jobs: int, indices: list[int], results: list) -> None:
    try:
        with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
            futures = {pool.submit(_compile_index, i): i for i in indices}
            for future in as_completed(futures):
                try:
                    results[futures[future]] = future.result()[1]
                except BrokenProcessPool:
                    pass
    except BrokenProcessPool:
        pass


def compile_all(variants: list, jobs: int) -> list[dict]:
    """Compile ``variants`` in ``jobs`` forked processes; results in the same order."""
    global _VARIANTS
    _VARIANTS = list(variants)
    results: list[dict | None] = [None] * len(variants)
    if jobs <= 1 or len(variants) <= 1:
        for i in range(len(variants)):
            results[i] = compile_config(variants[i])
        return results  # type: ignore[return-value]
    ctx = multiprocessing.get_context("fork")
    _pool_round(ctx, jobs, list(range(len(variants))), results)
    # A crash inside Triton, LLVM or ptxas kills a worker and with it the pool: what did not
    # finish is compiled again, each in a process of its own, so the crash lands on its variant.
    for i in [i for i, r in enumerate(results) if r is None]:
        _pool_round(ctx, 1, [i], results)
        if results[i] is None:
            results[i] = {"error": "the compiler process died (a crash in Triton, LLVM or ptxas)", "registers": None,
                          "shared": None, "spill_stores": None, "spill_loads": None, "stack_frame": None,
                          "tensor_cores": None, "compile_s": None}
    return results  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# Driver.

def _import_module(name: str):
    """``name`` as given, or ``degla_fast.kernels.<name>`` for a bare name that is one of those."""
    if "." not in name:
        try:
            return importlib.import_module(f"degla_fast.kernels.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"degla_fast.kernels.{name}":
                raise
    return importlib.import_module(name)


def collect(modules: list[str], archs: list[int]) -> tuple[list, list[str]]:
    """Every module's configs for every arch, and the module-level failures."""
    configs, failures = [], []
    for name in modules:
        try:
            module = _import_module(name)
        except Exception as exc:  # noqa: BLE001
            failures.append(f"module {name}: import failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            continue
        gate_configs = getattr(module, "gate_configs", None)
        if gate_configs is None:
            failures.append(f"module {module.__name__}: no gate_configs(arch)")
            continue
        for arch in archs:
            try:
                got = list(gate_configs(arch))
            except Exception as exc:  # noqa: BLE001
                failures.append(f"module {module.__name__}: gate_configs({arch}) raised {type(exc).__name__}: {exc}")
                continue
            if not got:
                failures.append(f"module {module.__name__}: gate_configs({arch}) returned no configs")
            for cfg in got:
                if cfg.arch != arch:
                    failures.append(f"module {module.__name__}: gate_configs({arch}) returned a config of "
                                    f"{cfg.name} for arch {cfg.arch}")
                    continue
                configs.append((module.__name__, cfg))
    return configs, failures


def _jsonable(value):
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value)


def _prepare_environment() -> str:
    """A fresh Triton cache and the compiler a real launch gets; before triton is imported."""
    cache = tempfile.mkdtemp(prefix="degla-compile-gate-")
    os.environ["TRITON_CACHE_DIR"] = cache
    os.environ["TRITON_INTERPRET"] = "0"
    os.environ["TRITON_ALWAYS_COMPILE"] = "1"
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    # A real launch rejects plain globals unless this is set; the gate must too.
    os.environ.pop("TRITON_ALLOW_NON_CONSTEXPR_GLOBALS", None)
    return cache


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m degla_fast.compile_gate", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, nargs="+", default=list(DEFAULT_ARCHS), help="architectures (default: 80 90)")
    p.add_argument("--json", default=None,
                   help="where to write the table as JSON (default: benchmarks/results/compile_gate-triton<version>.json; "
                        "the table as text goes next to it, with .txt for .json)")
    p.add_argument("--print-table", action="store_true",
                   help="print the table of every variant too (default: one summary line per kernel)")
    p.add_argument("--modules", nargs="+", default=list(DEFAULT_MODULES),
                   help="kernel modules with gate_configs(arch); a bare name means degla_fast.kernels.<name>")
    p.add_argument("--jobs", type=int, default=2, help="compile processes (default: 2)")
    p.add_argument("--expect-triton", default=None, metavar="VERSION",
                   help="fail at once unless the imported triton is this version (make check-kernels' 3.6 run)")
    return p.parse_args(argv)


def _ptxas_info(arch: int) -> tuple[str, str]:
    """``(path, version line)`` of the ptxas that compiles for ``arch`` ("unknown" version when it does not run)."""
    ptxas = _ptxas_path(arch)
    try:
        version = subprocess.run([ptxas, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    except (OSError, IndexError):
        version = "unknown"
    return ptxas, version


def _rows(distinct: list, results: list, by_module: dict, modules: list[str], shared_limit: dict) -> list[dict]:
    """One checked row per compiled variant, in the order of ``modules``, then module, kernel, arch."""
    rows = []
    for (cfg, copies), res in zip(distinct, results):
        row = {"kernel": cfg.name, "module": by_module[variant_key(cfg)], "arch": cfg.arch,
               "label": _jsonable(cfg.label), "num_warps": cfg.num_warps, "num_stages": cfg.num_stages,
               "constexprs": _jsonable(cfg.constexprs), "signature": _jsonable(cfg.signature),
               "copies": copies, "shared_limit": shared_limit.get(cfg.arch), **res}
        row["failures"] = check(row, shared_limit)
        row["ok"] = not row["failures"]
        rows.append(row)
    order = {m: i for i, m in enumerate(modules)}
    rows.sort(key=lambda r: (order.get(r["module"], order.get(r["module"].rsplit(".", 1)[-1], len(order))),
                             r["module"], r["kernel"], r["arch"]))
    return rows


def _compile_and_check(args, shared_limit: dict) -> tuple[int, list[dict], list[str]]:
    """Collect, deduplicate and compile every variant of ``args.modules``; ``(configs, rows, failures)``."""
    configs, failures = collect(args.modules, args.arch)
    by_module: dict[tuple, str] = {}
    for module, cfg in configs:
        by_module.setdefault(variant_key(cfg), module)
    distinct = deduplicate([cfg for _, cfg in configs])
    print(f"compile gate: {len(configs)} configs from {len(args.modules)} modules -> {len(distinct)} distinct "
          f"variants, {args.jobs} processes")
    sys.stdout.flush()
    results = compile_all([cfg for cfg, _ in distinct], args.jobs)
    rows = _rows(distinct, results, by_module, args.modules, shared_limit)
    if rows:
        print(format_table(rows) if args.print_table else format_summary(rows))
    for row in rows:
        for failure in row["failures"]:
            failures.append(f"{describe(row)}: {failure}")
    return len(configs), rows, failures


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "triton" in sys.modules:
        # Already imported (with its cache dir and interpreter setting fixed): start clean.
        return subprocess.run([sys.executable, "-m", "degla_fast.compile_gate", *argv]).returncode
    args = parse_args(argv)
    cache = _prepare_environment()
    start = time.perf_counter()
    try:
        import triton

        from degla_fast.kernels.configs import SHARED_LIMIT

        ptxas, ptxas_version = _ptxas_info(args.arch[0])
        print(f"compile gate: triton {triton.__version__} ({triton.__file__})")
        if args.expect_triton and triton.__version__ != args.expect_triton:
            print(f"FAIL: expected triton {args.expect_triton}, imported {triton.__version__} from {triton.__file__}")
            return 1
        print(f"compile gate: ptxas {ptxas} ({ptxas_version})")
        print(f"compile gate: TRITON_CACHE_DIR={cache}, archs {' '.join(f'sm_{a}' for a in args.arch)}, "
              f"shared limits {' '.join(f'sm_{a}={SHARED_LIMIT.get(a)}B' for a in args.arch)}")
        sys.stdout.flush()

        n_configs, rows, failures = _compile_and_check(args, SHARED_LIMIT)
        elapsed = time.perf_counter() - start
        cpu = sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
                  for f in ("ru_utime", "ru_stime"))
        path = args.json or os.path.join("benchmarks", "results", f"compile_gate-triton{triton.__version__}.json")
        table_path = os.path.splitext(path)[0] + ".txt"
        report = {"triton_version": triton.__version__, "triton_file": triton.__file__, "ptxas": ptxas,
                  "ptxas_version": ptxas_version, "archs": args.arch, "modules": args.modules,
                  "shared_limit": {str(a): SHARED_LIMIT.get(a) for a in args.arch}, "configs": n_configs,
                  "variants": len(rows), "elapsed_s": round(elapsed, 2), "cpu_s": round(cpu, 1), "jobs": args.jobs,
                  "ok": not failures,
                  "failures": failures, "rows": rows}
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(report, f, indent=1)
        with open(table_path, "w") as f:
            f.write(f"compile gate: triton {triton.__version__} ({triton.__file__}), ptxas {ptxas_version}\n\n"
                    + (format_table(rows) if rows else "(no variants)") + "\n"
                    + "".join(f"FAIL: {failure}\n" for failure in failures))
        for failure in failures:
            print(f"FAIL: {failure}")
        print(f"compile gate: triton {triton.__version__}: {len(rows)} variants, {len(failures)} failures, "
              f"{elapsed:.1f} s ({cpu:.0f} CPU s in all processes); every variant in {table_path} (JSON: {path})")
        return 1 if failures else 0
    finally:
        shutil.rmtree(cache, ignore_errors=True)

if __name__ == "__main__":
    sys.exit(main())
