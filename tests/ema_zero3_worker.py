"""One rank of the ZeRO-3 EMA check (run by tests/test_ema_zero3.py under torchrun, 2 CPU
processes, gloo): a sharded teacher, updated with no communication, gathered back after a
few optimiser steps equals the replicated float64 computation from the gathered masters."""
from __future__ import annotations

import os
import sys

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param

from degla_fast.ema import EMATeacher, ShardedEMATeacher
from degla_fast.errors import ConfigError

DECAY = 0.6
COLLECTIVES = ("all_gather", "all_gather_into_tensor", "all_reduce", "broadcast", "reduce_scatter_tensor",
               "reduce_scatter", "send", "recv", "isend", "irecv", "barrier")


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = torch.nn.Linear(6, 33)       # odd sizes: shards end inside a parameter
        self.norm = torch.nn.LayerNorm(33)
        self.out = torch.nn.Linear(33, 5)
        self.register_buffer("offset", torch.arange(5.0))

    def forward(self, x):
        return self.out(torch.tanh(self.norm(self.inp(x)))) + self.offset


def gathered_masters(module):
    """Full fp32 master weights (a collective), float64."""
    return {n: safe_get_full_fp32_param(p).double().clone() for n, p in module.named_parameters()}


def main() -> int:
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    student = Net()
    config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 3}, "steps_per_print": 10 ** 9}
    engine, _, _, _ = deepspeed.initialize(model=student, optimizer=torch.optim.AdamW(student.parameters(), lr=0.05),
                                           config=config)
    try:  # a replica of a partitioned student would silently hold empty tensors
        EMATeacher(engine.module)
        raise AssertionError("EMATeacher accepted ZeRO-3 partitions")
    except ConfigError as err:
        assert "from_deepspeed" in str(err)
    torch.manual_seed(1)  # a different initialisation: the teacher must start as the student
    for bad in (dict(dtype=torch.bfloat16), dict(forward_dtype=torch.bfloat16)):
        try:  # the EMA state is fp32 and a sharded teacher has no 16-bit forward copy (raised before any collective)
            EMATeacher.from_deepspeed(engine, Net(), decay=DECAY, backend="triton", **bad)
            raise AssertionError(f"a ZeRO-3 teacher accepted {bad}")
        except ConfigError as err:
            assert "fp32" in str(err) or "autocast" in str(err), err
    teacher = EMATeacher.from_deepspeed(engine, Net(), decay=DECAY, backend="triton")
    assert isinstance(teacher, ShardedEMATeacher)
    assert teacher.dtype == torch.float32 and all(s.dtype == torch.float32 for s in teacher._shards)
    rank = dist.get_rank()
    full = sum(p.ds_numel for p in teacher.module.parameters())
    local = sum(p.ds_tensor.numel() for p in teacher.module.parameters())
    assert local < full, (local, full)  # partitioned, not replicated

    expected = gathered_masters(engine.module)
    torch.manual_seed(100 + rank)
    for _ in range(3):
        x = torch.randn(4, 6)
        loss = engine(x).pow(2).mean()
        engine.backward(loss)
        engine.step()
        saved = {name: getattr(dist, name) for name in COLLECTIVES}
        try:
            for name in COLLECTIVES:  # any communication inside update() fails the test
                setattr(dist, name, lambda *a, _n=name, **k: (_ for _ in ()).throw(AssertionError(f"{_n} in update")))
            teacher.update(engine.module)
        finally:
            for name, fn in saved.items():
                setattr(dist, name, fn)
        masters = gathered_masters(engine.module)
        expected = {n: e + (1 - DECAY) * (masters[n] - e) for n, e in expected.items()}

    state = teacher.state_dict()
    for name, value in expected.items():
        torch.testing.assert_close(state[name].double(), value, rtol=1e-6, atol=1e-6, msg=name)
        assert not torch.allclose(state[name].double(), masters[name]), name  # it did lag the student
    assert torch.equal(state["offset"], torch.arange(5.0))

    # The teacher's forward gathers its shards through DeepSpeed's hooks: it must equal a plain
    # module holding the replicated weights.
    plain = Net()
    plain.load_state_dict({k: v.float() for k, v in expected.items()} | {"offset": torch.arange(5.0)})
    x = torch.randn(3, 6)
    with torch.no_grad():
        torch.testing.assert_close(teacher.module(x), plain(x), rtol=1e-5, atol=1e-6)

    # load_state_dict: every rank keeps its slice, and state_dict gathers it back.
    shifted = {k: v + 1.0 for k, v in state.items()}
    teacher.load_state_dict(shifted)
    again = teacher.state_dict()
    for k, v in shifted.items():
        assert torch.equal(again[k], v), k
    if rank == 0:
        print("EMA-ZERO3-OK")
    return 0


if __name__ == "__main__":
    code = main()
    # Leave deterministically: with DeepSpeed's CPU backend, threads torn down during interpreter
    # shutdown occasionally end a finished rank in std::terminate (SIGABRT) after its work is done.
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
