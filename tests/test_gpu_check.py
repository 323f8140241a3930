"""``make gpu-check DRY_RUN=1`` in ``make test``: the prepared GPU script runs end to end on the
CPU (tiny sizes, Triton's interpreter, this venv), writes its table and JSON where it is told and
touches no committed file; plus the pieces a GPU run relies on that the CPU can check (the
open_clip-free parameter shapes, the make target its fallback copies, the carried wheel list,
the rows kept when a benchmark is stopped)."""
from __future__ import annotations

import hashlib
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402


def _committed_outputs() -> dict[str, str]:
    """Hashes of what a non-dry gpu-check writes (RESULTS.md, plots, results/gpu-check/)."""
    paths = [ROOT / "benchmarks" / "RESULTS.md", *sorted((ROOT / "benchmarks" / "plots").rglob("*")),
             *sorted((ROOT / "benchmarks" / "results" / "gpu-check").rglob("*"))]
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in paths if p.is_file()}


@pytest.mark.timeout(400)
def test_dry_run_writes_the_table_and_json(tmp_path):
    out = tmp_path / "dry"
    before = _committed_outputs()
    if shutil.which("make"):
        cmd = ["make", "--no-print-directory", "-C", str(ROOT), "gpu-check", "DRY_RUN=1", "GPU_SETUP=",
               f"PYTHON={sys.executable}", f"GPU_CHECK_OUT={out}"]
    else:
        cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=390)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-6000:]
    assert _committed_outputs() == before, "the dry run wrote into committed files"

    results = out / "results" / "gpu-check"
    summary = json.loads((results / "gpu_check.json").read_text())
    assert summary["dry_run"] is True and summary["env"]["date"] and summary["env"]["device"]
    steps = {row["impl"]: row for row in summary["rows"]}
    assert list(steps) == ["install", "test-gpu", *gpu_check.BENCHES, "report"]
    assert steps["install"]["status"] == "skipped"  # the dry run uses this venv
    assert steps["test-gpu"]["status"] == "passed", steps["test-gpu"]
    assert steps["test-gpu"]["passed"] >= 20 and steps["test-gpu"]["failures"] == 0
    for name in gpu_check.BENCHES:
        assert steps[name]["status"] == "passed", steps[name]
        data = json.loads((results / f"{name}_quick.json").read_text())
        assert {"device", "torch", "triton", "date"} <= data["env"].keys()
        assert any(not r.get("skipped") and r.get("p50_ms") for r in data["rows"]), name
    loss = json.loads((results / "bench_loss_quick.json").read_text())["rows"]
    assert {r["impl"] for r in loss} >= {"reference", "torch", "triton", "gemm floor"}
    text = (out / "RESULTS.md").read_text()
    for name in (*gpu_check.BENCHES, "gpu_check_dry"):
        assert f"## {name}" in text, name
    assert "| gpu_check | test-gpu | passed |" in text
    assert summary["total_seconds"] < gpu_check.DRY_TOTAL_S


@pytest.mark.parametrize("name", sorted(gpu_check.CLIP_CONFIGS))
def test_parameter_spec_matches_open_clip(name):
    torch = pytest.importorskip("torch")
    open_clip = pytest.importorskip("open_clip")
    cfg, mine = open_clip.get_model_config(name), gpu_check.CLIP_CONFIGS[name]
    assert cfg["embed_dim"] == mine["embed_dim"]
    for part in ("vision_cfg", "text_cfg"):
        assert {k: cfg[part].get(k) for k in mine[part]} == mine[part], part
    with torch.device("meta"):
        model = open_clip.model.CLIP(**open_clip.get_model_config(name))
    assert [(n, tuple(p.shape)) for n, p in model.named_parameters()] == gpu_check.clip_parameter_spec(name)


def test_parameter_spec_counts():
    for name, tensors, params in (("ViT-B-32", 302, 151_277_313), ("ViT-L-14", 446, 427_616_513)):
        spec = gpu_check.clip_parameter_spec(name)
        total = 0
        for _, shape in spec:
            n = 1
            for s in shape:
                n *= s
            total += n
        assert (len(spec), total) == (tensors, params), name


@pytest.mark.skipif(not shutil.which("make"), reason="needs make")
def test_fallback_command_is_the_make_target():
    """Without make the script runs test-gpu's command itself; both must stay the same."""
    for kernel_tests in (None, ""):
        cmd = gpu_check.test_gpu_command("PY", dry_run=False, args="--a --b=1", kernel_tests=kernel_tests)
        cmd.insert(1, "-n")
        printed = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        words = shlex.split(printed)
        assert words[:2] == ["TRITON_INTERPRET=0", "DEGLA_GPU_DRY_RUN="], printed
        assert words[2:] == gpu_check.fallback_test_gpu_command("PY", ["--a", "--b=1"], kernel_tests), printed
    dry = gpu_check.test_gpu_command("PY", dry_run=True, kernel_tests="")
    dry.insert(1, "-n")
    printed = subprocess.run(dry, capture_output=True, text=True, check=True).stdout
    assert "TRITON_INTERPRET=1 DEGLA_GPU_DRY_RUN=1 PY -m pytest" in printed


def test_carried_wheels_are_pinned_pure_python_and_never_torch():
    names = [w.split("==")[0] for w in gpu_check.WHEELS]
    assert all("==" in w for w in gpu_check.WHEELS) and len(set(names)) == len(names)
    assert not any(n.startswith(gpu_check.NEVER_CARRIED) for n in names)
    assert {"pytest", "pluggy", "iniconfig", "packaging", "pygments", "pytest-benchmark"} <= set(names)
    folder = gpu_check.WHEELS_DIR
    if folder.is_dir():  # made by `make gpu-wheels`: every file pure Python and one of WHEELS
        wanted = {n.replace("-", "_").lower() for n in names}
        for whl in folder.glob("*.whl"):
            assert whl.name.endswith("-py3-none-any.whl"), whl.name
            assert whl.name.split("-")[0].lower() in wanted, whl.name


def test_a_stopped_benchmark_keeps_its_rows(tmp_path, monkeypatch):
    run = gpu_check.Run(tmp_path, dry_run=False, total_s=60)
    try:
        partial = run.results / "bench_loss.partial.jsonl"
        partial.write_text(json.dumps({"name": "degla_loss", "impl": "triton", "B": 256, "p50_ms": 1.0}) + "\n")
        (run.results / "bench_loss.env.json").write_text(json.dumps({"device": "NVIDIA H200", "date": "2026-12-01"}))
        monkeypatch.setattr(run, "call", lambda *a, **k: (None, 130.0))
        gpu_check.step_bench(run, "bench_loss")
        data = json.loads((run.results / "bench_loss.json").read_text())
        assert data["env"]["device"] == "NVIDIA H200"
        assert data["rows"][0]["impl"] == "triton" and "timed out" in data["rows"][-1]["skipped"]
        assert run.steps[-1]["status"] == "timed out" and run.steps[-1]["rows"] == 1
    finally:
        run.log.close()
        shutil.rmtree(run.cache, ignore_errors=True)


def test_junit_counts(tmp_path):
    xml = tmp_path / "r.xml"
    xml.write_text('<testsuites><testsuite tests="4" failures="1" errors="0" skipped="1">'
                   '<testcase classname="tests.test_kernels_gpu" name="test_a"/>'
                   '<testcase classname="tests.test_kernels_gpu" name="test_b"><failure message="x"/></testcase>'
                   '</testsuite></testsuites>')
    counts = gpu_check._junit_counts(xml)
    assert counts["passed"] == 2 and counts["failures"] == 1
    assert counts["first_failures"] == "test_kernels_gpu::test_b"
    assert gpu_check._junit_counts(tmp_path / "missing.xml") == {}


def test_download_wheels_command(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **k: seen.append(cmd) or subprocess.CompletedProcess(cmd, 0))
    assert gpu_check.download_wheels(tmp_path) == 0
    cmd = seen[0]
    assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd and "--only-binary=:all:" in cmd
    assert cmd[-len(gpu_check.WHEELS):] == list(gpu_check.WHEELS)
