"""No checkpoint a user is handed runs code: every entry point that reads a ``.pt`` file
(``eval --model``, ``train --pretrained``, ``train --resume``, ``export``) uses the safe loader,
refuses a pickle with a payload in one line with exit status 2, and never retries unsafely."""
from __future__ import annotations

import os
import pickle

import pytest
import torch

from degla_fast.cli import main
from degla_fast.errors import DataError
from degla_fast.model import read_checkpoint
from degla_fast import checkpoint as ckpt


class Payload:
    """Unpickling this runs ``touch MARKER``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def evil_files(folder, marker):
    """Three ways to ship the payload: torch.save's zip format inside a checkpoint-looking dict,
    a plain state dict with one poisoned entry, and a bare pickle (torch's legacy format)."""
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint = folder / "checkpoint.pt"
    torch.save({"format": "degla-fast/checkpoint", "version": 1, "model_name": "degla-tiny",
                "student": {"w": torch.zeros(2)}, "optimizer": {}, "step": 1, "epoch": 0, "batch": 0,
                "rng": [Payload(marker)]}, checkpoint)
    state_dict = folder / "weights.pt"
    torch.save({"visual.conv1.weight": torch.zeros(1), "logit_scale": Payload(marker)}, state_dict)
    bare = folder / "bare.pt"
    bare.write_bytes(pickle.dumps(Payload(marker), protocol=2))
    return [checkpoint, state_dict, bare]


def entry_points(tmp_path, evil):
    data = tmp_path / "train.json"
    data.write_text("[]")
    return {
        "eval --model": ["eval", "--model", str(evil), "--benchmark", "sugarcrepe", "--data", str(tmp_path),
                         "--device", "cpu", "--workers", "0"],
        "train --pretrained": ["train", "--data", str(data), "--output", str(tmp_path / "run-p"), "--model",
                               "degla-tiny", "--pretrained", str(evil), "--device", "cpu", "--no-progress"],
        "train --resume": ["train", "--data", str(data), "--output", str(tmp_path / "run-r"), "--model",
                           "degla-tiny", "--pretrained", "none", "--resume", str(evil), "--device", "cpu",
                           "--no-progress"],
        "export": ["export", str(evil), str(tmp_path / "out.pt")],
    }


ENTRY_POINTS = ["eval --model", "train --pretrained", "train --resume", "export"]


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("kind", [0, 1, 2], ids=["checkpoint", "state-dict", "bare-pickle"])
def test_a_payload_pickle_is_refused_in_one_line_and_never_runs(entry, kind, tmp_path, capsys):
    marker = tmp_path / "PAYLOAD-RAN"
    evil = evil_files(tmp_path / "evil", marker)[kind]
    argv = entry_points(tmp_path, evil)[entry]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert not marker.exists(), "the pickle's payload ran"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert str(evil) in lines[0] and "refused by the safe loader" in lines[0], lines[0]
    assert not (tmp_path / "out.pt").exists()


def test_the_refusal_names_what_the_pickle_asked_for(tmp_path):
    marker = tmp_path / "PAYLOAD-RAN"
    checkpoint, _, _ = evil_files(tmp_path, marker)
    with pytest.raises(DataError, match=r"refused by the safe loader.*system"):
        read_checkpoint(checkpoint)
    with pytest.raises(DataError, match="refused"):
        ckpt.load_checkpoint(checkpoint)
    assert not marker.exists()


def test_rng_states_round_trip_through_the_safe_loader(tmp_path):
    import random

    import numpy as np

    random.seed(5), np.random.seed(6), torch.manual_seed(7)
    random.random(), np.random.standard_normal()  # a cached NumPy Gaussian is part of the state
    saved = ckpt.rng_state()
    path = ckpt.save_checkpoint(tmp_path, {"step": 3, "rng": [saved], "student": {}, "optimizer": {},
                                           "epoch": 0, "batch": 0, "extra": np.float32(1.5),
                                           "array": np.arange(3), "where": tmp_path}, keep_last=2)
    expected = (random.random(), np.random.standard_normal(), np.random.rand(), torch.rand(3))
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert state["extra"] == 1.5 and torch.equal(state["array"], torch.arange(3)) and state["where"] == str(tmp_path)
    ckpt.set_rng_state(ckpt.load_checkpoint(path)["rng"][0])
    again = (random.random(), np.random.standard_normal(), np.random.rand(), torch.rand(3))
    assert expected[:3] == again[:3] and torch.equal(expected[3], again[3])


def test_a_payload_the_safe_loader_would_refuse_is_never_written(tmp_path):
    with pytest.raises(TypeError, match="Payload"):
        ckpt.save_checkpoint(tmp_path, {"step": 1, "rng": [Payload(tmp_path / "x")]}, keep_last=1)
    assert not list(tmp_path.iterdir())
