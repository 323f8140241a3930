"""Host syncs of the training loop: at the default settings the host reads the device once per
``log_every`` steps (losses, skipped-step counters and stop flags in one ``tolist``) and not at
all in the steps between, for a plain run and for DeepSpeed ZeRO-2 and ZeRO-3 on two processes.
Every read is recorded by tests/sync_count_worker.py (``Tensor.item``, ``__bool__``,
``__float__``, ``__int__``, ``tolist``, ``cpu``, ``numpy``, ``torch.cuda.synchronize``, ...)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

STEPS, LOG_EVERY = 6, 3
#: What the host reads after each step: one tolist() at each log step, nothing in between.
EXPECTED = {i: (["tolist"] if i % LOG_EVERY == 0 else []) for i in range(1, STEPS + 1)}


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    from degla_fast.data.synthetic import generate

    return generate(tmp_path_factory.mktemp("synth"), num_images=32, seed=1, eval_items=2, zeroshot_items=1,
                    progress=False)


def train_args(synth: Path, output: Path, *extra: str) -> list[str]:
    """A DeGLA run at the trainer's defaults for everything that decides syncs (fused AdamW,
    EMA teacher, no phase profiling, checkpoint at the end only), log_every 3."""
    return ["--data", str(synth), "--output", str(output), "--model", "degla-tiny", "--pretrained", "none",
            "--batch-size", "4", "--num-negatives", "4", "--precision", "fp32", "--device", "cpu",
            "--num-workers", "0", "--lr", "1e-3", "--seed", "5", "--no-progress", "--max-steps", str(STEPS),
            "--log-every", str(LOG_EVERY), "--save-every", "0", "--set", "optim.warmup_steps=1",
            "--set", "data.pipeline=torch", *extra]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])  # bf16: features and teacher copy in bf16
def test_plain_run_reads_the_device_once_per_log_interval(synth, tmp_path, precision):
    import sync_count_worker

    steps = sync_count_worker.run(train_args(synth, tmp_path / "plain", "--precision", precision))
    assert steps == EXPECTED


@pytest.mark.parametrize("backend", ["reference", "gemm", "triton"])  # auto is torch on the CPU (above)
def test_every_loss_backend_reads_nothing_between_log_steps(synth, tmp_path, backend):
    # Backward passes included: the worker also counts ATen's _local_scalar_dense.
    import sync_count_worker

    steps = sync_count_worker.run(train_args(synth, tmp_path / backend, "--set", f"loss.backend={backend}"))
    assert steps == EXPECTED


def test_a_skipped_step_needs_no_extra_read(synth, tmp_path, monkeypatch):
    # A NaN loss at step 2 is skipped on the device; the host learns it at step 3's read.
    import sync_count_worker
    from degla_fast.loss import DeGLALoss
    from degla_fast.train import builder

    real_from_spec, calls = DeGLALoss.from_spec, {"n": 0}

    def flaky_from_spec(spec, **kwargs):
        loss_fn = real_from_spec(spec, **kwargs)

        def loss(*args):
            out = loss_fn(*args)
            calls["n"] += 1
            if calls["n"] == 2:
                out.total = out.total * float("nan")
            return out

        return loss

    monkeypatch.setattr(builder.DeGLALoss, "from_spec", flaky_from_spec)
    steps = sync_count_worker.run(train_args(synth, tmp_path / "nan"))
    # 7 batches for 6 applied steps: reads at batches 3 (finds the skip: step 2), 4 (step 3), 7 (step 6)
    assert steps == {1: [], 2: [], 3: ["tolist"], 4: ["tolist"], 5: [], 6: [], 7: ["tolist"]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: A NaN loss at the 2nd batch: skipped, found at the 3rd batch's read; 7 batches for 6 steps.
EXPECTED_WITH_SKIP = {1: [], 2: [], 3: ["tolist"], 4: ["tolist"], 5: [], 6: [], 7: ["tolist"]}


@pytest.mark.parametrize("stage, nan", [(2, False), (3, False), (2, True)],
                         ids=["zero2", "zero3", "zero2-skipped-step"])
def test_deepspeed_run_reads_the_device_once_per_log_interval(synth, tmp_path, stage, nan):
    pytest.importorskip("deepspeed")
    env = dict(os.environ, HF_HUB_OFFLINE="1", DS_BUILD_OPS="0", OMP_NUM_THREADS="1",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               SYNC_COUNT_NAN_AT="2" if nan else "0")
    out = tmp_path / "reads.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), str(REPO / "tests" / "sync_count_worker.py"), str(out),
           *train_args(synth, tmp_path / "run", "--deepspeed", str(REPO / "configs" / f"ds_zero{stage}.json"))]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for rank in (0, 1):
        steps = {int(k): v for k, v in json.loads(out.with_suffix(f".rank{rank}.json").read_text()).items()}
        ours = {i: [r for r in reads if not r.startswith("deepspeed:")] for i, reads in steps.items()}
        assert ours == (EXPECTED_WITH_SKIP if nan else EXPECTED), rank
        theirs = {i: [r for r in reads if r.startswith("deepspeed:")] for i, reads in steps.items()}
        if stage == 2:  # compute_grad_norm false (no clipping): ZeRO-2's step reads nothing back
            assert all(not reads for reads in theirs.values()), theirs
        else:
            # ZeRO-3 checks its gradient norm on the host in every step (stage3.py, is_invalid_grad_norm;
            # no setting turns it off), and records its parameter fetch order in the first two steps.
            assert all(reads == ["deepspeed:__bool__"] for i, reads in theirs.items() if i > 2), theirs
    from degla_fast.train.metrics import read_metrics

    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    # With the skip: the read after batch 3 finds it (step 2, logged), then steps 3 and 6.
    assert [r["step"] for r in rows] == ([2, 3, 6] if nan else [3, 6])
    if nan:  # skipped on both ranks: the engine state is that of 6 applied steps
        state = torch.load(tmp_path / "run" / "checkpoints" / "step_00000006.pt", map_location="cpu",
                           weights_only=True)
        # 7 batches consumed: 32 images / (4 x 2 processes) = 4 per epoch
        assert state["step"] == 6 and (state["epoch"], state["batch"]) == (1, 3)
        assert state["scheduler"]["last_epoch"] == 6
        assert all(torch.isfinite(v).all() for v in state["student"].values() if v.is_floating_point())
