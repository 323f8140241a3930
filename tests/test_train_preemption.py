"""A run on a cluster (issue 23). Preemption the way schedulers send it: SIGTERM (or SIGINT) to
the whole process group, data workers included, at any moment, saves and stops; ``--resume
latest`` then continues as if nothing happened; with the torch DataLoader's workers, DALI's reader
processes, and two ranks under torchrun. And one writer per run folder.

Each run is a subprocess in a session of its own (as a scheduler starts a job), paused by
tests/stop_probe.py at a named moment (start-up, inside a step, inside a checkpoint write) where
the test signals its process group; every wait has a time limit, so a hang fails the test.
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from degla_fast.stop_signals import REPEAT_WINDOW, StopNow, StopRequest, held, leave_to_parent
from degla_fast.train.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
LOSS_KEYS = ("step", "epoch", "loss", "clip", "igc", "tgc", "distill", "lr", "logit_scale")
STEPS = 10  # 8 batches per epoch: the run crosses an epoch (new DataLoader workers)
LIMIT = 240  # seconds for any one run on a loaded 2-core machine (a run takes about 20 s)


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    from degla_fast.data.synthetic import generate

    return generate(tmp_path_factory.mktemp("synth"), num_images=32, seed=2, eval_items=2, zeroshot_items=1,
                    progress=False)


def train_args(data: Path, out: Path, *extra: str, workers: int = 2) -> list[str]:
    """4 images x (1 + 4) captions per step, ``workers`` data-loading processes, a metrics row
    every step, a checkpoint every 2."""
    return ["train", "--data", str(data), "--output", str(out), "--model", "degla-tiny", "--pretrained", "none",
            "--batch-size", "4", "--num-negatives", "4", "--precision", "fp32", "--device", "cpu",
            "--num-workers", str(workers), "--lr", "1e-3", "--seed", "7", "--no-progress",
            "--max-steps", str(STEPS), "--save-every", "2", "--log-every", "1",
            "--set", "optim.warmup_steps=1", "--set", "data.pipeline=torch", *extra]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Job:
    """``degla-fast ARGS`` (through tests/stop_probe.py, paused at ``at``; under torchrun with
    ``ranks``) in a session of its own: :meth:`signal` reaches it and all its processes."""

    def __init__(self, args: list[str], logs: Path, at: str | None = None, ranks: int = 0, pause: float = 3.0):
        self.markers = logs / "markers"
        self.markers.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", STOP_PROBE_DIR=str(self.markers),
                   STOP_PROBE_AT=at or "", STOP_PROBE_PAUSE=str(pause),
                   PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        cmd = [sys.executable, str(REPO / "tests" / "stop_probe.py"), *args]
        if ranks:
            cmd[1:1] = ["-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port",
                        str(_free_port())]
        self.stdout, self.stderr = logs / "stdout.txt", logs / "stderr.txt"
        with open(self.stdout, "w") as out, open(self.stderr, "w") as err:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=err, start_new_session=True)

    def err(self) -> str:
        return self.stderr.read_text(errors="replace")

    def wait_for(self, marker: str, timeout: float = LIMIT) -> int:
        """Wait until the probe has written ``marker`` (it is paused there); returns the pid in it."""
        path = self.markers / marker
        deadline = time.monotonic() + timeout
        while not path.is_file() or not path.read_text():
            if self.proc.poll() is not None:
                pytest.fail(f"the run ended (status {self.proc.returncode}) before {marker}:\n{self.err()[-3000:]}")
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"the run did not reach {marker} in {timeout} s")
            time.sleep(0.1)
        return int(path.read_text())

    def signal(self, *signums: int, gap: float = 0.05) -> None:
        """Each signal to the whole process group, as ``kill -SIG -- -PGID`` does, ``gap`` s apart."""
        for i, signum in enumerate(signums):
            if i:
                time.sleep(gap)
            os.killpg(self.proc.pid, signum)

    def finish(self, timeout: float = LIMIT) -> int:
        """The exit status; a run still going after ``timeout`` s is a hang: killed, and the test fails."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"the run did not end within {timeout} s of the signal (a hang):\n{self.err()[-3000:]}")

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(30)

    def assert_group_gone(self, *groups: int, timeout: float = 30) -> None:
        """Every process of the job (the data workers too) has ended; ``groups``: more process
        groups to check (torchrun starts each rank in a session of its own)."""
        deadline = time.monotonic() + timeout
        for group in (self.proc.pid, *groups):
            while True:
                try:
                    os.killpg(group, 0)
                except ProcessLookupError:
                    break
                if time.monotonic() > deadline:
                    self.kill()
                    pytest.fail(f"processes of the stopped run were left behind (process group {group})")
                time.sleep(0.2)


def run_job(args, logs: Path, **kwargs) -> Job:
    job = Job(args, logs, **kwargs)
    assert job.finish() == 0, job.err()[-3000:]
    return job


def stop_at(args, logs: Path, at: str, *signums: int, ranks: int = 0, expect: int = 0) -> Job:
    """A run signalled (``signums``, to its process group) when it reaches ``at``: it must end
    with status ``expect``, without a traceback, leaving no process behind."""
    job = Job(args, logs, at=at, ranks=ranks)
    job.wait_for(f"{at.replace(':', '-')}.rank0")
    job.signal(*signums)
    status = job.finish()
    err = job.err()
    if not ranks:  # torchrun prints its own traceback for the signal it got (its SignalException)
        assert status == expect, err[-3000:]
        assert "Traceback" not in err, err[-3000:]
    assert "killed by signal" not in err and "DataLoader worker" not in err, err[-3000:]
    job.assert_group_gone()
    return job


def rows(out: Path) -> list[dict]:
    return [{k: r[k] for k in LOSS_KEYS} for r in read_metrics(out / "metrics.jsonl")]


def saved_step(out: Path) -> int:
    folder = out / "checkpoints"
    state = torch.load(folder / (folder / "latest").read_text().strip(), map_location="cpu", weights_only=True)
    return int(state["step"])


# ---------------------------------------------------------------- the torch DataLoader, 2 workers


def test_group_signals_at_start_up_mid_step_and_mid_save_stop_and_resume_exactly(synth, tmp_path):
    straight = tmp_path / "straight"
    run_job(train_args(synth, straight), tmp_path / "logs-straight")
    reference = rows(straight)
    assert [r["step"] for r in reference] == list(range(1, STEPS + 1))

    out = tmp_path / "run"
    resume = ("--resume", "latest")
    # SIGINT before the trainer's modules are even imported (a Ctrl-C while it starts): no step.
    job = stop_at(train_args(synth, out, *resume), tmp_path / "logs-1", "imports", signal.SIGINT)
    assert "stop signal received during start-up: no step trained" in job.err()
    assert rows(out) == [] and not (out / "checkpoints" / "latest").exists()
    # SIGTERM while the model and data are built: still no step, and the folder takes a resume.
    job = stop_at(train_args(synth, out, *resume), tmp_path / "logs-2", "build", signal.SIGTERM)
    assert "stop signal received during start-up" in job.err()
    # Inside step 3, workers busy: the step finishes and is saved.
    job = stop_at(train_args(synth, out, *resume), tmp_path / "logs-3", "step:3", signal.SIGTERM)
    assert "stop signal received: saved step 3" in job.err() and saved_step(out) == 3
    # Inside the write of step 6's checkpoint, two signals 50 ms apart (SIGTERM, then SIGINT):
    # one stop request; the write completes, and that step is where the run stops.
    job = stop_at(train_args(synth, out, *resume), tmp_path / "logs-4", "save:6", signal.SIGTERM, signal.SIGINT)
    assert "stop signal received: saved step 6" in job.err() and saved_step(out) == 6
    run_job(train_args(synth, out, *resume), tmp_path / "logs-5")
    assert rows(out) == reference  # the same rows, value for value, as the run without stops


def test_a_signal_repeated_after_the_window_stops_at_once_in_one_line(synth, tmp_path):
    out = tmp_path / "run"
    job = Job(train_args(synth, out), tmp_path / "logs", at="step:3", pause=120)
    job.wait_for("step-3.rank0")
    job.signal(signal.SIGTERM)
    time.sleep(REPEAT_WINDOW + 1.0)
    job.signal(signal.SIGINT)
    status = job.finish(timeout=60)
    err = job.err()
    assert status == 128 + signal.SIGINT, err[-3000:]
    assert "Traceback" not in err and "DataLoader worker" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == f"degla-fast: {StopNow(signal.SIGINT)}", err[-3000:]
    job.assert_group_gone()
    assert saved_step(out) == 2  # no stop checkpoint: the periodic one before the signals is the last


# ---------------------------------------------------------------- DALI's reader processes


def test_dali_readers_killed_while_starting_no_longer_hang_the_run(synth, tmp_path):
    # DALI's CPU pipeline (device_id None). A reader process that died of the group's signal while
    # starting left the trainer waiting for it forever; now it ignores that signal.
    # (Its resume is exact as the torch pipeline's: tests/data/test_dali_epochs.py.)
    pytest.importorskip("nvidia.dali")
    dali = ("--set", "data.pipeline=dali", "--max-steps", "4", "--num-workers", "1")
    out = tmp_path / "run"
    job = stop_at(train_args(synth, out, *dali), tmp_path / "logs-1", "worker-start", signal.SIGTERM)
    assert "stop signal received: saved step 1" in job.err() and saved_step(out) == 1
    run_job(train_args(synth, out, *dali, "--resume", "latest"), tmp_path / "logs-2")
    assert [r["step"] for r in rows(out)] == [1, 2, 3, 4]


# ---------------------------------------------------------------- torchrun, 2 gloo ranks


def test_torchrun_forwarded_sigterm_stops_every_rank_at_one_step_and_resumes_exactly(synth, tmp_path):
    # torchrun signals each rank's own process group (rank and data workers). The ranks agree on
    # the stop step at a log step (every 2 here): signalled inside step 3, they stop after step 4.
    two = ("--log-every", "2", "--max-steps", "6", "--num-workers", "1")
    straight = tmp_path / "straight"
    run_job(train_args(synth, straight, *two), tmp_path / "logs-straight", ranks=2)
    out = tmp_path / "run"
    job = Job(train_args(synth, out, *two), tmp_path / "logs-1", at="step:3", ranks=2)
    rank0, rank1 = job.wait_for("step-3.rank0"), job.wait_for("step-3.rank1")
    assert (out / ".lock").read_text().startswith(f"pid {rank0} on ")  # rank 0 holds the run's lock
    job.signal(signal.SIGTERM)  # to torchrun, which forwards it to each rank's group
    job.finish()
    err = job.err()
    assert "stop signal received: saved step 4" in err, err[-3000:]
    assert "killed by signal" not in err and "stopped at once" not in err, err[-3000:]
    job.assert_group_gone(rank0, rank1)  # each rank's group: the rank and its data worker
    folder = out / "checkpoints"
    state = torch.load(folder / "step_00000004.pt", map_location="cpu", weights_only=True)
    assert (folder / "latest").read_text().strip() == "step_00000004.pt"
    assert state["world_size"] == 2 and len(state["rng"]) == 2  # both ranks' state: a complete checkpoint
    assert (out / ".lock").read_text() == ""  # released
    run_job(train_args(synth, out, *two, "--resume", "latest"), tmp_path / "logs-2", ranks=2)
    assert rows(out) == rows(straight) and [r["step"] for r in rows(out)] == [2, 4, 6]


# ---------------------------------------------------------------- one writer per run folder


def test_a_second_writer_is_refused_naming_the_holder_and_a_killed_holder_leaves_no_lock(synth, tmp_path):
    out = tmp_path / "run"
    args = train_args(synth, out, "--resume", "latest", workers=0)
    first = Job(args, tmp_path / "logs-1", at="step:3", pause=600)
    holder = first.wait_for("step-3.rank0")  # steps 1-2 logged and saved, step 3 under way
    second = Job(args, tmp_path / "logs-2")
    assert second.finish() == 2, second.err()[-3000:]
    lines = second.err().strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in second.err(), second.err()[-3000:]
    assert lines[0] == (f"degla-fast: error: output: {out} is in use by another run (pid {holder} on "
                        f"{socket.gethostname()}, holding {out / '.lock'}); wait for it to end or stop it, or choose "
                        "another --output")
    assert [r["step"] for r in rows(out)] == [1, 2]  # the second one wrote nothing
    first.kill()  # SIGKILL: no clean-up; the file still names it, but the kernel took its lock
    assert (out / ".lock").read_text().startswith(f"pid {holder} on ")
    run_job(args, tmp_path / "logs-3")
    assert [r["step"] for r in rows(out)] == list(range(1, STEPS + 1))
    assert (out / ".lock").read_text() == ""  # released at the end


def test_the_run_lock_is_exclusive_names_its_holder_and_goes_with_release(tmp_path):
    from degla_fast.errors import DataError
    from degla_fast.train.run_lock import RunLock, holder_error

    folder = tmp_path / "new" / "run"
    assert holder_error(folder) is None
    lock = RunLock.acquire(folder)  # creates the folder
    me = f"pid {os.getpid()} on {socket.gethostname()}"
    assert (folder / ".lock").read_text() == me + "\n"
    # flock is per open file: a second acquisition in this process is refused as another's would be
    with pytest.raises(DataError, match=f"in use by another run \\({me}, holding "):
        RunLock.acquire(folder)
    assert f"({me}, holding" in holder_error(folder)
    lock.release()
    assert (folder / ".lock").read_text() == "" and holder_error(folder) is None
    RunLock.acquire(folder).release()


# ---------------------------------------------------------------- the pieces


def test_a_repeat_within_the_window_is_the_same_request_and_a_later_one_stops_at_once():
    now = [100.0]
    stop = StopRequest(clock=lambda: now[0])
    assert not stop.requested
    stop._handle(signal.SIGTERM, None)
    now[0] += REPEAT_WINDOW - 0.1
    stop._handle(signal.SIGINT, None)  # a group signal and a launcher's forward: one request
    assert stop.requested and stop.name == "SIGTERM"
    now[0] += 0.2
    with pytest.raises(StopNow) as insisted:
        stop._handle(signal.SIGINT, None)
    assert insisted.value.status == 130 and "repeated SIGINT" in str(insisted.value)


def test_install_and_restore_leave_the_previous_handlers():
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    stop = StopRequest()
    assert stop.install() and not stop.install()  # the second call changes nothing
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.requested
    stop.restore()
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before and not stop.requested


def _worker(ready):
    time.sleep(1.0)  # a worker's start-up: the test's signals arrive now, held until it is ready
    leave_to_parent()
    ready.set()
    time.sleep(120)


def _send(pid: int, signum: int) -> None:
    """``signum`` to ``pid`` from another process, as a scheduler sends it."""
    subprocess.run([sys.executable, "-c", f"import os; os.kill({pid}, {int(signum)})"], check=True, timeout=60)


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_a_worker_outlives_a_group_signal_and_ends_when_its_parent_ends_it(method):
    ctx = multiprocessing.get_context(method)
    ready = ctx.Event()
    with held():
        child = ctx.Process(target=_worker, args=(ready,), daemon=True)
        child.start()
    try:
        _send(child.pid, signal.SIGTERM)
        _send(child.pid, signal.SIGINT)
        assert ready.wait(60), "the worker did not start"
        _send(child.pid, signal.SIGTERM)
        time.sleep(0.5)
        assert child.is_alive() and child.exitcode is None
        child.terminate()  # the parent's SIGTERM
        child.join(30)
        assert child.exitcode == 0
    finally:
        if child.is_alive():
            child.kill()
