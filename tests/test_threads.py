"""The CPU thread rule (degla_fast/threads.py): asked > OMP_NUM_THREADS > cores / local processes.
benchmarks/bench_threads.py measures what it is for."""
from __future__ import annotations

import os

import pytest
import torch

from degla_fast import threads


@pytest.fixture
def machine(monkeypatch):
    """A process that may run on ``cores`` cores, started without OMP_NUM_THREADS or LOCAL_WORLD_SIZE."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)

    def with_cores(cores: int) -> None:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))

    return with_cores


def test_cores_are_shared_by_the_local_processes(machine, monkeypatch):
    machine(8)
    assert threads.choose_threads() == (8, "8 cores / 1 local process")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun --nproc_per_node 4
    assert threads.choose_threads() == (2, "8 cores / 4 local processes")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    assert threads.choose_threads()[0] == 2  # rounded down: never more threads than cores
    assert threads.choose_threads(processes=2) == (4, "8 cores / 2 local processes")  # a command's own processes
    machine(2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert threads.choose_threads() == (1, "2 cores / 8 local processes")  # at least one


def test_the_user_count_wins(machine, monkeypatch):
    machine(8)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.choose_threads() == (3, "OMP_NUM_THREADS")
    assert threads.choose_threads(5) == (5, "as asked")  # a flag or field over the environment
    monkeypatch.setenv("OMP_NUM_THREADS", "6,2")  # nested levels: the first is this process's
    assert threads.choose_threads() == (6, "OMP_NUM_THREADS")
    monkeypatch.setenv("OMP_NUM_THREADS", "many")  # not a count: the rule applies
    assert threads.choose_threads() == (2, "8 cores / 4 local processes")


def test_set_threads_sets_torch_and_says_so(machine, monkeypatch):
    machine(2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    before = torch.get_num_threads()
    try:
        assert threads.set_threads() == "1 CPU thread (2 cores / 2 local processes)"
        assert torch.get_num_threads() == 1
        assert threads.set_threads(2) == "2 CPU threads (as asked)" and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
