"""open_clip as a user meets it: ``DeGLALoss`` called the way open_clip_train calls its loss
(``loss(**model_out, output_dict=True)``), equal to open_clip's ``ClipLoss`` in values and
gradients for every backend (one process and two gloo processes), ``use_degla_loss`` /
``restore``, and open_clip_train's own ``main()`` logging the same losses with ours as with its own."""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import open_clip.loss  # noqa: F401  (before any process group: see _worker)
import pytest
import torch
import torch.distributed as dist

from degla_fast import DeGLALoss, LossOutput
from degla_fast.loss import functional as Fn
from degla_fast.loss.spec import LOSS_BACKENDS
from degla_fast.errors import ConfigError
from test_losses import make_inputs
from test_losses_distributed import run_ranks

REPO = Path(__file__).resolve().parents[1]
WORLD, B, D = 2, 3, 16
# (local_loss, gather_with_grad); with local_loss and a gather without autograd open_clip's
# gathered copy of the local slice carries no gradient, ours keeps it (functional._gather): the
# values agree, the gradients differ by design, so that pair is compared on values only.
MODES = [(False, False), (False, True), (True, True), (True, False)]
GRADS_AGREE = {(False, False), (False, True), (True, True)}


def _leaves(tensors):
    return [t.detach().float().clone().requires_grad_() for t in tensors]


def _both(image, text, scale, backend, **dist_kwargs):
    """(ours, open_clip's): each a (loss dict as floats, [grad image, grad text, grad scale])."""
    from open_clip.loss import ClipLoss

    results = []
    for loss_fn in (DeGLALoss(num_negatives=0, backend=backend, **dist_kwargs), ClipLoss(**dist_kwargs)):
        leaves = _leaves((image, text, scale))
        model_out = dict(zip(("image_features", "text_features", "logit_scale"), leaves))
        losses = loss_fn(**model_out, output_dict=True)
        sum(losses.values()).backward()
        results.append(({k: float(v.detach()) for k, v in losses.items()}, [t.grad for t in leaves]))
    return results


# ---------------------------------------------------------------- the calling convention


@pytest.mark.parametrize("backend", LOSS_BACKENDS)
def test_open_clip_call_matches_clip_loss(backend):
    image, text, scale, _, _ = make_inputs(5, 0, 24)
    (ours, our_grads), (theirs, their_grads) = _both(image, text, scale, backend)
    assert list(ours) == list(theirs) == ["contrastive_loss"]
    assert ours["contrastive_loss"] == pytest.approx(theirs["contrastive_loss"], rel=1e-5, abs=1e-6)
    for name, got, want in zip(("image", "text", "logit_scale"), our_grads, their_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=lambda m: f"{backend} {name}: {m}")


def test_output_dict_names_the_weighted_terms_and_sums_to_the_total():
    image, text, scale, t_image, t_text = make_inputs(4, 2, 16)
    kwargs = dict(image_features=image, text_features=text, logit_scale=scale, teacher_image_features=t_image,
                  teacher_text_features=t_text)
    loss_fn = DeGLALoss(num_negatives=2, igc_weight=0.3, tgc_weight=0.2, distill_weight=0.01, backend="torch")
    out = loss_fn(**kwargs)
    named = loss_fn(**kwargs, output_dict=True)
    assert isinstance(out, LossOutput)
    assert list(named) == ["contrastive_loss", "igc_loss", "tgc_loss", "distill_loss"]
    want = [out.clip, 0.3 * out.igc, 0.2 * out.tgc, 0.01 * out.distill]
    for got, expected in zip(named.values(), want):
        torch.testing.assert_close(got, expected)
    torch.testing.assert_close(sum(named.values()), out.total)
    # A term whose weight is 0 is not there (its value would be a 0 in open_clip_train's log).
    named = Fn.degla_loss(image, text, scale, t_image, t_text, num_negatives=2, igc_weight=0.0, distill_weight=0.0,
                          backend="torch", output_dict=True)
    assert list(named) == ["contrastive_loss", "tgc_loss"]


def test_logit_bias_is_refused_in_one_line():
    image, text, scale, _, _ = make_inputs(4, 0, 16)
    for call in (lambda **kw: DeGLALoss(num_negatives=0)(**kw), lambda **kw: Fn.degla_loss(**kw, num_negatives=0)):
        with pytest.raises(ConfigError) as err:
            call(image_features=image, text_features=text, logit_scale=scale, logit_bias=torch.tensor(-10.0),
                 output_dict=True)
        message = str(err.value)
        assert "\n" not in message and "softmax" in message and "SigLIP" in message
    # None is what a CLIP model's output carries (or leaves out): accepted
    assert list(DeGLALoss(num_negatives=0)(image, text, scale, logit_bias=None, output_dict=True)) == ["contrastive_loss"]


# ---------------------------------------------------------------- two gloo processes


def _worker(rank, init_file, out_dir):
    os.environ["TRITON_INTERPRET"] = "1"
    # open_clip.loss imports torch.distributed.nn (the module imports above, in the spawned
    # process too) before the group exists: its default group argument is then None, the current
    # default group, and nothing keeps the group alive past destroy_process_group.
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    image, text, scale, _, _ = make_inputs(B * WORLD, 0, D)
    mine = slice(rank * B, (rank + 1) * B)
    results = {}
    for backend in LOSS_BACKENDS:
        for local, with_grad in MODES:
            results[backend, local, with_grad] = _both(image[mine], text[mine], scale, backend, local_loss=local,
                                                       gather_with_grad=with_grad, rank=rank, world_size=WORLD)
    dist.destroy_process_group()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    return run_ranks(_worker, tmp_path_factory.mktemp("dist"), WORLD)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("local,with_grad", MODES, ids=[f"local{int(a)}-grad{int(b)}" for a, b in MODES])
@pytest.mark.parametrize("backend", LOSS_BACKENDS)
def test_two_processes_match_clip_loss(rank_results, backend, local, with_grad):
    for rank, results in enumerate(rank_results):
        (ours, our_grads), (theirs, their_grads) = results[backend, local, with_grad]
        assert list(ours) == list(theirs) == ["contrastive_loss"]
        assert ours["contrastive_loss"] == pytest.approx(theirs["contrastive_loss"], rel=1e-5, abs=1e-6), rank
        if (local, with_grad) in GRADS_AGREE:
            for name, got, want in zip(("image", "text", "logit_scale"), our_grads, their_grads):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6,
                                           msg=lambda m: f"rank {rank} {name}: {m}")


# ---------------------------------------------------------------- use_degla_loss / restore


def _args(**overrides):
    defaults = dict(local_loss=True, gather_with_grad=True, rank=0, world_size=1, model="ViT-B-32", siglip=False,
                    distill=False, horovod=False)
    return argparse.Namespace(**{**defaults, **overrides})


def test_use_degla_loss_replaces_create_loss_until_restored():
    import open_clip
    import open_clip.factory
    import open_clip_train.main as trainer
    from open_clip.loss import ClipLoss

    from degla_fast.integrations.open_clip import restore, use_degla_loss

    original = open_clip.factory.create_loss
    try:
        use_degla_loss(backend="torch")
        use_degla_loss(backend="reference")  # again: harmless, the newer keywords win
        for create_loss in (open_clip.create_loss, open_clip.factory.create_loss, trainer.create_loss):
            loss = create_loss(_args(rank=1, world_size=2))
            assert isinstance(loss, DeGLALoss)
            spec = loss.spec
            assert (spec.num_negatives, spec.backend, spec.local_loss, spec.gather_with_grad, loss.rank,
                    loss.world_size) == (0, "reference", True, True, 1, 2)
        from open_clip import create_loss as imported_later  # a module imported now binds ours as well

        assert isinstance(imported_later(_args()), DeGLALoss)
    finally:
        restore()
    restore()  # again: a no-op
    assert open_clip.create_loss is open_clip.factory.create_loss is trainer.create_loss is original
    assert type(open_clip.create_loss(_args())) is ClipLoss


@pytest.mark.parametrize("overrides,words", [
    (dict(siglip=True), ["--siglip", "softmax", "SigLIP"]),
    (dict(distill=True), ["--distill"]),
    (dict(model="coca_ViT-B-32"), ["CoCa"]),
])
def test_create_loss_refuses_what_is_not_a_softmax_clip_loss(overrides, words):
    from degla_fast.integrations.open_clip import degla_loss_from_args

    with pytest.raises(ConfigError) as err:
        degla_loss_from_args(_args(**overrides), num_negatives=0)
    assert all(w in str(err.value) for w in words) and "\n" not in str(err.value)


@pytest.mark.parametrize("kwargs,words", [
    (dict(rank=1), ["rank", "open_clip_train's own arguments"]),
    (dict(learning_rate=1.0), ["unknown DeGLALoss argument 'learning_rate'"]),
    (dict(num_negatives=4), ["no EMA teacher", "degla-fast train"]),
    (dict(backend="nope"), ["backend: 'nope' is not one of"]),
    (dict(igc_weight="x"), ["igc_weight: must be a number, got 'x'"]),
])
def test_use_degla_loss_checks_its_keywords_at_once(kwargs, words):
    import open_clip

    from degla_fast.integrations.open_clip import use_degla_loss

    original = open_clip.create_loss
    with pytest.raises(ConfigError) as err:
        use_degla_loss(**kwargs)
    assert all(w in str(err.value) for w in words), str(err.value)
    assert open_clip.create_loss is original  # nothing replaced


def test_a_moved_binding_is_a_clear_error(monkeypatch):
    import open_clip
    import open_clip_train.main as trainer

    from degla_fast.integrations.open_clip import restore, use_degla_loss

    monkeypatch.setattr(trainer, "create_loss", lambda args: None)  # the trainer no longer holds open_clip's
    with pytest.raises(ConfigError) as err:
        use_degla_loss()
    restore()
    assert "open_clip_train.main.create_loss is not open_clip's create_loss" in str(err.value)
    assert "open_clip_torch" in str(err.value)
    monkeypatch.undo()
    assert open_clip.create_loss is trainer.create_loss

    # A trainer whose main() no longer reaches its loss through create_loss: refused before it runs.
    from degla_fast.integrations.open_clip import run_open_clip_train

    ran = []
    monkeypatch.setattr(trainer, "main", lambda argv: ran.append(argv))
    with pytest.raises(ConfigError) as err:
        run_open_clip_train(["--help"])
    assert "open_clip_train.main.main() no longer calls create_loss" in str(err.value) and not ran
    assert open_clip.create_loss is trainer.create_loss  # restored


# ---------------------------------------------------------------- open_clip_train's own main()

TINY = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
IMAGES, BATCH = 40, 8
STEP_LINE = re.compile(r"Train Epoch: 0 \[\s*(\d+)/\d+ .*?Contrastive_loss: ([0-9.]+)")


@pytest.fixture(scope="module")
def csv_data(tmp_path_factory) -> Path:
    """A few dozen noise images with distinct captions, a CSV as open_clip_train reads it, and a
    tiny open_clip model config in a ``local-dir:`` folder (random weights, no download)."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("csv")
    gen = np.random.default_rng(0)
    (root / "images").mkdir()
    rows = ["filepath,title"]
    for i in range(IMAGES):
        path = root / "images" / f"{i}.png"
        Image.fromarray((gen.random((32, 32, 3)) * 255).astype("uint8")).save(path)
        rows.append(f"{path},a {('red', 'green', 'blue', 'yellow')[i % 4]} {('circle', 'square', 'star')[i % 3]} {i}")
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    (root / "model").mkdir()
    (root / "model" / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY}))
    return root


def _open_clip_train(module: str, data: Path, name: str, *extra: str) -> tuple[subprocess.CompletedProcess, Path]:
    args = ["--model", f"local-dir:{data / 'model'}", "--train-data", str(data / "train.csv"), "--dataset-type", "csv",
            "--csv-separator", ",", "--batch-size", str(BATCH), "--epochs", "1", "--precision", "fp32", "--seed", "0",
            "--workers", "0", "--device", "cpu", "--lr", "1e-3", "--warmup", "1", "--save-frequency", "0",
            "--zeroshot-frequency", "0", "--val-frequency", "0", "--log-every-n-steps", "1", "--report-to", "none",
            "--logs", str(data / "logs"), "--name", name, *extra]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TRITON_INTERPRET="0",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=data, env=env, capture_output=True, text=True,
                          timeout=120)
    return proc, data / "logs" / name / "out.log"


def _contrastive_losses(log: Path) -> list[tuple[int, float]]:
    return [(int(n), float(v)) for n, v in STEP_LINE.findall(log.read_text())]


@pytest.mark.timeout(300)
def test_open_clip_train_logs_the_same_losses_with_ours(csv_data):
    theirs_proc, theirs_log = _open_clip_train("open_clip_train.main", csv_data, "clip_loss")
    assert theirs_proc.returncode == 0, theirs_proc.stderr[-3000:]
    ours_proc, ours_log = _open_clip_train("degla_fast.integrations.open_clip_train", csv_data, "degla_loss")
    assert ours_proc.returncode == 0, ours_proc.stderr[-3000:]
    theirs, ours = _contrastive_losses(theirs_log), _contrastive_losses(ours_log)
    assert [n for n, _ in theirs] == [BATCH * i for i in range(1, IMAGES // BATCH + 1)]  # one line per step
    assert [n for n, _ in ours] == [n for n, _ in theirs]
    differences = [abs(a - b) for (_, a), (_, b) in zip(ours, theirs)]
    print("step, open_clip ClipLoss, DeGLALoss(num_negatives=0):",
          [(i + 1, b, a) for i, ((_, a), (_, b)) in enumerate(zip(ours, theirs))], "max |diff|", max(differences))
    assert max(differences) <= 1e-3
    assert len({v for _, v in theirs}) > 1  # it trained: the losses move
    first = ours_log.read_text().splitlines()[0]
    assert "degla-fast: open_clip_train runs with the DeGLA loss" in first
    assert "DeGLA" not in theirs_log.read_text()


@pytest.mark.timeout(120)
def test_open_clip_train_siglip_is_one_line(csv_data):
    proc, _ = _open_clip_train("degla_fast.integrations.open_clip_train", csv_data, "siglip", "--siglip")
    assert proc.returncode == 2
    # (open_clip_train sets every logger to INFO: torch's own exit statistics may follow the line)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("degla-fast: error:")]
    assert len(errors) == 1 and errors[0].startswith("degla-fast: error: --siglip:") and "softmax" in errors[0]
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------- DeGLA by flags: negatives and the EMA teacher

NEG_ROWS, NEG_K = 16, 4
COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (200, 30, 200), (30, 200, 200),
           (120, 120, 120), (250, 250, 250)]
TERMS = ("Contrastive_loss", "Igc_loss", "Tgc_loss", "Distill_loss")
TERM_LINE = re.compile(r"Train Epoch: (\d+) \[\s*(\d+)/\d+ .*?" + r".*?".join(rf"{t}: ([0-9.e+-]+)" for t in TERMS))
WORKER = Path(__file__).with_name("open_clip_train_worker.py")


@pytest.fixture(scope="module")
def neg_data(tmp_path_factory) -> Path:
    """Uniform-colour images (any crop of one is the same image, so open_clip_train's per-rank
    augmentation seeds cannot make one process and two differ), a CSV with a column of 5 hard
    negatives per caption (``neg``, joined by ``|``), its first 8 rows as ``eight.csv``, and the tiny model."""
    from PIL import Image

    root = tmp_path_factory.mktemp("neg")
    (root / "images").mkdir()
    colours, shapes = ("red", "green", "blue", "yellow", "pink", "cyan", "grey", "white"), ("circle", "square")
    rows = ["filepath,title,neg"]
    for i in range(NEG_ROWS):
        path = root / "images" / f"{i}.png"
        Image.new("RGB", (32, 32), COLOURS[i % 8]).save(path)
        colour, shape = colours[i % 8], shapes[i // 8]
        negatives = [f"a {c} {shape}" for c in colours if c != colour][:5]
        rows.append(f"{path},a {colour} {shape},{'|'.join(negatives)}")
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    (root / "eight.csv").write_text("\n".join(rows[:9]) + "\n")
    (root / "short.csv").write_text("\n".join(rows[:3] + [rows[3].rsplit("|", 3)[0]] + rows[4:6]) + "\n")
    (root / "model").mkdir()
    (root / "model" / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY}))
    return root


def _launch(data: Path, name: str, *extra: str, csv: str = "train.csv", batch: int = 4, epochs: int = 1,
            world: int = 1) -> tuple[list[subprocess.CompletedProcess], Path]:
    """The launcher through tests/open_clip_train_worker.py, in ``world`` gloo processes."""
    import socket

    args = ["--model", f"local-dir:{data / 'model'}", "--train-data", str(data / csv), "--dataset-type", "csv",
            "--csv-separator", ",", "--batch-size", str(batch), "--epochs", str(epochs), "--precision", "fp32",
            "--seed", "0", "--workers", "0", "--device", "cpu", "--lr", "1e-3", "--warmup", "1",
            "--save-frequency", "1", "--zeroshot-frequency", "0", "--val-frequency", "0", "--log-every-n-steps", "1",
            "--report-to", "none", "--logs", str(data / "logs"), "--name", name, *extra]
    out = data / "logs" / name
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TRITON_INTERPRET="0",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if world > 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world))
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(out), *args], cwd=data, text=True,
                              env=dict(env, **({"RANK": str(r), "LOCAL_RANK": str(r)} if world > 1 else {})),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for r in range(world)]
    done = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=240)
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    return done, out


def _terms(log: Path) -> list[tuple[int, int, list[float]]]:
    """(epoch, samples seen, [contrastive, igc, tgc, distill]) of each step line."""
    return [(int(m[0]), int(m[1]), [float(v) for v in m[2:]]) for m in TERM_LINE.findall(log.read_text())]


@pytest.mark.timeout(400)
def test_open_clip_train_with_negatives_logs_the_terms_saves_and_resumes_the_teacher(neg_data):
    flags = ["--num-negatives", str(NEG_K), "--csv-hard-captions-key", "neg", "--ema-decay", "0.9"]
    (proc,), out = _launch(neg_data, "k4", *flags)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (out / "out.log").read_text()
    print("\n".join(line for line in log.splitlines() if "degla-fast" in line or "Train Epoch" in line))
    assert f"{NEG_K} hard negatives per caption from the column 'neg'" in log.splitlines()[0]
    steps = _terms(out / "out.log")
    assert [(e, n) for e, n, _ in steps] == [(0, 4 * i) for i in range(1, NEG_ROWS // 4 + 1)]  # every step, all four
    assert all(v[0] > 0 and v[1] > 0 and v[2] > 0 for _, _, v in steps)
    # The teacher is the student at the first step (distillation 0), then lags behind it.
    assert steps[0][2][3] < 1e-9 and all(v[3] > 1e-6 for _, _, v in steps[1:])
    losses = json.loads((out / "losses-rank0.json").read_text())
    assert len(losses) == len(steps) and list(losses[0]) == ["contrastive_loss", "igc_loss", "tgc_loss",
                                                                "distill_loss"]

    checkpoint = torch.load(out / "checkpoints" / "epoch_1.pt", weights_only=False)
    teacher, student = checkpoint["optimizer"]["degla_teacher"], checkpoint["state_dict"]
    assert set(teacher) == set(student)  # the teacher's full state, beside a plain open_clip model
    assert any(not torch.equal(teacher[k], student[k]) for k in student)
    import open_clip

    open_clip.create_model(f"local-dir:{neg_data / 'model'}").load_state_dict(student)  # loads as open_clip's own

    (proc,), _ = _launch(neg_data, "k4", *flags, "--resume", "latest", epochs=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (out / "out.log").read_text()
    assert f"degla-fast: EMA teacher restored from {out / 'checkpoints' / 'epoch_1.pt'}" in log
    resumed = [s for s in _terms(out / "out.log") if s[0] == 1]
    assert len(resumed) == NEG_ROWS // 4
    assert resumed[0][2][3] > 1e-6  # the restored teacher, not a fresh copy of the student (distillation 0)
    final = torch.load(out / "checkpoints" / "epoch_2.pt", weights_only=False)["optimizer"]["degla_teacher"]
    assert any(not torch.equal(final[k], teacher[k]) for k in teacher)  # it followed the student further


@pytest.mark.timeout(400)
def test_two_gloo_ranks_compute_the_loss_of_one_process_on_the_whole_batch(neg_data):
    # SGD (timm's, through open_clip_train's --opt): its step is linear in the gradient, so equal
    # weights after it mean equal gradients (AdamW's first step is about lr * sign(gradient), which
    # turns float noise in a gradient that is 0 in exact arithmetic, a key bias's, into +-lr). No weight
    # decay: timm reads the model's no_weight_decay() list, which the DDP wrapper of two ranks hides.
    flags = ["--num-negatives", str(NEG_K), "--csv-hard-captions-key", "neg", "--local-loss", "--gather-with-grad",
             "--opt", "timm/sgd", "--lr", "1.0", "--wd", "0"]
    (single,), single_out = _launch(neg_data, "one", *flags, csv="eight.csv", batch=8)
    assert single.returncode == 0, single.stderr[-3000:]
    ranks, ranks_out = _launch(neg_data, "two", *flags, csv="eight.csv", batch=4, world=2)
    assert [p.returncode for p in ranks] == [0, 0], ranks[0].stderr[-2000:] + ranks[1].stderr[-2000:]
    assert "Running in distributed mode" in (ranks_out / "out.log").read_text()
    one = json.loads((single_out / "losses-rank0.json").read_text())
    two = [json.loads((ranks_out / f"losses-rank{r}.json").read_text()) for r in range(2)]
    assert len(one) == len(two[0]) == len(two[1]) == 1
    # --local-loss: each rank's terms are the means over its own anchors; their mean is the whole batch's.
    for name, value in one[0].items():
        assert (two[0][0][name] + two[1][0][name]) / 2 == pytest.approx(value, rel=1e-5, abs=1e-7), name
    # (and not one rank's copy of the whole batch's loss)
    assert two[0][0]["contrastive_loss"] != pytest.approx(two[1][0]["contrastive_loss"], rel=1e-3)
    # ... and the gradient: one optimiser step gives the same student and teacher.
    a = torch.load(single_out / "checkpoints" / "epoch_1.pt", weights_only=False)
    b = torch.load(ranks_out / "checkpoints" / "epoch_1.pt", weights_only=False)
    b_state = {k.removeprefix("module."): v for k, v in b["state_dict"].items()}
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(b_state[key], value, rtol=1e-4, atol=1e-6, msg=lambda m: f"{key}: {m}")
    for key, value in a["optimizer"]["degla_teacher"].items():
        torch.testing.assert_close(b["optimizer"]["degla_teacher"][key], value, rtol=1e-4, atol=1e-6)


K4 = ["--num-negatives", "4", "--csv-hard-captions-key", "neg"]


@pytest.mark.parametrize("argv,start", [
    (["--siglip"], "--siglip: the DeGLA loss is softmax-based"),
    (["--distill"], "--distill: open_clip's distillation from another model"),
    (["--distill=1"], "--distill: open_clip's distillation from another model"),
    (["--distill-model", "ViT-B-32", "--distill-pretrained", "openai"], "--distill: open_clip's distillation"),
    (["--horovod"], "--horovod: the DeGLA loss gathers with torch.distributed only"),
    (["--model", "coca_ViT-B-32"], "--model coca_ViT-B-32: CoCa's captioning loss is not supported"),
    ([*K4, "--dataset-type", "webdataset"], "--dataset-type webdataset: open_clip_train's webdataset batches carry no"),
    ([*K4, "--dataset-type", "auto", "--train-data", "shards-{000..001}.tar"], "--dataset-type webdataset:"),
    ([*K4, "--dataset-type", "synthetic"], "--dataset-type synthetic: open_clip_train's synthetic batches carry no"),
    (["--num-negatives", "4"], "--num-negatives 4: needs --csv-hard-captions-key COL"),
    ([*K4, "--accum-freq", "2"], "--accum-freq 2: open_clip_train's accumulation"),
    ([*K4, "--torchcompile"], "--torchcompile: not supported with --num-negatives 4"),
    (["--igc-weight", "-1"], "--igc-weight: igc_weight: must be >= 0.0, got -1.0"),
    (["--num-negatives", "-1"], "--num-negatives: num_negatives: must be >= 0, got -1"),
    ([*K4, "--ema-decay", "1.5"], "--ema-decay: decay must be in [0, 1]"),
], ids=lambda v: " ".join(v)[:40] if isinstance(v, list) else None)
def test_launcher_refuses_in_one_line_before_training(argv, start, capsys, monkeypatch):
    import open_clip_train.main as trainer

    from degla_fast.integrations.open_clip_train import main

    monkeypatch.setattr(trainer, "main", lambda argv: pytest.fail("open_clip_train's main() ran"))
    base = ["--train-data", "train.csv", "--dataset-type", "csv"] if "--dataset-type" not in argv else []
    assert main([*base, *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"degla-fast: error: {start}"), err


@pytest.mark.timeout(120)
def test_launcher_distill_is_the_documented_line_not_argparse(csv_data):
    proc, _ = _open_clip_train("degla_fast.integrations.open_clip_train", csv_data, "distill", "--distill")
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("degla-fast: error:")]
    assert errors == [f"degla-fast: error: {REFUSAL_DISTILL}"], proc.stderr[-2000:]
    assert "ambiguous option" not in proc.stderr and "usage:" not in proc.stderr and "Traceback" not in proc.stderr


REFUSAL_DISTILL = ("--distill: open_clip's distillation from another model (--distill-model, --distill-pretrained) is "
                   "not supported with the DeGLA loss; DeGLA's own self-distillation toward the EMA teacher is "
                   "--distill-weight")


@pytest.mark.timeout(120)
def test_a_record_with_fewer_negatives_is_one_line_naming_file_and_line(neg_data):
    (proc,), _ = _launch(neg_data, "short", *K4, csv="short.csv")
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("degla-fast: error:")]
    short = neg_data / "short.csv"
    assert errors == [f"degla-fast: error: {short}: 1 of 5 records have fewer than 4 negatives (num_negatives=4; "
                      f"first: {short}:4 with 2)"], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_launcher_flags_take_their_defaults_from_the_loss_spec():
    from degla_fast import LossSpec
    from degla_fast.integrations.open_clip_train import split_args

    ours, rest = split_args(["--model", "m", "--igc-weight", "0.3", "--lr", "1e-3", "--loss-backend", "torch"])
    assert rest == ["--model", "m", "--lr", "1e-3"]
    spec = LossSpec()
    assert (ours.num_negatives, ours.igc_weight, ours.tgc_weight, ours.distill_weight, ours.tgc_scale, ours.backend,
            ours.official_tgc_indexing) == (0, 0.3, spec.tgc_weight, spec.distill_weight, spec.tgc_scale, "torch",
                                            spec.official_tgc_indexing)
    assert ours.csv_negatives_separator == "|" and ours.ema_decay == 0.9996


def test_launcher_help_lists_our_flags_then_open_clip_trains(capsys):
    from degla_fast.integrations.open_clip_train import LOSS_FLAGS, main

    with pytest.raises(SystemExit) as done:  # open_clip_train's own parser prints its help and exits
        main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    ours = out.index("--csv-hard-captions-key")
    assert all(0 <= out.index(flag) < out.index("--train-data") for flag in [*LOSS_FLAGS.values(), "--ema-decay"])
    assert ours < out.index("--train-data") and "weight of the image-grounded contrast (IGC) (default: 0.1)" in " ".join(
        out.split())
