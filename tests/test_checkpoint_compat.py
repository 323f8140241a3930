"""Checkpoints written before the checkpoint map (commit fd64387's trainer) still resume, exactly,
and the current trainer writes the same file: same keys, same values.

No binary is committed: the test exports fd64387's tree (``git archive``), imports it as its
setup.py installs it (benchmarks/gpu_check.py's import finder, written into a folder of the
test's own) and runs its trainer in a subprocess. Skipped where the git history is unavailable
(a shallow clone, a source archive)."""
from __future__ import annotations

import copy
import io
import json
import random
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from degla_fast.train import loop
from degla_fast.train import main as train_main
from degla_fast.train.metrics import read_metrics
from test_train import LOSS_KEYS, base_args, synth  # noqa: F401 (synth: the fixture)

import gpu_check  # benchmarks/, on the path by pytest.ini

REPO = Path(__file__).resolve().parents[1]

#: The last commit whose trainer wrote checkpoints without the map (degla_fast/train/checkpoint_map.py).
BEFORE_THE_MAP = "fd64387"

# Runs fd64387's trainer: the finder first (it maps degla_fast and degla_fast.kernels to the
# exported tree, ahead of this checkout's editable install), then its command line.
_BOOTSTRAP = """import sys
sys.path.insert(0, sys.argv[1])
import _degla_fast_checkout, degla_fast
print("degla_fast from", degla_fast.__file__, flush=True)
from degla_fast.train.main import main
raise SystemExit(main(sys.argv[2:]))
"""


def _export(commit: str, into: Path) -> Path:
    """``commit``'s tree under ``into``; skips the test when git or the commit is unavailable."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed: cannot export the checkpoint-writing commit")
    found = subprocess.run(["git", "-C", str(REPO), "cat-file", "-e", f"{commit}^{{commit}}"], capture_output=True)
    if found.returncode != 0:
        pytest.skip(f"commit {commit} is not in this checkout's git history (a shallow clone or a source archive)")
    tar = subprocess.run(["git", "-C", str(REPO), "archive", commit], capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        archive.extractall(into, filter="data")
    return into


def _train_with(tree: Path, site: Path, args: list[str]) -> None:
    """``degla-fast train args`` with the code of ``tree``, in a subprocess."""
    gpu_check.install_project(tree, site)
    proc = subprocess.run([sys.executable, "-c", _BOOTSTRAP, str(site), *args], capture_output=True, text=True,
                          cwd=site, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"degla_fast from {tree / 'degla_fast' / '__init__.py'}" in proc.stdout  # not this checkout's


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _assert_same(a, b, where: str) -> None:
    """``a`` and ``b`` equal all the way down: tensors bit for bit, containers key for key."""
    assert type(a) is type(b), (where, type(a), type(b))
    if torch.is_tensor(a):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), (where, list(a), list(b))
        for key in a:
            _assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def _restored_at_start(monkeypatch) -> dict:
    """What the run holds when its loop starts (filled in by the patched loop)."""
    seen: dict = {}
    real = loop._train_loop

    def first_look(trainer):
        # Copies: the loop then trains the live tensors on.
        seen.update(start=trainer.start, student=copy.deepcopy(trainer.student.state_dict()),
                    teacher=trainer.parts.teacher.state_dict(),
                    optimizer=copy.deepcopy(trainer.parts.optimizer.state_dict()),
                    torch=torch.get_rng_state(), python=random.getstate(), numpy=np.random.get_state(legacy=True))
        return real(trainer)

    monkeypatch.setattr(loop, "_train_loop", first_look)
    return seen


def _as_keyed_by(new: dict, old: dict) -> dict:
    """``new`` restricted, section by section, to the keys ``old`` has (a configuration field added
    since, such as ``data.image_cache_mib``, is this run's own)."""
    return {k: _as_keyed_by(new[k], v) if isinstance(v, dict) and isinstance(new[k], dict) else new[k]
            for k, v in old.items()}


def _check_restored(seen: dict, old: dict) -> None:
    assert seen["start"] == (old["step"], old["epoch"], old["batch"]) == (2, 0, 2)
    for key, value in old["student"].items():
        assert torch.equal(seen["student"][key], value), key
    for key, value in old["teacher"].items():
        assert torch.equal(seen["teacher"][key], value), key
    _assert_same(seen["optimizer"]["state"], old["optimizer"]["state"], "optimizer state")
    assert seen["optimizer"]["param_groups"] == old["optimizer"]["param_groups"]
    rng = old["rng"][0]
    assert torch.equal(seen["torch"], rng["torch"])
    assert seen["python"][1] == tuple(rng["python"]["state"].tolist())
    assert np.array_equal(seen["numpy"][1], rng["numpy"]["key"].numpy()) and seen["numpy"][2] == rng["numpy"]["pos"]


@pytest.mark.timeout(900)
def test_a_checkpoint_written_before_the_map_resumes_exactly_and_is_written_the_same(synth, tmp_path,  # noqa: F811
                                                                                    monkeypatch):
    tree = _export(BEFORE_THE_MAP, tmp_path / "tree")
    old_out, resumed = tmp_path / "old", tmp_path / "resumed"
    _train_with(tree, tmp_path / "site", base_args(synth, old_out, "--max-steps", "4", "--save-every", "2"))
    old_2, old_4 = (_load(old_out / "checkpoints" / f"step_0000000{s}.pt") for s in (2, 4))

    # The current trainer resumes fd64387's step-2 checkpoint ...
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copy(old_out / "checkpoints" / "step_00000002.pt", resumed / "checkpoints")
    (resumed / "checkpoints" / "latest").write_text("step_00000002.pt\n")
    rows = read_metrics(old_out / "metrics.jsonl")
    (resumed / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    seen = _restored_at_start(monkeypatch)
    assert train_main.main(base_args(synth, resumed, "--max-steps", "4", "--save-every", "2",
                                     "--resume", "latest")) == 0
    # ... with every part restored: position, RNG, weights, teacher, optimiser ...
    _check_restored(seen, old_2)
    # ... and trains on as fd64387's run did (the schedule and the data order too) ...
    again = read_metrics(resumed / "metrics.jsonl")
    assert [r["step"] for r in again] == [1, 2, 3, 4]
    for a, b in zip(rows, again):
        assert {k: a[k] for k in LOSS_KEYS} == {k: b[k] for k in LOSS_KEYS}, a["step"]
    # ... to a step-4 checkpoint with fd64387's keys and values (the config's output and resume
    # aside: this run's own; a field added since may join the config).
    new_4 = _load(resumed / "checkpoints" / "step_00000004.pt")
    assert sorted(new_4) == sorted(old_4)
    old_config, new_config = old_4.pop("config"), new_4.pop("config")
    for key in ("output", "resume"):
        old_config.pop(key), new_config.pop(key)
    _assert_same(_as_keyed_by(new_config, old_config), old_config, "config")
    # The torch generator drew once more in the resumed run (the data loader's base seed, as its
    # iterator starts): its state is the same tensor, at another place in the stream.
    old_torch, new_torch = old_4["rng"][0].pop("torch"), new_4["rng"][0].pop("torch")
    assert old_torch.shape == new_torch.shape and old_torch.dtype == new_torch.dtype
    _assert_same({k: new_4[k] for k in old_4}, old_4, "checkpoint")
