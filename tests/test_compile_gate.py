"""The kernel compile gate (degla_fast.compile_gate): it passes a good kernel and fails the three
kinds of kernel Triton's interpreter accepts but the GPU compiler does not (a plain global, too
much shared memory, register spills), with the pinned Triton and with Triton 3.6 where
`make check-kernels` installed it. The kernels are in tests/compile_gate_fixture.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from degla_fast import compile_gate as gate

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
TRITON_36 = ROOT / ".venv" / "triton-3.6"


def _run_gate(tmp_path, *args, triton_path: Path | None = None):
    json_path = tmp_path / "gate.json"
    env = dict(os.environ)
    # TRITON_INTERPRET=1 stays as conftest set it: the gate must switch the interpreter off itself.
    env["PYTHONPATH"] = os.pathsep.join([*([str(triton_path)] if triton_path else []), str(TESTS),
                                         env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-m", "degla_fast.compile_gate", "--modules", "compile_gate_fixture",
                           "--json", str(json_path), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=240)
    report = json.loads(json_path.read_text()) if json_path.exists() else None
    return proc, report


TRITONS = [pytest.param(None, id="pinned"),
           pytest.param(TRITON_36, id="triton3.6", marks=pytest.mark.skipif(
               not (TRITON_36 / "triton").is_dir(), reason="make check-kernels installs .venv/triton-3.6"))]


@pytest.mark.parametrize("triton_path", TRITONS)
def test_gate_fails_each_bad_kernel_and_passes_the_good_one(tmp_path, triton_path):
    proc, report = _run_gate(tmp_path, "--arch", "80", "90", triton_path=triton_path)
    out = proc.stdout
    assert proc.returncode == 1, out + proc.stderr
    version = "3.6.0" if triton_path else None
    if version:
        assert f"compile gate: triton {version} ({triton_path}" in out
        assert report["triton_version"] == version
    assert str(report["triton_file"]) in out

    fails = [line for line in out.splitlines() if line.startswith("FAIL: ")]
    assert len(fails) == 3, out
    by_kernel = {k: [f for f in fails if f.startswith(f"FAIL: {k} ")] for k in
                 ("global_kernel", "matmul_kernel", "softmax_kernel", "good_kernel")}
    assert not by_kernel["good_kernel"]
    (glob,), (shared,), (spill,) = by_kernel["global_kernel"], by_kernel["matmul_kernel"], by_kernel["softmax_kernel"]
    assert "sm_80" in glob and "case=global" in glob and "compile error" in glob and "SCALE" in glob
    assert "sm_80" in shared and "warps=4 stages=6" in shared and "shared memory" in shared and "> 166912 B" in shared
    assert "sm_80" in spill and "warps=1 stages=1" in spill and "register spills" in spill

    # The table: one row per distinct variant (the duplicated good config compiled once per arch).
    rows = report["rows"]
    assert report["configs"] == 7 and report["variants"] == len(rows) == 5
    assert report["failures"] == [f[len("FAIL: "):] for f in fails] and report["ok"] is False
    row = {(r["kernel"], r["arch"]): r for r in rows}
    for arch in (80, 90):
        good = row[("good_kernel", arch)]
        assert good["ok"] and good["copies"] == 2 and good["error"] is None
        assert 0 < good["registers"] <= 255 and good["spill_stores"] == good["spill_loads"] == 0
        assert good["tensor_cores"] == "none" and good["label"] == {"dtype": "float32", "tile": 1024, "case": "good"}
    assert row[("global_kernel", 80)]["error"].startswith("CompilationError")
    mm = row[("matmul_kernel", 80)]
    assert mm["error"] is None and mm["shared"] > mm["shared_limit"] == 166_912 and mm["tensor_cores"] == "mma"
    sm = row[("softmax_kernel", 80)]
    assert sm["spill_stores"] > 0 and sm["spill_loads"] > 0 and sm["stack_frame"] > 0

    # What is printed (what `make test` shows): one line per kernel, the failures in full.
    summary = {line.split()[0]: line for line in out.splitlines() if line.split()[:1] and
               line.split()[0].endswith("_kernel")}
    assert list(summary) == ["global_kernel", "good_kernel", "matmul_kernel", "softmax_kernel"], out
    assert summary["good_kernel"].split()[-1] == "ok"
    assert "2 (sm_80 1, sm_90 1)" in summary["good_kernel"]
    assert summary["global_kernel"].endswith("1 FAILED") and summary["softmax_kernel"].endswith("1 FAILED")
    assert summary["matmul_kernel"].endswith("1 FAILED") and " mma " in summary["matmul_kernel"]
    # The table of every variant is in the text file named on the last line (and with --print-table).
    table_file = tmp_path / "gate.txt"
    assert out.strip().splitlines()[-1].endswith(f"every variant in {table_file} (JSON: {tmp_path / 'gate.json'})")
    text = table_file.read_text()
    assert [line for line in text.splitlines() if line.startswith("FAIL: ")] == fails
    header = next(line for line in text.splitlines() if line.startswith("kernel "))
    assert header.split() == ["kernel", "arch", "dtype", "D", "tile", "case", "warps", "stages", "regs", "shared",
                              "spills", "stack", "tc", "result"]
    table = {tuple(line.split()[:2]): line.split() for line in text.splitlines()
             if line.split()[:1] and line.split()[0].endswith("_kernel")}
    assert table[("good_kernel", "sm_90")][-1] == "ok"
    assert table[("global_kernel", "sm_80")][-1] == "ERROR"
    assert table[("matmul_kernel", "sm_80")][-1] == "FAIL" and table[("matmul_kernel", "sm_80")][-2] == "mma"
    assert table[("softmax_kernel", "sm_80")][-1] == "FAIL"


def test_gate_passes_when_every_config_compiles(tmp_path):
    # sm_90 gets only the good kernel from the fixture.
    proc, report = _run_gate(tmp_path, "--arch", "90", "--jobs", "1", "--print-table")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "FAIL" not in proc.stdout
    printed = [line.split() for line in proc.stdout.splitlines() if line.startswith("good_kernel ")]
    assert len(printed) == 1 and printed[0][1] == "sm_90"  # --print-table: the variant's row itself
    assert report["ok"] and report["failures"] == [] and [r["kernel"] for r in report["rows"]] == ["good_kernel"]


def test_expect_triton_refuses_another_version(tmp_path):
    proc, _ = _run_gate(tmp_path, "--arch", "90", "--expect-triton", "0.0.0")
    assert proc.returncode == 1 and "FAIL: expected triton 0.0.0" in proc.stdout


def test_module_failures():
    configs, failures = gate.collect(["degla_fast.kernels.configs", "no_such_kernel_module"], [80])
    assert configs == []
    assert failures[0] == "module degla_fast.kernels.configs: no gate_configs(arch)"
    assert failures[1].startswith("module no_such_kernel_module: import failed: ModuleNotFoundError")


PTXAS_LOG = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'k' for 'sm_80'
ptxas info    : Function properties for k
    464 bytes stack frame, 640 bytes spill stores, 552 bytes spill loads
ptxas info    : Used 255 registers, used 0 barriers, 464 bytes cumulative stack size, 376 bytes cmem[0]
ptxas info    : Compile time = 21.0 ms
"""


def test_parse_ptxas_and_tensor_cores():
    assert gate.parse_ptxas(PTXAS_LOG) == {"registers": 255, "spill_stores": 640, "spill_loads": 552,
                                           "stack_frame": 464, "static_shared": 0, "ptxas_ms": 21.0}
    assert gate.parse_ptxas("ptxas info    : Used 40 registers, 1024 bytes smem, 400 bytes cmem[0]")["static_shared"] == 1024
    assert gate.parse_ptxas("") is None
    assert gate.tensor_cores("wgmma.mma_async.sync.aligned.m64n64k16") == "wgmma"
    assert gate.tensor_cores("mma.sync.aligned.m16n8k16.row.col") == "mma"
    assert gate.tensor_cores("ld.global.v4.b32") == "none"


def test_deduplicate_and_check():
    from degla_fast.kernels.configs import KernelConfig

    def k():
        pass

    a = KernelConfig(k, {"X": "*fp32", "B": "constexpr"}, {"B": 64}, 4, 2, 80, {"tile": 64})
    same = KernelConfig(k, {"X": "*fp32", "B": "constexpr"}, {"B": 64}, 4, 2, 80, {"tile": "other label"})
    other = [KernelConfig(k, {"X": "*bf16", "B": "constexpr"}, {"B": 64}, 4, 2, 80),
             KernelConfig(k, {"X": "*fp32", "B": "constexpr"}, {"B": 128}, 4, 2, 80),
             KernelConfig(k, {"X": "*fp32", "B": "constexpr"}, {"B": 64}, 8, 2, 80),
             KernelConfig(k, {"X": "*fp32", "B": "constexpr"}, {"B": 64}, 4, 3, 80),
             KernelConfig(k, {"X": "*fp32", "B": "constexpr"}, {"B": 64}, 4, 2, 90)]
    out = gate.deduplicate([a, same, *other, a])
    assert [n for _, n in out] == [3, 1, 1, 1, 1, 1] and out[0][0] is a

    row = {"error": None, "arch": 90, "shared": 232_449, "spill_stores": 0, "spill_loads": 4, "registers": 255,
           "stack_frame": 8}
    fails = gate.check(row, {90: 232_448})
    assert len(fails) == 2 and fails[0].startswith("shared memory 232449 B > 232448 B") and "4 B loads" in fails[1]
    assert gate.check({**row, "shared": 232_448, "spill_loads": 0}, {90: 232_448}) == []
    assert gate.check({**row, "error": "CompilationError: x"}, {90: 1}) == ["compile error: CompilationError: x"]


def test_error_summary():
    class CompilationError(Exception):
        pass

    exc = CompilationError("at 3:33:\ndef g(X):\n    tl.load(X) * SCALE\n          ^\nNameError('Cannot access global variable SCALE')")
    assert gate.error_summary(exc) == "CompilationError: at 3:33: NameError('Cannot access global variable SCALE')"
    ptx = Exception("`ptxas` failed with error code 255\n`ptxas` stderr:\nptxas fatal   : error in kernel.ptx line 3\n")
    assert gate.error_summary(ptx) == "Exception: `ptxas` failed with error code 255 ptxas fatal   : error in kernel.ptx line 3"
    assert len(gate.error_summary(ValueError("x" * 1000))) == 240


def _fake_compile(cfg):
    if cfg == "crash":
        os._exit(1)
    return {"error": None, "cfg": cfg}


def test_a_compiler_crash_fails_only_its_variant(monkeypatch):
    monkeypatch.setattr(gate, "compile_config", _fake_compile)
    results = gate.compile_all(["a", "crash", "b", "c"], jobs=2)
    assert [r.get("cfg") for r in results] == ["a", None, "b", "c"]
    assert results[1]["error"].startswith("the compiler process died")


def test_the_benchmarks_own_kernel_compiles(tmp_path):
    """benchmarks/bench_atomics.py launches a Triton kernel of its own on the GPU run: the gate
    compiles both of its variants for sm_80 and sm_90 with no failure."""
    json_path = tmp_path / "gate.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "benchmarks"), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "degla_fast.compile_gate", "--modules", "bench_atomics",
                           "--json", str(json_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(json_path.read_text())
    assert report["variants"] == 4 and not report["failures"]
