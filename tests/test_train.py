"""The trainer on the CPU: an end-to-end run, exact resume, preemption, non-finite losses,
export, and the one-line user errors."""
from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from degla_fast.errors import ConfigError
from degla_fast.train import builder
from degla_fast.train import main as train_main
from degla_fast.train.config import load_config
from degla_fast.train.metrics import read_metrics
from degla_fast.train.optim import cosine_with_warmup, param_groups

REPO = Path(__file__).resolve().parents[1]
REQUIRED = ("step", "epoch", "loss", "clip", "igc", "tgc", "distill", "lr", "logit_scale", "samples_per_s",
            "time_data", "time_forward", "time_backward", "time_ema")
LOSS_KEYS = ("loss", "clip", "igc", "tgc", "distill", "lr", "logit_scale")
#: What every plain log line starts with: the local time with its UTC offset (ISO 8601).
STAMP = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d) (.*)")


def unstamped(line: str) -> str:
    """``line`` without its timestamp, which must be there and be the local time now (to the minute)."""
    from datetime import datetime

    match = STAMP.fullmatch(line)
    assert match, f"no timestamp: {line!r}"
    stamp = datetime.fromisoformat(match[1])
    assert abs((datetime.now().astimezone() - stamp).total_seconds()) < 600, line
    return match[2]


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    from degla_fast.data.synthetic import generate

    return generate(tmp_path_factory.mktemp("synth"), num_images=48, seed=0, eval_items=2, zeroshot_items=1,
                    progress=False)


def base_args(data: Path, output: Path, *extra: str) -> list[str]:
    """A tiny DeGLA run: 8 images x (1 + 4) captions per step, random tiny CLIP, fp32 on the CPU,
    a metrics row (and the host's read of the device) every step."""
    return ["--data", str(data), "--output", str(output), "--model", "degla-tiny", "--pretrained", "none",
            "--batch-size", "8", "--num-negatives", "4", "--precision", "fp32", "--device", "cpu",
            "--num-workers", "0", "--lr", "1e-3", "--seed", "3", "--no-progress", "--log-every", "1",
            "--set", "optim.warmup_steps=2", "--set", "ema.decay=0.9", "--set", "data.pipeline=torch", *extra]


def test_end_to_end_run_writes_metrics_checkpoints_and_exports(synth, tmp_path, capsys):
    import open_clip

    from degla_fast.model import load_model

    out = tmp_path / "run"
    assert train_main.main(base_args(synth, out, "--max-steps", "4", "--save-every", "2",
                                     "--report-to", "tensorboard")) == 0
    closing = unstamped(capsys.readouterr().out.strip().splitlines()[-1])
    assert closing.startswith("degla-fast train: finished at step 4 in ")
    assert f"checkpoint {out / 'checkpoints' / 'step_00000004.pt'};" in closing
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))

    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for row in rows:
        assert set(REQUIRED) <= set(row)
        assert all(math.isfinite(row[k]) for k in LOSS_KEYS)
        # DeGLA's four terms are all live: K=4 negatives, a teacher, nonzero weights.
        assert row["igc"] > 0 and row["tgc"] > 0
    assert rows[0]["lr"] == pytest.approx(1e-3 / 2)  # warm-up step 1 of 2
    assert rows[0]["distill"] < 1e-6 < rows[-1]["distill"]  # teacher starts as a copy, then lags

    folder = out / "checkpoints"
    assert sorted(p.name for p in folder.glob("step_*.pt")) == ["step_00000002.pt", "step_00000004.pt"]
    assert (folder / "latest").read_text().strip() == "step_00000004.pt"
    state = torch.load(folder / "step_00000004.pt", map_location="cpu", weights_only=False)
    assert state["format"] == "degla-fast/checkpoint" and state["version"] == 1
    assert state["step"] == 4 and state["model_name"] == "degla-tiny"
    # The teacher is an EMA of the student: close to it but not equal after 4 steps.
    student, teacher = state["student"], state["teacher"]
    assert not torch.equal(student["visual.conv1.weight"], teacher["visual.conv1.weight"])
    # logit_scale has no weight decay and stays clamped
    assert float(student["logit_scale"]) <= math.log(100) + 1e-6

    # The model layer reads the checkpoint contract.
    bundle = load_model(None, out)
    assert torch.equal(bundle.model.state_dict()["visual.conv1.weight"], student["visual.conv1.weight"])

    # Export -> a plain open_clip state dict that open_clip itself loads.
    exported = tmp_path / "student.pt"
    assert subprocess.run([sys.executable, "-m", "degla_fast", "export", str(out), str(exported)],
                          cwd=REPO, capture_output=True, text=True, env=_env()).returncode == 0
    plain = torch.load(exported, map_location="cpu", weights_only=True)
    assert all(not k.startswith("module.") for k in plain)
    model, _, _ = open_clip.create_model_and_transforms("degla-tiny", pretrained=str(exported))
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, student[key].to(value.dtype), rtol=0, atol=0)


def test_resume_gives_the_same_metrics_as_a_straight_run(synth, tmp_path):
    straight = tmp_path / "straight"
    assert train_main.main(base_args(synth, straight, "--max-steps", "6", "--save-every", "3")) == 0

    # Simulate a crash after step 5: checkpoint 6 never written, rows 4-5 logged past the
    # last checkpoint (poisoned here, so that only a real re-run can restore them).
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    (resumed / "checkpoints" / "step_00000003.pt").write_bytes(
        (straight / "checkpoints" / "step_00000003.pt").read_bytes())
    (resumed / "checkpoints" / "latest").write_text("step_00000003.pt\n")
    rows = read_metrics(straight / "metrics.jsonl")
    poisoned = [dict(r, loss=-1.0) if r["step"] > 3 else r for r in rows[:5]]
    (resumed / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in poisoned))

    assert train_main.main(base_args(synth, resumed, "--max-steps", "6", "--save-every", "3",
                                     "--resume", "latest")) == 0
    again = read_metrics(resumed / "metrics.jsonl")
    assert [r["step"] for r in again] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(rows, again):
        assert {k: a[k] for k in LOSS_KEYS} == {k: b[k] for k in LOSS_KEYS}, a["step"]
    final_a = torch.load(straight / "checkpoints" / "step_00000006.pt", map_location="cpu", weights_only=False)
    final_b = torch.load(resumed / "checkpoints" / "step_00000006.pt", map_location="cpu", weights_only=False)
    for part in ("student", "teacher"):
        for key, value in final_a[part].items():
            assert torch.equal(value, final_b[part][key]), (part, key)
    assert (final_a["epoch"], final_a["batch"]) == (final_b["epoch"], final_b["batch"])


def test_resume_latest_without_checkpoint_starts_fresh(synth, tmp_path):
    out = tmp_path / "fresh"
    assert train_main.main(base_args(synth, out, "--max-steps", "2", "--resume", "latest")) == 0
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2]


def test_resume_with_another_k_or_loss_weight_is_allowed_and_says_so_in_one_line(synth, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_main.main(base_args(synth, out, "--max-steps", "2")) == 0
    assert train_main.main(base_args(synth, out, "--max-steps", "3", "--resume", "latest")) == 0
    assert "was trained with" not in capsys.readouterr().err  # the same loss: nothing to say
    assert train_main.main(base_args(synth, out, "--max-steps", "4", "--resume", "latest", "--num-negatives", "2",
                                     "--set", "loss.tgc_weight=0.2")) == 0
    err = capsys.readouterr().err
    assert [unstamped(line) for line in err.splitlines() if "was trained with" in line] == [
        f"warning: resume: {out / 'checkpoints' / 'step_00000003.pt'} was trained with num_negatives=4, "
        "tgc_weight=0.1; this run uses num_negatives=2, tgc_weight=0.2 from step 4 on"], err
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4]


def test_resume_says_a_changed_tgc_indexing_and_a_teacher_started_from_the_student_in_one_line_each(synth, tmp_path,
                                                                                                  capsys):
    out, checkpoint = tmp_path / "run", tmp_path / "run" / "checkpoints" / "step_00000002.pt"
    assert train_main.main(base_args(synth, out, "--max-steps", "2", "--num-negatives", "0")) == 0  # no teacher
    assert torch.load(checkpoint, map_location="cpu", weights_only=True)["teacher"] is None
    capsys.readouterr()
    assert train_main.main(base_args(synth, out, "--max-steps", "3", "--resume", "latest",
                                     "--set", "loss.official_tgc_indexing=true")) == 0
    # (The longer schedule has its own line: the next test.)
    warnings = [unstamped(line) for line in capsys.readouterr().err.splitlines()
                if "warning:" in line and "was scheduled for" not in line]
    assert warnings == [
        f"warning: resume: {checkpoint} holds no EMA teacher (its loss needed none); the teacher starts from the "
        "student's weights at step 2",
        f"warning: resume: {checkpoint} was trained with num_negatives=0, official_tgc_indexing=False; this run "
        "uses num_negatives=4, official_tgc_indexing=True from step 3 on"], warnings
    # What the line says: at step 3 the teacher is the student (the distillation term ~0, as at a fresh start).
    rows = {r["step"]: r for r in read_metrics(out / "metrics.jsonl")}
    assert rows[3]["distill"] < 1e-6 and rows[3]["tgc"] > 0


def test_a_resume_that_changes_the_schedule_says_what_the_lr_does_and_a_finished_run_says_so(synth, tmp_path,
                                                                                            capsys):
    out = tmp_path / "run"
    assert train_main.main(base_args(synth, out, "--max-steps", "3")) == 0
    capsys.readouterr()
    # Resumed at its end with the same length: nothing trained, and the closing line says why.
    assert train_main.main(base_args(synth, out, "--max-steps", "3", "--resume", "latest")) == 0
    captured = capsys.readouterr()
    assert "scheduled" not in captured.err  # the same schedule: nothing to say
    closing = unstamped(captured.out.strip().splitlines()[-1])
    assert closing.startswith("degla-fast train: the run had already finished at step 3: nothing trained"), closing
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3]

    # Longer: the cosine now spans 6 steps, so the learning rate rises again from ~0; one line says so.
    assert train_main.main(base_args(synth, out, "--max-steps", "6", "--resume", "latest")) == 0
    lines = [unstamped(line) for line in capsys.readouterr().err.splitlines() if "scheduled" in line]
    now = 1e-3 * cosine_with_warmup(3, warmup_steps=2, total_steps=6)
    was = 1e-3 * cosine_with_warmup(3, warmup_steps=2, total_steps=3)
    assert lines == [f"warning: resume: {out / 'checkpoints' / 'step_00000003.pt'} was scheduled for 3 steps, this "
                     f"run for 6: the learning rate at step 4 is {now:.3g} (the old schedule's {was:.3g}) and follows "
                     "the cosine to 0 at step 6"]
    rows = {r["step"]: r for r in read_metrics(out / "metrics.jsonl")}
    assert rows[4]["lr"] == pytest.approx(now)  # what the line says is what step 4 trained with
    assert rows[5]["lr"] == pytest.approx(1e-3 * cosine_with_warmup(4, warmup_steps=2, total_steps=6))


STEP_LINE = re.compile(r"degla-fast train: step (\d+)/(\d+) \(\d+%\) epoch (\d+) \| [0-9.]+ samples/s \| loss (\S+) clip (\S+) "
                       r"igc (\S+) tgc (\S+) distill (\S+) \| lr (\S+) \| logit scale (\S+) \| ETA \d+:\d\d:\d\d")


@pytest.mark.timeout(180)
def test_a_run_with_stdout_to_a_file_reports_itself_in_lines(synth, tmp_path, capsys, monkeypatch):
    # What a cluster job's log gets (SLURM, nohup, `> log 2>&1`): no terminal, so no progress bar.
    out, log = tmp_path / "run", tmp_path / "train.log"
    with open(log, "w") as fh:
        proc = subprocess.run([sys.executable, "-m", "degla_fast", "train",
                               *base_args(synth, out, "--max-steps", "3", "--log-every", "2", "--save-every", "2")],
                              cwd=REPO, env={k: v for k, v in _env().items() if k != "OMP_NUM_THREADS"},
                              stdout=fh, stderr=subprocess.STDOUT, timeout=150)
    lines = log.read_text().splitlines()
    cores = len(os.sched_getaffinity(0))  # the thread rule: these cores over 1 process (nobody set the count)
    assert proc.returncode == 0, lines[-20:]
    assert all(STAMP.fullmatch(line) for line in lines), lines  # every line a job's log gets is timed
    ours = [unstamped(line) for line in lines if "degla-fast train:" in line]
    assert ours[0] == (f"degla-fast train: start: model degla-tiny, data {synth} (48 samples, 6 steps per epoch), "
                       "batch 8 per process (8 in all), K=4, loss backend torch (asked: auto), precision fp32, world "
                       f"size 1, device cpu, {cores} CPU thread{'s' if cores > 1 else ''} ({cores} cores / 1 local process), "
                       f"output {out}, 3 steps")
    rows = {r["step"]: r for r in read_metrics(out / "metrics.jsonl")}
    steps = [STEP_LINE.fullmatch(line) for line in ours if STEP_LINE.fullmatch(line)]
    assert [(m[1], m[2], m[3]) for m in steps] == [("2", "3", "0"), ("3", "3", "0")]  # every log_every steps
    for m in steps:  # the values of the metrics row the host already read, nothing else
        row = rows[int(m[1])]
        assert m.groups()[3:] == tuple(f"{row[k]:.4g}" for k in ("loss", "clip", "igc", "tgc", "distill")) + (
            f"{row['lr']:.3g}", f"{row['logit_scale']:.2f}")
    checkpoints = out / "checkpoints"
    assert [line for line in ours if "checkpoint written" in line] == [
        f"degla-fast train: step 2: checkpoint written to {checkpoints / 'step_00000002.pt'}",
        f"degla-fast train: step 3: checkpoint written to {checkpoints / 'step_00000003.pt'}"]
    assert ours[-1].startswith("degla-fast train: finished at step 3 in ")

    # Resumed (in this process; capsys is no terminal either): the start line says from where.
    assert train_main.main(base_args(synth, out, "--max-steps", "4", "--resume", "latest")) == 0
    printed = [unstamped(line) for line in capsys.readouterr().out.splitlines()]
    assert printed[0].endswith(f", 4 steps; resumed from step 3 of checkpoint {checkpoints / 'step_00000003.pt'}")
    assert [STEP_LINE.fullmatch(line)[1] for line in printed if STEP_LINE.fullmatch(line)] == ["4"]

    # With a terminal the progress bar speaks instead: only the closing line is printed.
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert train_main.main(base_args(synth, out, "--max-steps", "5", "--resume", "latest")) == 0
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 1 and unstamped(printed[0]).startswith("degla-fast train: finished at step 5 in ")


def test_sigterm_finishes_the_step_saves_and_exits_zero(synth, tmp_path):
    out = tmp_path / "preempted"
    proc = subprocess.Popen([sys.executable, "-m", "degla_fast", "train", *base_args(synth, out, "--max-steps", "10000",
                                                                                    "--save-every", "0")],
                            cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while len(read_metrics(out / "metrics.jsonl")) < 2:
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "training never logged two steps"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        stdout, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-2000:]
    assert "stop signal received" in err
    assert "degla-fast train: stopped by a signal at step" in stdout
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl")]
    state = torch.load(out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip(),
                       map_location="cpu", weights_only=False)
    assert 2 <= state["step"] < 10000
    assert steps == list(range(1, state["step"] + 1))  # every finished step logged, the saved one last


@pytest.mark.parametrize("extra", [[], ["--set", "optim.fused=false"]], ids=["on-device skip", "host-read skip"])
def test_nonfinite_losses_are_skipped_then_stop_with_a_checkpoint(synth, tmp_path, monkeypatch, capsys, extra):
    from degla_fast import DeGLALoss

    real_from_spec = DeGLALoss.from_spec
    calls = {"n": 0}

    def flaky_from_spec(spec, **kwargs):
        loss_fn = real_from_spec(spec, **kwargs)

        def loss(*args):
            out = loss_fn(*args)
            calls["n"] += 1
            if calls["n"] >= 3:  # steps 1-2 train, every later loss is NaN
                out.total = out.total * float("nan")
            return out

        return loss

    monkeypatch.setattr(builder.DeGLALoss, "from_spec", flaky_from_spec)
    out = tmp_path / "nan"
    status = train_main.main(base_args(synth, out, "--max-steps", "50", "--set", "max_nonfinite_steps=3", *extra))
    err = capsys.readouterr().err
    assert status == 2
    assert err.count("non-finite loss") >= 3 and "max_nonfinite_steps=3" in err
    assert "Traceback" not in err
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2]
    state = torch.load(out / "checkpoints" / "step_00000002.pt", map_location="cpu", weights_only=False)
    assert state["step"] == 2 and state["batch"] == 5  # 2 applied + 3 skipped batches consumed
    assert state["scheduler"]["last_epoch"] == 2  # the skipped steps did not advance the schedule
    assert all(int(s["step"]) == 2 for s in state["optimizer"]["state"].values())  # nor AdamW's step count
    assert all(torch.isfinite(v).all() for v in state["student"].values() if v.is_floating_point())


@pytest.mark.parametrize("extra, culprit", [
    (["--data", "missing/train.json"], "data.path: no such file missing/train.json"),
    (["--model", "no-such-model"], "no-such-model"),
    (["--deepspeed", "missing_ds.json"], "missing_ds.json"),
    (["--precision", "fp8"], "precision: 'fp8' is not one of fp32, bf16, amp"),
    (["--set", "loss.igc_wieght=1"], "loss.igc_wieght: unknown configuration key"),
    (["--batch-size", "0"], "data.batch_size: must be >= 1"),
])
def test_user_errors_are_one_line(synth, tmp_path, capsys, extra, culprit):
    args = base_args(synth, tmp_path / "err", "--max-steps", "1")
    status = train_main.main(args + extra)
    err = capsys.readouterr().err.strip()
    assert status == 2
    assert culprit in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.startswith("degla-fast: error:")]) == 1


def test_cli_prints_one_line_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "degla_fast", "train", "--data", str(tmp_path / "nope.json")],
                          cwd=REPO, env=_env(), capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == f"degla-fast: error: data.path: no such file {tmp_path / 'nope.json'}"
    assert "Traceback" not in proc.stderr


def test_help_config_lists_every_field_by_section_with_yaml_defaults_wrapped_to_the_terminal(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "72")
    assert train_main.main(["--help-config"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert max(len(line) for line in lines) <= 72
    headings = [line for line in lines if line and not line.startswith(" ")][1:]
    assert [h.split(":")[0] for h in headings if h.endswith(")") or h == "top level:"] == [
        "top level", "data", "model", "loss", "optim", "ema"]
    text = "\n".join(lines)
    section = text[text.index("\nloss: "):text.index("\noptim: ")]
    assert "  igc_weight (default: 0.1): weight of the image-grounded" in section
    # Values as a YAML file writes them, never Python's None/True/False or quotes.
    assert "  resume (default: null):" in text and "  progress (default: true):" in text
    assert "  overwrite (default: false):" in text and "  lr (default: 1.0e-06):" in text
    assert "  precision (default: bf16):" in text and "[fp32, bf16, amp]" in text
    assert "  path (required):" in text
    assert not re.search(r"\(default: (None|True|False|'[^']+')\)", text)


def test_yaml_unknown_key_and_bad_value_name_the_field(tmp_path):
    bad_key = tmp_path / "bad_key.yaml"
    bad_key.write_text("data:\n  path: x.json\noptim:\n  learning_rate: 1.0\n")
    with pytest.raises(ConfigError, match=r"optim.learning_rate: unknown configuration key \(allowed here: lr,"):
        load_config(bad_key)
    bad_value = tmp_path / "bad_value.yaml"
    bad_value.write_text("data:\n  path: x.json\nreport_to: mlflow\n")
    with pytest.raises(ConfigError, match="report_to: 'mlflow' is not one of none, tensorboard, wandb"):
        load_config(bad_value)
    with pytest.raises(ConfigError, match="epochs: must be an integer"):
        load_config(None, {"data.path": "x.json", "epochs": "many"})


@pytest.mark.parametrize("name", ["demo-cpu.yaml", "vit-b-32-coco.yaml"])
def test_shipped_configs_load(name):
    config = load_config(REPO / "configs" / name)
    assert config.loss.num_negatives == 4 and config.data.path


def test_param_groups_exclude_gains_biases_and_logit_scale():
    from degla_fast.model import TINY_MODEL, create_model

    model = create_model(TINY_MODEL).model
    no_decay, decay = param_groups(model, 0.1)
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1
    names = {id(p): n for n, p in model.named_parameters()}
    undecayed = {names[id(p)] for p in no_decay["params"]}
    assert "logit_scale" in undecayed and "ln_final.weight" in undecayed and "visual.ln_pre.bias" in undecayed
    assert all(names[id(p)].endswith("weight") or "embedding" in names[id(p)] or "proj" in names[id(p)]
               for p in decay["params"])
    assert "visual.conv1.weight" in {names[id(p)] for p in decay["params"]}
    assert len(no_decay["params"]) + len(decay["params"]) == len(list(model.parameters()))


def test_cosine_schedule_with_warmup():
    lrs = [cosine_with_warmup(s, warmup_steps=4, total_steps=12) for s in range(12)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == 1.0
    assert lrs[8] == pytest.approx(0.5)  # halfway through the 8 decay steps
    assert lrs[11] == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 8)))
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))


def _env() -> dict:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
    return env


def test_train_step_updates_student_clamps_logit_scale_and_moves_teacher():
    from degla_fast import EMATeacher
    from degla_fast.model import TINY_MODEL, create_model
    from degla_fast.train.optim import build_optimizer, build_scheduler
    from degla_fast.loss import DeGLALoss
    from degla_fast.train.step import MAX_LOGIT_SCALE, StepParts, clamp_logit_scale_, train_step

    bundle = create_model(TINY_MODEL)
    model = bundle.model
    with torch.no_grad():
        model.logit_scale.fill_(MAX_LOGIT_SCALE + 0.5)  # above the cap: the step must clamp it
    teacher = EMATeacher(model, decay=0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.98), eps=1e-6)
    parts = StepParts(model=model, loss_fn=DeGLALoss(num_negatives=2, check_finite=False), optimizer=optimizer,
                      scheduler=build_scheduler(optimizer, warmup_steps=1, total_steps=10),
                      clamp_logit_scale=lambda: clamp_logit_scale_(model), teacher=teacher)
    images = torch.randn(4, 3, bundle.image_size, bundle.image_size)
    tokens = bundle.tokenizer([f"a photo of {i} things" for i in range(12)])[:, :10]
    result = train_step(parts, images, tokens)

    assert result.applied and set(result.times) == {"forward", "teacher_forward", "loss", "backward", "optim", "ema"}
    assert float(model.logit_scale.detach()) == pytest.approx(MAX_LOGIT_SCALE)
    assert float(result.logit_scale) == pytest.approx(math.exp(MAX_LOGIT_SCALE + 0.5), rel=1e-5)
    w = "visual.conv1.weight"
    assert not torch.equal(model.state_dict()[w], before[w])
    # decay 0.5: the teacher sits halfway between the old and the new student weights
    torch.testing.assert_close(teacher.module.state_dict()[w], (before[w] + model.state_dict()[w]) / 2)


def test_demo_quick_prints_before_after_table_and_reuses_finished_stages(tmp_path, capsys):
    from degla_fast import demo

    out = tmp_path / "demo"
    assert demo.main(["--quick", "--output", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    table = (out / "results.md").read_text()
    assert table.strip() in printed
    assert "| compositional: average |" in table and "| zero-shot: average |" in table
    pre = out / "pretrain" / "checkpoints" / "step_00000004.pt"
    post = out / "degla" / "checkpoints" / "step_00000003.pt"
    stamps = (pre.stat().st_mtime_ns, post.stat().st_mtime_ns)
    state = torch.load(post, map_location="cpu", weights_only=False)
    assert state["config"]["loss"]["num_negatives"] == 4 and state["pretrained"] == str(out / "pretrain")

    assert demo.main(["--quick", "--output", str(out), "--no-progress"]) == 0
    assert (pre.stat().st_mtime_ns, post.stat().st_mtime_ns) == stamps  # nothing retrained
    assert capsys.readouterr().out.count("| compositional: swap |") == 1


def test_deepspeed_config_is_completed_and_checked(tmp_path):
    from degla_fast.train.distributed import read_deepspeed_config

    cfg = read_deepspeed_config(str(REPO / "configs" / "ds_zero3.json"), micro_batch=32, world_size=4,
                                max_grad_norm=0.0)
    assert cfg["train_micro_batch_size_per_gpu"] == 32 and cfg["train_batch_size"] == 128
    assert cfg["gradient_accumulation_steps"] == 1 and cfg["zero_optimization"]["stage"] == 3
    assert cfg["gradient_clipping"] == 0.0  # explicit: DeepSpeed's default would clip at 1.0
    fixed = tmp_path / "fixed.json"
    fixed.write_text(json.dumps({"train_micro_batch_size_per_gpu": 16, "zero_optimization": {"stage": 2}}))
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu is 16 but the trainer needs 32"):
        read_deepspeed_config(str(fixed), micro_batch=32, world_size=1, max_grad_norm=0.0)
    broken = tmp_path / "broken.json"
    broken.write_text('{"zero_optimization": {"stage": 2},\n}')
    with pytest.raises(ConfigError, match=r"broken.json:2: not valid JSON"):
        read_deepspeed_config(str(broken), micro_batch=32, world_size=1, max_grad_norm=0.0)


# ---------------------------------------------------------------- optim.fused_ema (AdamWEMA)


def _final(out: Path) -> dict:
    name = (out / "checkpoints" / "latest").read_text().strip()
    return torch.load(out / "checkpoints" / name, map_location="cpu", weights_only=False)


def test_fused_ema_gives_the_same_metrics_and_weights_as_adamw_plus_update(synth, tmp_path):
    # On the CPU AdamWEMA's torch backend is AdamW(foreach) + EMATeacher.update op for op: equal bits
    # (optim.fused=false: the foreach AdamW, not the fused one the trainer picks by default).
    plain, fused = tmp_path / "plain", tmp_path / "fused"
    assert train_main.main(base_args(synth, plain, "--max-steps", "3", "--set", "optim.fused=false")) == 0
    assert train_main.main(base_args(synth, fused, "--max-steps", "3", "--fused-ema")) == 0
    rows_a, rows_b = read_metrics(plain / "metrics.jsonl"), read_metrics(fused / "metrics.jsonl")
    assert [r["step"] for r in rows_b] == [1, 2, 3]
    for a, b in zip(rows_a, rows_b):
        assert {k: a[k] for k in LOSS_KEYS} == {k: b[k] for k in LOSS_KEYS}, a["step"]
        assert "time_ema" in b
    assert rows_b[-1]["distill"] > 0  # the fused step did move the teacher away from the student
    state_a, state_b = _final(plain), _final(fused)
    assert state_b["config"]["optim"]["fused_ema"] is True
    for part in ("student", "teacher"):
        assert state_a[part].keys() == state_b[part].keys()
        for key, value in state_a[part].items():
            assert torch.equal(value, state_b[part][key]), (part, key)
    # The optimiser state is AdamW's (plus each group's names and EMA decay).
    opt_a, opt_b = state_a["optimizer"], state_b["optimizer"]
    assert opt_a["state"].keys() == opt_b["state"].keys()
    for i, s in opt_a["state"].items():
        assert all(torch.equal(s[k], opt_b["state"][i][k]) for k in ("step", "exp_avg", "exp_avg_sq")), i
    # logit_scale has a group of its own, whose clamp_max keeps it <= ln 100 before the teacher moves.
    assert [g["decay"] for g in opt_b["param_groups"]] == [0.9, 0.9, 0.9]
    assert opt_b["param_groups"][0]["param_names"] == ["logit_scale"]


@pytest.mark.parametrize("extra, mode", [(["--num-negatives", "0"], "normal"), ([], "idle"), (["--fused-ema"], "normal")],
                         ids=["clip", "degla-idle", "fused-ema"])
def test_tower_thread_train_the_same_bits_with_the_image_tower_on_its_thread(synth, tmp_path, monkeypatch, extra,
                                                                               mode):
    # The plain CLIP loss (no teacher) and DeGLA (the teacher's forward on the tower's thread too,
    # the EMA or AdamWEMA after it): losses, student, teacher and optimiser state equal to the bit.
    from degla_fast.train import step

    threads, image_side = [], step._image_side

    def spy(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return image_side(*args, **kwargs)

    monkeypatch.setattr(step, "_image_side", spy)
    one, two = tmp_path / "one", tmp_path / "two"
    assert train_main.main(base_args(synth, one, "--max-steps", "4", *extra)) == 0
    assert not threads
    assert train_main.main(base_args(synth, two, "--max-steps", "4", "--tower-thread", mode, *extra)) == 0
    assert len(threads) == 4 and all(name.startswith("image-tower") for name in threads)
    rows_a, rows_b = read_metrics(one / "metrics.jsonl"), read_metrics(two / "metrics.jsonl")
    assert [{k: r[k] for k in LOSS_KEYS} for r in rows_a] == [{k: r[k] for k in LOSS_KEYS} for r in rows_b]
    state_a, state_b = _final(one), _final(two)
    assert (state_a["teacher"] is None) == (extra == ["--num-negatives", "0"])
    for part in ("student", "teacher"):
        for key, value in (state_a[part] or {}).items():
            assert torch.equal(value, state_b[part][key]), (part, key)
    for i, s in state_a["optimizer"]["state"].items():
        assert all(torch.equal(s[k], state_b["optimizer"]["state"][i][k]) for k in ("exp_avg", "exp_avg_sq")), i


def test_tower_thread_refuse_what_would_change_the_numbers(synth, tmp_path, capsys):
    from degla_fast.model import random_modules
    from degla_fast.train.distributed import DistInfo

    attention = torch.nn.MultiheadAttention(8, 2, dropout=0.1)
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.0), torch.nn.Dropout(0.1), attention)
    assert random_modules(model) == ["2", "3"]
    with pytest.raises(ConfigError, match=r"tower_thread: the model draws random numbers in its forward \(2, 3\)"):
        builder._tower_pool(model, DistInfo())
    with pytest.raises(ConfigError, match="tower_thread: CPU runs of one process only .this run: cpu, 2 processes"):
        builder._tower_pool(torch.nn.Linear(2, 2), DistInfo(world_size=2))
    ds = tmp_path / "ds.json"
    ds.write_text("{}")
    assert train_main.main(base_args(synth, tmp_path / "ds", "--tower-thread", "normal", "--deepspeed", str(ds))) == 2
    assert "degla-fast: error: tower_thread: not available with deepspeed" in capsys.readouterr().err


def test_cached_images_train_as_decoding_every_step_did(synth, tmp_path, monkeypatch):
    # 8 steps of 8 over 48 images: the second epoch reads its images from the cache. The run to
    # match is the step as it was: every image decoded on every read, each crop under torch.manual_seed.
    from degla_fast.data import torch_pipeline

    cached, before = tmp_path / "cached", tmp_path / "before"
    assert train_main.main(base_args(synth, cached, "--max-steps", "8")) == 0
    monkeypatch.setattr(torch_pipeline, "seed_cpu_rng", torch.manual_seed)
    assert train_main.main(base_args(synth, before, "--max-steps", "8", "--set", "data.image_cache_mib=0")) == 0
    rows_a, rows_b = read_metrics(cached / "metrics.jsonl"), read_metrics(before / "metrics.jsonl")
    assert [r["step"] for r in rows_a] == list(range(1, 9))
    assert [{k: r[k] for k in LOSS_KEYS} for r in rows_a] == [{k: r[k] for k in LOSS_KEYS} for r in rows_b]
    state_a, state_b = _final(cached), _final(before)
    assert all(torch.equal(v, state_b["student"][k]) for k, v in state_a["student"].items())


def test_fused_ema_resume_gives_the_same_metrics_as_a_straight_run(synth, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train_main.main(base_args(synth, straight, "--max-steps", "4", "--save-every", "2", "--fused-ema")) == 0
    (resumed / "checkpoints").mkdir(parents=True)
    (resumed / "checkpoints" / "step_00000002.pt").write_bytes(
        (straight / "checkpoints" / "step_00000002.pt").read_bytes())
    (resumed / "checkpoints" / "latest").write_text("step_00000002.pt\n")
    rows = read_metrics(straight / "metrics.jsonl")
    (resumed / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))

    assert train_main.main(base_args(synth, resumed, "--max-steps", "4", "--save-every", "2", "--fused-ema",
                                     "--resume", "latest")) == 0
    again = read_metrics(resumed / "metrics.jsonl")
    assert [r["step"] for r in again] == [1, 2, 3, 4]
    for a, b in zip(rows, again):
        assert {k: a[k] for k in LOSS_KEYS} == {k: b[k] for k in LOSS_KEYS}, a["step"]
    final_a, final_b = _final(straight), _final(resumed)
    assert final_a["step"] == final_b["step"] == 4
    for part in ("student", "teacher"):
        for key, value in final_a[part].items():
            assert torch.equal(value, final_b[part][key]), (part, key)


@pytest.mark.parametrize("extra, culprit", [
    (["--deepspeed", "missing_ds.json"], "optim.fused_ema: not available with deepspeed"),
    (["--num-negatives", "0"], "optim.fused_ema: this run has no EMA teacher"),
    (["--tgc-weight", "0", "--distill-weight", "0"], "optim.fused_ema: this run has no EMA teacher"),
])
def test_fused_ema_user_errors_are_one_line(synth, tmp_path, capsys, extra, culprit):
    status = train_main.main(base_args(synth, tmp_path / "err", "--max-steps", "1", "--fused-ema") + extra)
    err = capsys.readouterr().err.strip()
    assert status == 2
    assert culprit in err and "Traceback" not in err
    assert len(err.splitlines()) == 1 and err.startswith("degla-fast: error:")
    assert not (tmp_path / "err").exists()  # refused before anything was written


@pytest.mark.parametrize("teacher_dtype, scaler", [(None, False), (torch.bfloat16, False), (None, True)])
def test_fused_train_step_equals_unfused_when_logit_scale_is_clamped(teacher_dtype, scaler):
    # teacher_dtype bf16: what ema.dtype bf16 builds, an fp32 EMA state with a bf16 forward copy.
    # AdamWEMA clamps logit_scale inside the step (its own group's clamp_max) before it moves the
    # teacher, so the numbers are those of AdamW, clamp, update().
    # A step the loss scaler skips (inf gradients) moves the teacher as update() would.
    from degla_fast import EMATeacher
    from degla_fast.model import TINY_MODEL, create_model
    from degla_fast.train.optim import build_optimizer, build_scheduler
    from degla_fast.loss import DeGLALoss
    from degla_fast.train.step import MAX_LOGIT_SCALE, StepParts, clamp_logit_scale_, train_step

    bundle = create_model(TINY_MODEL)
    with torch.no_grad():
        bundle.model.logit_scale.fill_(MAX_LOGIT_SCALE + 0.5)  # above the cap: the first step clamps it
    images = torch.randn(4, 3, bundle.image_size, bundle.image_size, generator=torch.Generator().manual_seed(0))
    tokens = bundle.tokenizer([f"a photo of {i} things" for i in range(12)])[:, :10]
    finals, scales = [], []
    for fused in (False, True):
        torch.manual_seed(0)
        model = create_model(TINY_MODEL).model
        model.load_state_dict(bundle.model.state_dict())
        teacher = EMATeacher(model, decay=0.5, forward_dtype=teacher_dtype)
        optimizer = build_optimizer(model, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.98), eps=1e-6,
                                    teacher=teacher if fused else None, fused=False)  # AdamW(foreach)
        parts = StepParts(model=model, loss_fn=DeGLALoss(num_negatives=2, check_finite=False), optimizer=optimizer,
                          scheduler=build_scheduler(optimizer, warmup_steps=1, total_steps=10),
                          clamp_logit_scale=lambda m=model: clamp_logit_scale_(m), teacher=teacher,
                          teacher_autocast_dtype=teacher_dtype, optimizer_moves_teacher=fused,
                          scaler=torch.amp.GradScaler("cpu") if scaler else None)
        for i in range(3):
            if scaler and i == 1:  # 2**127 overflows the gradients: the step is skipped and the scale backs off
                parts.scaler.update(2.0 ** 127)
            assert train_step(parts, images, tokens).applied
        finals.append((model.state_dict(), teacher.state_dict()))
        scales.append(parts.scaler.get_scale() if scaler else None)
    if scaler:
        assert scales[0] == scales[1] < 2.0 ** 127
    (student_a, teacher_a), (student_b, teacher_b) = finals
    # decay 0.5: the teacher followed the clamped value (the unclamped one was ~ln 100 + 0.49)
    assert float(teacher_b["logit_scale"]) < MAX_LOGIT_SCALE + 0.1
    for a, b in ((student_a, student_b), (teacher_a, teacher_b)):
        for key, value in a.items():
            assert torch.equal(value, b[key]), key


@pytest.mark.parametrize("name, forward", [("same", None), ("fp32", None), ("bf16", torch.bfloat16)])
def test_ema_dtype_keeps_an_fp32_state_and_bf16_means_a_forward_copy(synth, tmp_path, name, forward):
    # ema.dtype bf16 used to make the EMA state itself bf16, which never moves at decay 0.9996.
    from degla_fast.model import TINY_MODEL, create_model

    config = load_config(None, {"data.path": str(synth), "ema.dtype": name, "ema.decay": 0.9996, "precision": "fp32"})
    student = create_model(TINY_MODEL).model
    teacher = builder._make_teacher(student, config, None)
    assert teacher.dtype == torch.float32 and teacher.flat.dtype == torch.float32
    assert teacher.forward_dtype == forward
    assert {p.dtype for p in teacher.module.parameters()} == {forward or torch.float32}
    assert all(v.dtype == torch.float32 for k, v in teacher.state_dict().items() if v.is_floating_point())
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.1)
    before = teacher.flat.clone()
    teacher.update(student)
    assert bool((teacher.flat != before).any())  # a 4e-5 step moves the fp32 state


def test_ema_dtype_bf16_run_trains_with_the_forward_copy(synth, tmp_path):
    out = tmp_path / "bf16"
    args = base_args(synth, out, "--max-steps", "2", "--set", "ema.dtype=bf16")
    assert train_main.main(args) == 0
    state = torch.load(sorted((out / "checkpoints").glob("*.pt"))[-1], map_location="cpu", weights_only=False)
    teacher = state["teacher"]
    assert all(v.dtype == torch.float32 for v in teacher.values() if v.is_floating_point())


@pytest.mark.parametrize("precision, name, forward", [("bf16", "same", torch.bfloat16), ("bf16", "fp32", None),
                                                      ("amp", "same", torch.bfloat16)])  # amp is bf16 on the CPU
def test_ema_dtype_same_follows_the_forward_precision(synth, precision, name, forward):
    # precision bf16 (the default): the teacher runs on a bf16 copy written by the EMA pass, not on
    # fp32 weights that autocast casts every step.
    from degla_fast.model import TINY_MODEL, create_model

    config = load_config(None, {"data.path": str(synth), "ema.dtype": name, "precision": precision})
    teacher = builder._make_teacher(create_model(TINY_MODEL).model, config, None)
    assert teacher.forward_dtype == forward and teacher.flat.dtype == torch.float32
    assert {p.dtype for p in teacher.module.parameters()} == {forward or torch.float32}


def test_bf16_step_feeds_the_loss_bf16_features():
    from degla_fast import EMATeacher
    from degla_fast.model import TINY_MODEL, create_model
    from degla_fast.train.optim import build_optimizer, build_scheduler
    from degla_fast.loss import DeGLALoss
    from degla_fast.train.step import StepParts, clamp_logit_scale_, train_step

    bundle = create_model(TINY_MODEL)
    model = bundle.model
    teacher = EMATeacher(model, decay=0.9, forward_dtype=torch.bfloat16)
    seen = []
    real = DeGLALoss(num_negatives=2, check_finite=False)

    def loss(*args):
        seen.append([None if a is None else a.dtype for a in args])
        return real(*args)

    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.98), eps=1e-6)
    parts = StepParts(model=model, loss_fn=loss, optimizer=optimizer,
                      scheduler=build_scheduler(optimizer, warmup_steps=1, total_steps=10),
                      clamp_logit_scale=lambda: clamp_logit_scale_(model), teacher=teacher,
                      autocast_dtype=torch.bfloat16, teacher_autocast_dtype=torch.bfloat16)
    images = torch.randn(4, 3, bundle.image_size, bundle.image_size)
    tokens = bundle.tokenizer([f"a photo of {i} things" for i in range(12)])[:, :10]
    assert train_step(parts, images, tokens).applied
    bf16 = torch.bfloat16
    assert seen == [[bf16, bf16, torch.float32, bf16, bf16]]
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 weights, bf16 autocast
