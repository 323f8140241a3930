"""The checkpoint map without a run: the checkpointer saves the map it is handed (the file's keys
in the map's order, the train state's at the top level) and restores it, in parts, into fresh
entries; the entries that check a fact refuse a mismatch in one line."""
from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from degla_fast.errors import ConfigError
from degla_fast.train.checkpoint_map import Absent, ModelName, OptimizerState, Record, StudentWeights, TrainState
from degla_fast.train.checkpointer import Checkpointer
from degla_fast.train.distributed import DistInfo

ONE = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def _run_map(source: Path | None, seed: int) -> tuple[dict, dict, TrainState]:
    """A small run's checkpoint map in two parts (the model's, the rest), its model seeded ``seed``."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model_states = {"model_name": ModelName("tiny", source), "pretrained": Record("a-tag"),
                    "student": StudentWeights(model, ONE, gathered=False, model_name="tiny", source=source)}
    train_state = TrainState(ONE, source)
    rest = {"train": train_state, "teacher": Absent(), "optimizer": OptimizerState(optimizer, source)}
    return model_states, rest, train_state


def test_the_map_is_saved_in_its_order_and_restored_in_parts_into_fresh_entries(tmp_path):
    model_states, rest, train_state = _run_map(None, seed=0)
    model = model_states["student"].student
    optimizer = rest["optimizer"].optimizer
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()  # momentum buffers: an optimiser state to restore
    train_state.move_to(3, 1, 2)
    random.seed(5)
    path = Checkpointer(tmp_path, None, ONE, keep_last=2).save({**model_states, **rest})
    after_save = (torch.rand(4), random.random())

    saved = torch.load(path, map_location="cpu", weights_only=True)
    assert path.name == "step_00000003.pt"
    assert list(saved) == ["format", "version", "model_name", "pretrained", "student", "step", "epoch", "batch",
                           "rng", "world_size", "teacher", "optimizer"]
    assert (saved["step"], saved["epoch"], saved["batch"], saved["world_size"]) == (3, 1, 2, 1)
    assert saved["pretrained"] == "a-tag" and saved["teacher"] is None and len(saved["rng"]) == 1

    checkpointer = Checkpointer(tmp_path, "latest", ONE, keep_last=2)
    fresh_model_states, fresh_rest, fresh_state = _run_map(checkpointer.resume_path, seed=1)
    fresh_model = fresh_model_states["student"].student
    assert not torch.equal(fresh_model.weight, model.weight)
    checkpointer.restore(fresh_model_states)  # the weights first, as before any wrapping
    for key, value in model.state_dict().items():
        assert torch.equal(fresh_model.state_dict()[key], value), key
    checkpointer.restore(fresh_rest)
    assert fresh_state.position == (3, 1, 2) and checkpointer.last_step == 3
    again = (torch.rand(4), random.random())  # the RNGs where the save left them
    assert torch.equal(again[0], after_save[0]) and again[1] == after_save[1]
    torch.testing.assert_close(fresh_rest["optimizer"].optimizer.state_dict(), optimizer.state_dict(), rtol=0,
                               atol=0)


def test_the_entries_that_check_a_fact_refuse_another_model_or_world_size_in_one_line():
    source = Path("runs/a/checkpoints/step_00000004.pt")
    with pytest.raises(ConfigError) as err:
        ModelName("degla-synth", source).load_state_dict("degla-tiny")
    assert str(err.value) == (f"resume: {source} holds a 'degla-tiny' model, this run is configured for "
                              "'degla-synth'; resume it with --model degla-tiny (model.name)")
    state = TrainState(ONE, source)
    with pytest.raises(ConfigError) as err:
        state.load_state_dict({"step": 4, "epoch": 0, "batch": 4, "rng": [None, None], "world_size": 2})
    assert str(err.value) == (f"resume: {source} was written by 2 processes, this run has 1; resume with the same "
                              f"number, or start a new run with --pretrained {source}")
    assert state.position == (0, 0, 0)  # nothing taken from a refused checkpoint
