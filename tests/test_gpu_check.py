"""``make gpu-check DRY_RUN=1`` in ``make test``: the prepared GPU script runs end to end on the
CPU (tiny sizes, Triton's interpreter, this venv), writes its table and JSON where it is told and
touches no committed file; plus the pieces a GPU run relies on that the CPU can check (the
open_clip-free parameter shapes, the make target its fallback copies, the carried wheel list
and its install, the rows kept when a benchmark is stopped, the time each step keeps for the
later ones, and bench_step's budget with a stand-in for its cases)."""
from __future__ import annotations

import hashlib
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import gpu_check  # benchmarks/gpu_check.py (pytest.ini puts benchmarks/ on sys.path)

ROOT = Path(__file__).resolve().parents[1]


def _committed_outputs() -> dict[str, str]:
    """Hashes of what a non-dry gpu-check writes (RESULTS.md, plots, results/gpu-check/)."""
    paths = [ROOT / "benchmarks" / "RESULTS.md", *sorted((ROOT / "benchmarks" / "plots").rglob("*")),
             *sorted((ROOT / "benchmarks" / "results" / "gpu-check").rglob("*"))]
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in paths if p.is_file()}


_BLOCKER = """import sys

BLOCKED = {blocked!r}


class ImageLacks:
    \"\"\"What the GPU image lacks cannot be imported (tests/test_gpu_check.py).\"\"\"

    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            raise ModuleNotFoundError(f"No module named {{name!r}} (the GPU image has none)", name=name)
        return None


sys.meta_path.insert(0, ImageLacks())
"""


def blocked_modules() -> list[str]:
    """What the image lacks and gpu-check does not carry."""
    carried = set(gpu_check.WHEEL_MODULES.values())
    return [m for m in gpu_check.IMAGE_LACKS if m not in carried]


def _image_env(tmp_path: Path) -> dict:
    """This environment with a sitecustomize that blocks :func:`blocked_modules` in every process."""
    import os

    folder = tmp_path / "image-lacks"
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(_BLOCKER.format(blocked=blocked_modules()))
    path = os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path}


def test_the_blocker_blocks(tmp_path):
    blocked = set(blocked_modules())
    assert "open_clip" not in blocked and {"safetensors", "deepspeed", "nvidia.dali"} <= blocked
    done = subprocess.run([sys.executable, "-c", "import safetensors"], capture_output=True, text=True,
                          env=_image_env(tmp_path), cwd=tmp_path)
    assert done.returncode != 0 and "the GPU image has none" in done.stderr


@pytest.mark.timeout(400)
def test_dry_run_writes_the_table_and_json(tmp_path):
    """``make gpu-check DRY_RUN=1 OUT=DIR`` with what the GPU image lacks blocked in every process:
    every stage runs, the summary is printed last, and everything comes back in DIR."""
    out, copy = tmp_path / "dry", tmp_path / "OUT"
    before = _committed_outputs()
    if shutil.which("make"):
        cmd = ["make", "--no-print-directory", "-C", str(ROOT), "gpu-check", "DRY_RUN=1", "GPU_SETUP=",
               f"PYTHON={sys.executable}", f"GPU_CHECK_OUT={out}", f"OUT={copy}"]
    else:
        cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--out", str(out),
               "--copy-to", str(copy)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=390, env=_image_env(tmp_path))
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-6000:]
    assert _committed_outputs() == before, "the dry run wrote into committed files"
    tail = done.stdout.rstrip().split("=== gpu-check summary")[-1]
    assert "DRY RUN" in tail.splitlines()[0] and len(tail.splitlines()) <= 24  # the last thing, one screen
    for target in gpu_check.evaluate_targets([], gpu_check.TARGET_SHAPES["dry"]):
        assert target["target"] in tail, target
    files = sorted(p.name for p in copy.iterdir())
    assert files == sorted(gpu_check.COPIED + ("gpu-check.tar.gz",)), files  # 8: the device tool's limit
    assert json.loads((copy / "bench_loss.json").read_text())["benchmark"] == "bench_loss_quick"
    assert json.loads((copy / "auto_backends.json").read_text())["entries"]  # the dry run's table, written
    assert (copy / "summary.md").read_text().strip() == "=== gpu-check summary" + tail.rstrip()

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
    assert {r["impl"] for r in loss} >= {"reference", "torch", "triton", "triton, recomputed", "gemm floor",
                                         "pure gemm floor"}
    measured = [r for r in loss if not r.get("skipped")]
    assert all(r.get("x_floor") and r.get("x_gemm_floor") for r in measured), measured
    assert summary["targets"] == gpu_check.evaluate_targets(loss, gpu_check.TARGET_SHAPES["dry"])
    step = {r["impl"]: r for r in json.loads((results / "bench_step_quick.json").read_text())["rows"]}
    for impl in ("plain CLIP", "DeGLA as released", "DeGLA (ours)"):  # train_step itself, each in its process
        row = step[impl]
        assert not row.get("skipped") and row["p20_ms"] <= row["p50_ms"] <= row["p80_ms"], row
        assert row["peak_mem_bytes"] > 0 and row["case_s"] > 0 and row["stage"] == "eager", row
    assert "GPU only" in step["DeGLA (ours, torch.compile)"]["skipped"]
    assert steps["bench_step"]["failed_cases"] == 0 and steps["bench_step"]["not_run"] == 0
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
    assert {"pytest", "pluggy", "iniconfig", "packaging", "pygments", "pytest-benchmark", "open_clip_torch",
            "ftfy", "wcwidth", "regex"} <= set(names)
    assert set(names) == set(gpu_check.WHEEL_MODULES) and set(gpu_check.BINARY_WHEELS) <= set(gpu_check.WHEELS)
    # Dependency order: each carried wheel after the carried ones it needs.
    needs = {"pytest": ("pluggy", "iniconfig", "packaging", "pygments"), "pytest-benchmark": ("pytest", "py-cpuinfo2"),
             "pytest-timeout": ("pytest",), "pytest-xdist": ("pytest", "execnet"), "ftfy": ("wcwidth",),
             "open_clip_torch": ("ftfy", "regex", "tqdm")}
    for name, deps in needs.items():
        assert all(names.index(d) < names.index(name) for d in deps), name
    assert "3.12" in gpu_check.BINARY_WHEELS["regex==2026.11.19"]  # the GPU images' python
    folder = gpu_check.WHEELS_DIR
    if folder.is_dir():  # made by `make gpu-wheels`: pure Python or a listed compiled one, all in WHEELS
        wanted = {gpu_check._wheel_stem(w).lower() for w in gpu_check.WHEELS}
        binary = {gpu_check._wheel_stem(w).lower() for w in gpu_check.BINARY_WHEELS}
        for whl in folder.glob("*.whl"):
            stem = "-".join(whl.name.split("-")[:2]).lower()
            assert stem in wanted, whl.name
            if stem in binary:
                assert "manylinux" in whl.name and whl.name.endswith("x86_64.whl"), whl.name
            else:
                assert whl.name.endswith("-py3-none-any.whl"), whl.name
        assert sum(f.stat().st_size for f in folder.glob("*.whl")) < 16e6  # small next to the 64 MiB tree


class _StoppedLoss:
    """bench_loss as the worker sees it, stopped (killed) while measuring its third case."""

    import bench_loss

    finish_rows = staticmethod(bench_loss.finish_rows)
    times = {"pure gemm floor": 0.5, "gemm floor": 0.6, "gemm": 1.0}

    @staticmethod
    def cases(quick):
        return [{"impl": impl, "B": 4096, "K": 4, "D": 512, "dtype": "bfloat16", "device": "cpu"}
                for impl in ("pure gemm floor", "gemm floor", "gemm", "triton")]

    @staticmethod
    def skip_reason(impl, device):
        return None

    @classmethod
    def run_case(cls, case):
        if case["impl"] == "triton":
            raise SystemExit(128 + 2)  # the stage's limit
        return {"name": "degla_loss", **{k: case[k] for k in ("impl", "B", "K", "D", "dtype")},
                "p50_ms": cls.times[case["impl"]], "peak_mem_bytes": 10**8}


def test_a_stopped_benchmark_keeps_its_rows_and_ratios(tmp_path, monkeypatch):
    run = gpu_check.Run(tmp_path, dry_run=False, total_s=60)
    try:
        (run.results / "bench_loss.json").write_text(json.dumps({"rows": [{"impl": "stale"}]}))  # an earlier run's
        (run.results / "bench_loss.env.json").write_text(json.dumps({"device": "NVIDIA H200", "date": "2026-12-01"}))

        def call(step, cmd, timeout):  # the worker, stopped at its third case
            with pytest.raises(SystemExit):
                gpu_check._loss_rows(_StoppedLoss, False, run.results, "bench_loss")
            return None, 130.0
        monkeypatch.setattr(run, "call", call)
        gpu_check.step_bench(run, "bench_loss")
        data = json.loads((run.results / "bench_loss.json").read_text())
        assert "partial" not in data and data["env"]["device"]
        rows = {r["impl"]: r for r in data["rows"]}
        assert list(rows) == ["pure gemm floor", "gemm floor", "gemm", "(rest of the benchmark)"]
        assert rows["gemm"]["x_floor"] == pytest.approx(2.0) and rows["gemm"]["x_gemm_floor"] == pytest.approx(1 / 0.6)
        assert "timed out" in rows["(rest of the benchmark)"]["skipped"]
        assert run.steps[-1]["status"] == "timed out" and run.steps[-1]["rows"] == 3
        # Nothing written by the worker (stopped before its first row): the env and the reason.
        monkeypatch.setattr(run, "call", lambda *a, **k: (None, 100.0))
        gpu_check.step_bench(run, "bench_loss")
        data = json.loads((run.results / "bench_loss.json").read_text())
        assert data["env"]["device"] == "NVIDIA H200"
        assert [r["impl"] for r in data["rows"]] == ["(rest of the benchmark)"]
    finally:
        run.log.close()
        shutil.rmtree(run.cache, ignore_errors=True)


def _loss_row(impl, batch, ms, peak=10**8, **extra):
    return {"impl": impl, "B": batch, "K": 4, "D": 512, "dtype": "bfloat16", "p50_ms": ms, "peak_mem_bytes": peak,
            **extra}


def test_the_targets_from_bench_loss_rows():
    import bench_loss

    rows = [_loss_row("pure gemm floor", 4096, 0.40), _loss_row("gemm floor", 4096, 0.55),
            _loss_row("gemm", 4096, 0.52, peak=390e6), _loss_row("triton", 4096, 0.48, peak=250e6),
            _loss_row("triton, recomputed", 4096, 0.70), _loss_row("torch", 4096, 2.0),
            _loss_row("pure gemm floor", 256, 0.01), _loss_row("gemm", 256, 0.05, grad_err_image=1e-3,
                                                                grad_err_text=2e-3, grad_err_scale=0.0),
            _loss_row("triton", 256, 0.04, grad_err_image=1e-3, grad_err_text=3e-3, grad_err_scale=0.0),
            _loss_row("reference", 256, 0.20), _loss_row("torch", 256, 0.03),
            _loss_row("gemm", 65536, 300.0, peak=39e9), _loss_row("triton", 65536, None, skipped="out of memory")]
    rows = bench_loss.finish_rows(rows)
    got = {t["target"].split(":")[0] + ":" + t["target"].split(":")[1][:12]: t
           for t in gpu_check.evaluate_targets(rows, gpu_check.TARGET_SHAPES["gpu"])}
    first, memory, small, large, errors = got.values()
    assert first["met"] is True and first["figure"].startswith("triton 0.48 ms = 1.20x pure floor (0.4 ms)")
    assert memory["met"] is True and memory["figure"] == "triton 250 MB"
    # B=256: triton is faster than the reference but not than torch.
    assert small["met"] is False and small["figure"].startswith("triton 0.04 ms: 5.00x reference")
    assert large["met"] is True and "gemm 39,000 MB" in large["figure"] and "triton out of memory" in large["figure"]
    assert errors["met"] is None and errors["figure"] == "gemm 0.002, triton 0.003"
    rows = bench_loss.finish_rows([{k: v for k, v in r.items() if not k.startswith("x_")} for r in rows
                                   if r["impl"] != "pure gemm floor"])  # no floor: no verdict, and it says why
    first = gpu_check.evaluate_targets(rows, gpu_check.TARGET_SHAPES["gpu"])[0]
    assert first["met"] is None and "pure floor not measured" in first["figure"]


def test_copy_out_fits_the_device_tools_eight_files(tmp_path):
    import tarfile

    run = gpu_check.Run(tmp_path / "out", dry_run=False, total_s=60, copy_to=tmp_path / "copy")
    try:
        (run.out / "RESULTS.md").write_text("# r")
        (run.out / "plots").mkdir()
        (run.out / "plots" / "step_breakdown.png").write_bytes(b"png")
        for name in ("bench_loss", "bench_ema", "bench_adamw_ema", "bench_step", "gpu_check", "auto_backends"):
            (run.results / f"{name}.json").write_text("{}")
        (run.results / "summary.md").write_text("s")
        (run.results / "test-gpu.xml").write_text("<testsuites/>")
        run.record("install", "passed", 1.0)  # every step's record copies what there is
    finally:
        run.log.close()
        shutil.rmtree(run.cache, ignore_errors=True)
    files = sorted(p.name for p in (tmp_path / "copy").iterdir())
    assert files == sorted(gpu_check.COPIED + ("gpu-check.tar.gz",)) and len(files) <= 8
    assert "--- install: passed" in (tmp_path / "copy" / "gpu_check.log").read_text()
    with tarfile.open(tmp_path / "copy" / "gpu-check.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"results/gpu-check/test-gpu.xml", "results/gpu-check/bench_ema.json", "plots/step_breakdown.png"} <= names


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
    for cmd in seen:
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd and "--only-binary=:all:" in cmd
    pure = [w for w in gpu_check.WHEELS if w not in gpu_check.BINARY_WHEELS]
    assert seen[0][-len(pure):] == pure and "any" in seen[0]
    compiled = [(c[c.index("--python-version") + 1], c[-1]) for c in seen[1:]]
    assert compiled == [(v, req) for req, versions in gpu_check.BINARY_WHEELS.items() for v in versions]
    assert all("manylinux_2_17_x86_64" in c and "cp" in c for c in seen[1:])


def _fake_wheels(folder: Path) -> None:
    import platform

    tag = gpu_check.wheel_tag()
    for req in gpu_check.WHEELS:
        stem = gpu_check._wheel_stem(req)
        name = (f"{stem}-{tag}-{tag}-manylinux_2_17_{platform.machine()}.whl" if req in gpu_check.BINARY_WHEELS
                else f"{stem}-py3-none-any.whl")
        (folder / name).write_bytes(b"")


def _install_only(monkeypatch, tmp_path, have: set[str], origin: str | None = None):
    """:func:`gpu_check.install_only` on a stand-in machine that has ``have``: the pip and import
    commands it would run are recorded, the project goes into ``tmp_path/site``."""
    calls = []
    monkeypatch.setattr(gpu_check, "_installed", lambda req: req.split("==")[0] in have)
    monkeypatch.setattr(gpu_check, "install_project", lambda root: gpu_check.CHECKOUT_PTH)
    kernels = str(gpu_check.ROOT / "kernels" / "configs.py") if origin is None else origin
    monkeypatch.setattr(subprocess, "run", lambda cmd, **k: calls.append(cmd) or subprocess.CompletedProcess(
        cmd, 0, stdout=kernels + "\n", stderr=""))
    return calls


def test_install_puts_in_the_missing_wheels_in_order(tmp_path, monkeypatch, capsys):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _fake_wheels(wheels)
    image = {"pytest", "pluggy", "iniconfig", "packaging", "pygments", "pytest-benchmark", "py-cpuinfo2",
             "pytest-timeout", "pytest-xdist", "execnet", "setuptools", "wheel", "tqdm", "regex"}
    calls = _install_only(monkeypatch, tmp_path, image)
    assert gpu_check.install_only(wheels) == 0
    pip, check = calls
    assert {"--no-index", "--no-deps", "install"} <= set(pip) and "-e" not in pip
    assert [Path(c).name.split("-")[0] for c in pip if c.endswith(".whl")] == ["wcwidth", "ftfy", "open_clip_torch"]
    assert check[1] == "-c" and "degla_fast.kernels" in check[2]
    out = capsys.readouterr().out
    assert "carried wheels installed: wcwidth==0.9.4 ftfy==6.3.1 open_clip_torch==3.3.0" in out
    assert out.rstrip().endswith(f"degla_fast.kernels imports from {gpu_check.ROOT / 'kernels'}")


def test_install_names_a_missing_wheel_in_one_line(tmp_path, monkeypatch, capsys):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _fake_wheels(wheels)
    for whl in [*wheels.glob("open_clip_torch-*"), *wheels.glob("regex-*")]:
        whl.unlink()
    have = {w.split("==")[0] for w in gpu_check.WHEELS} - {"open_clip_torch", "regex"}
    calls = _install_only(monkeypatch, tmp_path, have)
    assert gpu_check.install_only(wheels) == 1 and not calls
    (line,) = capsys.readouterr().out.splitlines()
    assert f"regex==2026.11.19 ({gpu_check.wheel_tag()} manylinux x86_64), open_clip_torch==3.3.0" in line
    assert "make gpu-wheels" in line


def test_install_fails_when_the_project_comes_from_elsewhere(tmp_path, monkeypatch, capsys):
    have = {w.split("==")[0] for w in gpu_check.WHEELS}
    _install_only(monkeypatch, tmp_path, have, origin="/elsewhere/degla_fast/kernels/configs.py")
    assert gpu_check.install_only(tmp_path) == 1
    assert "does not import from" in capsys.readouterr().out.splitlines()[-1]


def _install_step(tmp_path, monkeypatch, output: list[str], rc: int | None):
    """A GPU run's install step with a stand-in probe (a CUDA machine) and a stand-in
    ``--install-only`` process that prints ``output`` and exits ``rc``."""
    run = gpu_check.Run(tmp_path / "out", dry_run=False, total_s=60)
    monkeypatch.setattr(gpu_check, "_probe", lambda run, open_clip=False: {
        "torch": "2.11.0", "triton": "3.6.0", "cuda": "NVIDIA H200", "project": False,
        "open_clip": "3.3.0" if open_clip else None})
    monkeypatch.setattr(gpu_check, "_installed", lambda req: req.split("==")[0] != "open_clip_torch")
    calls = []

    def call(step, cmd, timeout):
        calls.append(cmd)
        run.last_output = list(output)
        return rc, 1.0
    monkeypatch.setattr(run, "call", call)
    return run, calls


def test_install_step_runs_install_only(tmp_path, monkeypatch):
    run, calls = _install_step(tmp_path, monkeypatch, ["install: degla_fast.kernels imports from x"], 0)
    try:
        assert gpu_check.step_install(run)
        (cmd,) = calls
        assert cmd[0] == sys.executable and cmd[2:4] == ["--install-only", "--wheels"]
        assert run.steps[-1]["status"] == "passed" and run.steps[-1]["open_clip"] == "3.3.0"
        assert run.steps[-1]["wheels_installed"] == "open_clip_torch==3.3.0"
    finally:
        run.log.close()
        shutil.rmtree(run.cache, ignore_errors=True)
    run, calls = _install_step(tmp_path / "b", monkeypatch, ["install: missing here: regex", "install: + pip install x",
                                                              "pip noise"], 1)
    try:
        assert not gpu_check.step_install(run)
        assert run.steps[-1]["status"] == "failed" and run.steps[-1]["detail"] == "missing here: regex"
    finally:
        run.log.close()
        shutil.rmtree(run.cache, ignore_errors=True)


_HOOKED_KERNELS = {
    # A stand-in for Hugging Face's `kernels` (transformers 5 requires it; GPU images have it): a
    # top-level package of that name whose distribution registers an egg_info writer in
    # kernels._internals, which broke a setuptools build run from this checkout.
    "kernels/__init__.py": "HF = True\n",
    "kernels/_internals/__init__.py": "",
    "kernels/_internals/locking.py": "def write_egg_lockfile(cmd, basename, filename):\n    pass\n",
    "kernels-0.19.1.dist-info/METADATA": "Metadata-Version: 2.1\nName: kernels\nVersion: 0.19.1\n",
    "kernels-0.19.1.dist-info/RECORD": "",
    "kernels-0.19.1.dist-info/entry_points.txt":
        "[egg_info.writers]\nkernels.lock = kernels._internals.locking:write_egg_lockfile\n",
}


def _fake_wheel(folder: Path, requirement: str) -> None:
    """A real (installable) stand-in wheel of ``requirement``: its module, ``FAKE = True``."""
    import platform
    import zipfile

    name, version = requirement.split("==")
    stem = gpu_check._wheel_stem(requirement)
    tag = gpu_check.wheel_tag()
    binary = requirement in gpu_check.BINARY_WHEELS
    wheel_tag = f"{tag}-{tag}-manylinux_2_17_{platform.machine()}" if binary else "py3-none-any"
    module = gpu_check.WHEEL_MODULES[name]
    info = f"{stem}.dist-info"
    files = {f"{module}/__init__.py": "FAKE = True\n",
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{info}/WHEEL": f"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: {'false' if binary else 'true'}\n"
                              f"Tag: {wheel_tag}\n"}
    files[f"{info}/RECORD"] = "".join(f"{f},,\n" for f in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(folder / f"{stem}-{wheel_tag}.whl", "w") as whl:
        for path, text in files.items():
            whl.writestr(path, text)


#: A pip older than 25.3 (the issue: 23.2.1, 24.0 and 25.2 fail the same way) with what makes it
#: fall back to ``setup.py develop``: setuptools >= 80 and wheel importable.
OLD_PIP = ("pip==24.0", "setuptools>=80", "wheel")


def _offline_env() -> dict:
    """No index reachable: the index an unreachable address, no config file, no other PIP_*
    settings (the GPU machine has none), no retries."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    return {**env, "PIP_CONFIG_FILE": os.devnull, "PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_RETRIES": "0",
            "PIP_DEFAULT_TIMEOUT": "5", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


@pytest.mark.timeout(240)
def test_install_only_offline_with_pip_24(tmp_path):
    """``gpu_check.py --install-only`` in a fresh venv with pip 24.0, setuptools >= 80 and wheel
    (nothing else: no torch) and a `kernels` package with an egg_info hook, with the index at an
    unreachable address: pip's own editable install asks that index (the failure is real here),
    ours installs the carried wheels (stand-ins) and the project, and degla_fast.kernels imports
    from this checkout without shadowing the image's `kernels`."""
    venv = tmp_path / "image"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    got = subprocess.run([python, "-m", "pip", "install", "-q", *OLD_PIP], capture_output=True, text=True)
    if got.returncode:
        pytest.skip(f"cannot download {' '.join(OLD_PIP)} into the test venv: {got.stderr.strip()[-300:]}")
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for req in gpu_check.WHEELS:
        _fake_wheel(wheels, req)
    env = _offline_env()
    # pip's editable install (setup.py develop -> a nested pip that asks the index) fails here.
    stub = tmp_path / "stub"  # setup.py and empty packages: the build writes into its checkout
    for name in ("degla_fast/__init__.py", "kernels/__init__.py", "configs/negatives/x.yaml"):
        (stub / name).parent.mkdir(parents=True, exist_ok=True)
        (stub / name).write_text("")
    shutil.copy(ROOT / "setup.py", stub / "setup.py")
    old = gpu_check.pip_install_command(python, wheels) + ["-e", str(stub)]
    done = subprocess.run(old, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert done.returncode != 0 and "127.0.0.1:9" in done.stdout + done.stderr, done.stderr[-3000:]
    for name, text in _HOOKED_KERNELS.items():  # with it, setup.py's egg_info would fail first
        (site / name).parent.mkdir(parents=True, exist_ok=True)
        (site / name).write_text(text)

    done = subprocess.run([python, str(ROOT / "benchmarks" / "gpu_check.py"), "--install-only",
                           "--wheels", str(wheels)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (line,) = [ln for ln in done.stdout.splitlines() if "carried wheels installed:" in ln]
    for req in gpu_check.WHEELS:  # every one but the build's own, which the venv has
        assert (req in line.split()) == (req.split("==")[0] not in ("setuptools", "wheel", "packaging")), req
    check = ("import importlib.util, degla_fast, degla_fast.kernels, kernels, open_clip, regex; "
             "print(degla_fast.kernels.__path__[0], importlib.util.find_spec('degla_fast.kernels.configs').origin, "
             "importlib.util.find_spec('degla_fast.negatives.prompts').submodule_search_locations[0], "
             "kernels.HF, open_clip.FAKE, regex.FAKE)")
    found = subprocess.run([python, "-c", check], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert found.returncode == 0, found.stderr[-2000:]
    assert found.stdout.split() == [str(ROOT / "kernels"), str(ROOT / "kernels" / "configs.py"),
                                    str(ROOT / "configs" / "negatives"), "True", "True", "True"]


def test_each_step_keeps_the_later_steps_minimum(tmp_path):
    assert sum(gpu_check.STEP_MIN_S.values()) <= gpu_check.TOTAL_S
    assert gpu_check.TOTAL_S + 15 <= 7 * 60  # the whole, install included (stopped steps end within it)
    assert list(gpu_check.STEP_LIMIT_S) == list(gpu_check.STEP_MIN_S) == list(gpu_check.STEPS)
    # bench_step's minimum always covers its eager B=256 table.
    import bench_step

    cases = gpu_check.STEP_MIN_S["bench_step"] - gpu_check.BENCH_STEP_MARGIN_S
    assert cases >= len(bench_step.EAGER) * bench_step.CASE_NEED_S["eager"]
    run = gpu_check.Run(tmp_path, dry_run=False, total_s=gpu_check.TOTAL_S)
    grace = sum(gpu_check.STOP_GRACE_S.values())
    try:
        assert run.limit("test-gpu") == gpu_check.STEP_LIMIT_S["test-gpu"]
        later = sum(gpu_check.STEP_MIN_S[s] for s in gpu_check.STEPS[gpu_check.STEPS.index("bench_loss") + 1:])
        run.deadline = gpu_check.time.monotonic() + 200  # test-gpu ran long: 200 s left
        # bench_loss, even if stopped (its limit, then the grace), ends before the later steps' share.
        assert run.limit("bench_loss") == pytest.approx(200 - later - grace, abs=1)
        assert run.limit("bench_loss") < gpu_check.STEP_LIMIT_S["bench_loss"]
        assert run.limit("bench_step") == pytest.approx(min(gpu_check.STEP_LIMIT_S["bench_step"], 200 - 15 - grace),
                                                        abs=1)
        run.deadline = gpu_check.time.monotonic() + 100  # what is left goes to bench_step and the report
        assert run.limit("bench_ema") == 0 and run.limit("report") == pytest.approx(20, abs=1)
    finally:
        run.log.close()
        shutil.rmtree(run.cache, ignore_errors=True)


def _fake_step_cases(monkeypatch, seconds):
    """bench_step on a stand-in GPU: each case takes ``seconds(variant, B)`` on a fake clock."""
    import bench_step

    now = [0.0]
    seen = []

    def fake(case, timeout):
        took = seconds(case["variant"], case["B"])
        seen.append((case["variant"], case["B"]))
        if took > timeout:
            now[0] += timeout
            return {"skipped": f"timed out after {timeout:.0f} s (the rest of the budget)"}
        now[0] += took
        return {"p20_ms": 1.0, "p50_ms": 2.0 if "released" in case["variant"] else 1.0, "p80_ms": 3.0,
                "peak_mem_bytes": case["B"] * 10**7}

    monkeypatch.setattr(bench_step, "_run_case_process", fake)
    monkeypatch.setattr(bench_step.torch.cuda, "is_available", lambda: True)
    return bench_step, seen, (lambda: now[0])


def test_bench_step_fits_its_cases_into_the_budget(monkeypatch):
    # Eager cases 20 s, compiled 200 s, 150 s in all.
    bench_step, seen, clock = _fake_step_cases(monkeypatch, lambda v, b: 200.0 if "compile" in v else 20.0)
    rows = bench_step.run(False, budget_s=150, clock=clock)
    assert seen == [("plain CLIP", 256), ("DeGLA as released", 256), ("DeGLA (ours)", 256), ("DeGLA (ours)", 1024),
                    ("DeGLA as released", 1024), ("plain CLIP", 1024)]
    by = {(r["impl"], r["B"]): r for r in rows}
    assert len(rows) == 8 and [r["B"] for r in rows] == sorted(r["B"] for r in rows)
    for key in seen:
        assert not by[key].get("skipped") and by[key]["case_s"] == 20.0, key
    # 70 s left after the first four: neither compiled case (about 90 s each) is started, the other
    # two B=1024 cases (30 s each: a peak-memory case's floor, above 1.25 x ours at B=1024) are.
    assert by[("DeGLA (ours, torch.compile)", 256)]["skipped"].startswith("not run: 70 s of the 150 s budget left")
    assert "compiled case needs about 90 s" in by[("plain CLIP (torch.compile)", 256)]["skipped"]
    assert by[("DeGLA (ours)", 256)]["speedup_vs_DeGLA as released"] == 2.0
    assert by[("DeGLA (ours)", 1024)]["speedup_vs_DeGLA as released"] == 2.0  # ratios within each B
    assert {r["stage"] for r in rows} == {"eager", "peak memory", "compiled"}


def test_bench_step_stops_a_case_at_the_end_of_its_budget(monkeypatch):
    bench_step, seen, clock = _fake_step_cases(monkeypatch, lambda v, b: 500.0 if "compile" in v else 20.0)
    rows = bench_step.run(False, budget_s=200, clock=clock)
    by = {(r["impl"], r["B"]): r for r in rows}
    # 120 s left after the first four: ours compiled starts, is stopped at the budget's end, and
    # nothing after it is started.
    assert by[("DeGLA (ours, torch.compile)", 256)]["skipped"].startswith("timed out after 120 s")
    assert seen[-1] == ("DeGLA (ours, torch.compile)", 256) and clock() == 200
    for key in [("plain CLIP (torch.compile)", 256), ("DeGLA as released", 1024), ("plain CLIP", 1024)]:
        assert by[key]["skipped"].startswith("not run: 0 s of the 200 s budget left"), key
    assert all(not by[k].get("skipped") for k in by if k[0] in bench_step.EAGER and k[1] == 256)


def test_report_writes_the_auto_table_from_bench_loss(tmp_path):
    """A GPU run's bench_loss.json -> the loss's auto table; the dry run's bench_loss_quick.json ->
    its table beside it only (the package's own is left alone); a GPU run's JSON without a
    compute capability writes none."""
    rows = [{"impl": impl, "B": 256, "K": 4, "D": 512, "dtype": "bfloat16", "p50_ms": ms}
            for impl, ms in (("gemm", 0.2), ("triton", 0.5), ("triton, recomputed", 0.1), ("torch", 0.9),
                             ("gemm floor", 0.1))]
    env = {"device": "NVIDIA H200", "date": "2026-12-04", "capability": "9.0"}
    (tmp_path / "bench_loss_quick.json").write_text(json.dumps({"benchmark": "bench_loss", "env": env, "rows": rows}))
    before = gpu_check.AUTO_TABLE.read_bytes() if gpu_check.AUTO_TABLE.exists() else None
    path = gpu_check.write_auto_table(tmp_path, dry_run=True)
    assert path == tmp_path / "auto_backends.json"
    table = json.loads(path.read_text())
    assert table["device"] == "NVIDIA H200" and [(e["B"], e["backend"]) for e in table["entries"]] == [(256, "gemm")]
    assert (gpu_check.AUTO_TABLE.read_bytes() if gpu_check.AUTO_TABLE.exists() else None) == before
    (tmp_path / "bench_loss.json").write_text(json.dumps({"benchmark": "bench_loss", "env": {"capability": None},
                                                          "rows": rows}))
    (tmp_path / "auto_backends.json").unlink()
    assert gpu_check.write_auto_table(tmp_path, dry_run=False) is None
    assert not (tmp_path / "auto_backends.json").exists()
    assert (gpu_check.AUTO_TABLE.read_bytes() if gpu_check.AUTO_TABLE.exists() else None) == before
