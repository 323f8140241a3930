"""CI quick mode of ``benchmarks/``: every ``bench_*.py`` runs with ``quick=True`` and writes its
JSON, ``report.py`` turns them into RESULTS.md and PNG plots, and ``--profile`` writes a Chrome
trace with the named ranges. Nothing here looks at a speed."""
import ast
import importlib
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"  # on sys.path through pytest.ini
MODULES = sorted(p.stem for p in BENCH.glob("bench_*.py"))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from common import write_results

    out = tmp_path_factory.mktemp("results")
    for name in MODULES:
        rows = importlib.import_module(name).run(True)
        write_results(f"{name}_quick", rows, out)
    return out


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", MODULES)
def test_every_benchmark_writes_rows(results, name):
    data = json.loads((results / f"{name}_quick.json").read_text())
    assert data["benchmark"] == f"{name}_quick"
    assert {"device", "torch", "triton", "cuda", "date"} <= data["env"].keys()
    assert data["rows"], name
    measured = [r for r in data["rows"] if not r.get("skipped")]
    assert measured, f"{name}: every case was skipped"
    for row in data["rows"]:
        assert row.get("impl"), row
        assert row.get("skipped") or row["p20_ms"] <= row["p50_ms"] <= row["p80_ms"], row


def test_loss_and_step_rows_compare_with_their_baselines(results):
    loss = json.loads((results / "bench_loss_quick.json").read_text())["rows"]
    impls = {r["impl"] for r in loss}
    assert {"reference", "torch", "triton", "triton, recomputed", "gemm floor", "pure gemm floor",
            "torch.compile(reference)"} <= impls
    for row in loss:
        if row["impl"] == "reference" and not row.get("skipped"):
            assert row["speedup_vs_reference"] == pytest.approx(1.0)
            assert row["peak_mem_bytes"] is not None and row["achieved_tflops"] > 0
            assert row["flops"] == 6 * row["B"] ** 2 * (1 + row["K"]) * row["D"]
    # Baselines that cannot run on the CPU are recorded with their reason, not dropped.
    assert all(r["skipped"] for r in loss if r["impl"] in ("triton", "inf-cl (global term)"))
    step = json.loads((results / "bench_step_quick.json").read_text())["rows"]
    by_impl = {r["impl"]: r for r in step}
    for impl in ("plain CLIP", "DeGLA as released", "DeGLA (ours)"):
        row = by_impl[impl]
        phases = ["data_ms", "forward_ms", "teacher_forward_ms", "loss_ms", "backward_ms", "optimizer_ms", "ema_ms"]
        assert all(row[p] >= 0 for p in phases), row
    assert by_impl["DeGLA as released"]["text_tokens"] == 77
    assert by_impl["DeGLA (ours)"]["text_tokens"] < 77  # trimmed captions


@pytest.mark.timeout(300)
def test_step_on_synthetic_data_compares_with_the_data_as_before(tmp_path, monkeypatch):
    import bench_step
    from degla_fast.data.synthetic import generate

    generate(tmp_path / "world", num_images=64, pretrain_images=1, eval_items=1, zeroshot_items=1, progress=False)
    full = bench_step.data_config
    # One epoch of warm-up (two batches of 32), one timed step: each case's process runs this config.
    monkeypatch.setattr(bench_step, "data_config", lambda folder: {**full(folder), "warmup": 2, "iters": 1})
    rows = bench_step.run(True, data=str(tmp_path / "world"))
    assert [r["impl"] for r in rows] == list(bench_step.DATA_VARIANTS)
    for row in rows:
        assert not row.get("skipped"), row
        assert row["model"] == "degla-synth" and row["B"] == 32 and row["data_ms"] > 0 and row["text_tokens"] < 77
        assert row[f"speedup_vs_{bench_step.DATA_BASELINE}"] > 0
    assert rows[0][f"speedup_vs_{bench_step.DATA_BASELINE}"] == pytest.approx(1.0)
    # the cases before the compact vocabulary train CLIP's 49,408-row token embedding, the last two 128 rows
    assert [r["params"] - rows[-1]["params"] for r in rows] == [(49408 - 128) * 96] * (len(rows) - 2) + [0, 0]
    assert rows[-1]["impl"] == "DeGLA (ours), data, tower threads"


def test_report_writes_results_md_and_plots(results, tmp_path):
    import report

    assert report.main([str(results), "--out", str(tmp_path)]) == 0
    text = (tmp_path / "RESULTS.md").read_text()
    assert "not representative of GPU kernel performance" in text
    for name in MODULES:
        assert f"## {name}_quick" in text
    pngs = sorted((tmp_path / "plots").rglob("*.png"))
    names = {p.name for p in pngs}
    assert {"loss_time.png", "loss_memory.png", "step_breakdown.png"} <= names
    if "bench_ema" in MODULES:
        assert "ema_bandwidth.png" in names
    for p in pngs:
        assert p.read_bytes()[:8] == PNG_MAGIC
        assert f"]({p.relative_to(tmp_path)})" in text


def test_report_known_peaks():
    from common import device_peaks, roofline

    assert device_peaks("NVIDIA H100 80GB HBM3")["peak_flops"] == 989e12
    assert device_peaks("NVIDIA H100 PCIe")["peak_flops"] == 756e12
    assert device_peaks("NVIDIA A100-SXM4-80GB")["peak_bytes_per_s"] == 2.04e12
    assert device_peaks("CPU: AMD EPYC") is None
    row = roofline({"p50_ms": 2.0}, flops=989e12 * 1e-3, device="NVIDIA H100 80GB HBM3")
    assert row["pct_of_peak_flops"] == pytest.approx(50.0)
    assert roofline({"p50_ms": 2.0}, bytes_moved=1e9, device="CPU")["peak"] == "unknown"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("module,args,ranges", [
    ("bench_loss", ["--batch", "32", "--backend", "torch"], {"loss", "backward"}),
    ("bench_step", ["--quick"], {"data", "forward", "teacher_forward", "loss", "backward", "optimizer", "ema"}),
])
def test_profile_writes_chrome_trace(tmp_path, module, args, ranges):
    trace = tmp_path / "trace.json"
    assert importlib.import_module(module).main(["--profile", str(trace), *args]) == 0
    events = json.loads(trace.read_text())["traceEvents"]
    assert ranges <= {e.get("name") for e in events}


def _edits_sys_path(node: ast.AST) -> bool:
    """``sys.path.insert(...)`` and the like, or an assignment to ``sys.path`` (or a slice of it)."""
    def is_sys_path(n):
        return isinstance(n, ast.Attribute) and n.attr == "path" and isinstance(n.value, ast.Name) and n.value.id == "sys"

    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        return is_sys_path(node.func.value)
    if isinstance(node, (ast.Assign, ast.AugAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return any(is_sys_path(t.value if isinstance(t, ast.Subscript) else t) for t in targets)
    return False


def test_benchmarks_import_nothing_from_tests_and_nothing_edits_sys_path():
    """A benchmark imports from its own folder (or the package), never from tests/; neither folder
    edits sys.path: pytest.ini's ``pythonpath`` is the one place benchmarks/ is put on the tests'."""
    tests = Path(__file__).resolve().parent
    test_modules = {p.stem for p in tests.glob("*.py")}
    found = []
    for path in sorted([*BENCH.glob("*.py"), *tests.glob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if _edits_sys_path(node):
                found.append(f"{path.parent.name}/{path.name}:{node.lineno} edits sys.path")
            if path.parent == BENCH and isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                found += [f"benchmarks/{path.name}:{node.lineno} imports {n} from tests/"
                          for n in names if n.split(".")[0] in test_modules | {"tests"}]
    assert not found, "\n".join(found)
