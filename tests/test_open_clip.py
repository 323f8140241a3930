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
from degla_fast import functional as Fn
from degla_fast.backends import LOSS_BACKENDS
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
            assert (loss.num_negatives, loss.backend, loss.local_loss, loss.gather_with_grad, loss.rank,
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
    (dict(backend="nope"), ["backend must be one of"]),
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
