"""One rank of the ZeRO-3 EMA checks (run by tests/test_ema_zero3.py under torchrun, 2 CPU
processes, gloo). Two engines over the same small model (odd sizes, LayerNorm, a 0-d logit_scale):

1. No persistence, an fp32 teacher: the sharded teacher, updated with no communication at all,
   gathered back after a few optimiser steps equals the replicated float64 computation from the
   gathered masters; its forward equals a plain module's; state_dict/load_state_dict round-trip.
2. ``stage3_param_persistence_threshold: 40`` (biases, LayerNorm, logit_scale persisted; the two
   weight matrices not): a bf16-forward teacher and an fp32 teacher on the same engine, following
   the same student trajectory as replicated ``EMATeacher``s fed the gathered fp32 masters.
   Checked after every step: the student's gathered (persisted) logit_scale, which its forward
   reads, obeys the clamp; ``update()`` communicates once (one coalesced all-gather of the
   persisted parameters); the persisted parameters hold the new EMA values; the forwards equal the
   replicated teachers' (bit for bit: the same fp32 state, the same bf16 copy, the same kernels)
   and the bf16 forward is within BF16_TOL of the fp32 one; the gathered teacher logit_scale is
   under the clamp; a skipped update (apply 0) changes nothing.
"""
from __future__ import annotations

import math
import os
import sys

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
from deepspeed.utils import safe_get_full_fp32_param

from degla_fast.compat.deepspeed import zero_dim_safe_broadcasts
from degla_fast.ema import EMATeacher, ShardedEMATeacher, Teacher
from degla_fast.errors import ConfigError
from degla_fast.train.distributed import clamp_logit_scale_deepspeed, wrap_deepspeed

DECAY = 0.6
MAX_SCALE = math.log(100.0)
MAX_FP32 = torch.tensor(MAX_SCALE).item()  # the clamp's bound as an fp32 value (rounds up from ln 100)
#: bf16 teacher forward vs the fp32 teacher's on the same EMA state, as a relative error of the whole
#: output (||bf16 - fp32|| / ||fp32||): bf16 keeps 8 significant bits (2^-9 relative rounding per
#: weight and activation); logit_scale ~ 4.6 in bf16 is off by up to 2^-6, which alone moves
#: exp(logit_scale), a factor of every output, by up to 1.6 % (measured here: up to 2.6 %).
BF16_REL_TOL = 5e-2
PERSISTED = {"inp.bias", "norm.weight", "norm.bias", "out.bias", "logit_scale"}  # numel <= 40
COLLECTIVES = ("all_gather", "all_gather_into_tensor", "_all_gather_base", "all_reduce", "broadcast",
               "reduce_scatter_tensor", "reduce_scatter", "send", "recv", "isend", "irecv", "barrier",
               "all_to_all_single", "inference_all_reduce", "all_reduce_coalesced")


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = torch.nn.Linear(6, 33)       # odd sizes: shards end inside a parameter
        self.norm = torch.nn.LayerNorm(33)
        self.out = torch.nn.Linear(33, 5)
        self.logit_scale = torch.nn.Parameter(torch.tensor(4.58))  # 0-d, close under ln 100
        self.register_buffer("offset", torch.arange(5.0))

    def forward(self, x):
        return (self.out(torch.tanh(self.norm(self.inp(x)))) + self.offset) * self.logit_scale.exp()


def gathered_masters(module, dtype=torch.float64):
    """Full fp32 master weights (a collective)."""
    return {n: safe_get_full_fp32_param(p).to(dtype).clone() for n, p in module.named_parameters()}


class CountCollectives:
    """Within: every collective (torch.distributed's and DeepSpeed's backend's) is counted by name."""

    def __enter__(self):
        from deepspeed.comm import comm as ds_comm

        self.calls, self.bytes, self._saved = [], [], []  # bytes: the largest tensor of each call
        for owner in (dist, ds_comm.cdb):
            for name in COLLECTIVES:
                fn = getattr(owner, name, None)
                if fn is None:
                    continue
                self._saved.append((owner, name, owner.__dict__.get(name, None), name in owner.__dict__))

                def counted(*a, _fn=fn, _n=name, **k):
                    self.calls.append(_n)
                    tensors = [t for t in (*a, *k.values()) if isinstance(t, torch.Tensor)]
                    self.bytes.append(max((t.numel() * t.element_size() for t in tensors), default=0))
                    return _fn(*a, **k)

                setattr(owner, name, counted)
        return self

    def __exit__(self, *exc):
        for owner, name, fn, own in reversed(self._saved):
            if own:
                setattr(owner, name, fn)
            else:
                delattr(owner, name)


def engine_for(threshold: int, lr: float):
    torch.manual_seed(0)
    student = Net()
    config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "steps_per_print": 10 ** 9,
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": threshold}}
    return wrap_deepspeed(student, torch.optim.AdamW(student.parameters(), lr=lr), config)


def sharded(engine, **kwargs) -> ShardedEMATeacher:
    torch.manual_seed(1)  # a different initialisation: the teacher must start as the student
    with zero_dim_safe_broadcasts():
        teacher = EMATeacher.from_deepspeed(engine, Net(), decay=DECAY, backend="triton", **kwargs)
    assert isinstance(teacher, ShardedEMATeacher) and isinstance(teacher, Teacher)
    return teacher


def check_unpersisted_fp32(rank: int) -> None:
    engine = engine_for(threshold=0, lr=0.05)
    try:  # a replica of a partitioned student would silently hold empty tensors
        EMATeacher(engine.module)
        raise AssertionError("EMATeacher accepted ZeRO-3 partitions")
    except ConfigError as err:
        assert "from_deepspeed" in str(err)
    try:  # the EMA state is fp32; a forward copy is bf16/fp16 (raised before any collective)
        sharded(engine, forward_dtype=torch.float64)
        raise AssertionError("a ZeRO-3 teacher accepted forward_dtype=torch.float64")
    except ConfigError as err:
        assert "forward_dtype" in str(err), err
    teacher = sharded(engine)
    assert teacher.dtype == torch.float32 and teacher.forward_dtype is None and not teacher.persisted
    assert all(s.dtype == torch.float32 for s in teacher.shards)
    assert all(p.ds_tensor.dtype == torch.float32 for p in teacher.module.parameters())
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
        with CountCollectives() as counted:
            teacher.update(engine.module)
        assert counted.calls == [], counted.calls  # nothing persisted: the update communicates nothing
        masters = gathered_masters(engine.module)
        expected = {n: e + (1 - DECAY) * (masters[n] - e) for n, e in expected.items()}

    state = teacher.state_dict()
    assert set(state) == set(teacher.module.state_dict()) and all(v.device.type == "cpu" for v in state.values())
    for name, value in expected.items():
        assert state[name].dtype == torch.float32, name
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


def forward(module, x, dtype):
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        return module(x).float()


def check_persisted_bf16_and_fp32(rank: int) -> None:
    engine = engine_for(threshold=40, lr=0.05)
    student = engine.module
    assert {n for n, p in student.named_parameters() if p.ds_persist} == PERSISTED
    teachers = {torch.bfloat16: sharded(engine, forward_dtype=torch.bfloat16), None: sharded(engine)}
    # The same student, replicated, fed the gathered fp32 masters: the reference trajectory.
    plain = Net()
    plain.load_state_dict({k: v.float() for k, v in gathered_masters(student).items()}
                          | {"offset": torch.arange(5.0)})
    refs = {torch.bfloat16: EMATeacher(plain, decay=DECAY, backend="triton", forward_dtype=torch.bfloat16),
            None: EMATeacher(plain, decay=DECAY, backend="triton")}
    bf16 = teachers[torch.bfloat16]
    assert bf16.forward_dtype == torch.bfloat16 and bf16.dtype == torch.float32
    assert all(s.dtype == torch.float32 for s in bf16.shards)
    assert all(s.dtype == torch.bfloat16 for s in bf16.forward_shards)
    for teacher in teachers.values():
        names = {id(p): n for n, p in teacher.module.named_parameters()}
        assert {names[id(p)] for p in teacher.persisted} == PERSISTED
        # The teacher gathers with the engine's ZeRO-3 settings (it had persistence off before).
        assert teacher._offload.param_numel_persistence_threshold == engine.zero_param_persistence_threshold() == 40
        assert teacher._offload._prefetch_bucket_sz == engine.zero_prefetch_bucket_size()
    # What DeepSpeed gathers for the bf16 teacher is bf16: half the bytes.
    assert all(p.ds_tensor.dtype == torch.bfloat16 and p.dtype == torch.bfloat16 for p in bf16.module.parameters())
    assert bf16.module.offset.dtype == torch.float32  # buffers as the student's

    probe = torch.randn(7, 6, generator=torch.Generator().manual_seed(7))  # a fixed batch, the same on both ranks
    torch.manual_seed(100 + rank)
    clamped_once, gathered_bytes = False, {}
    for step in range(4):
        x = torch.randn(4, 6)
        loss = -engine(x).pow(2).mean()  # pushes logit_scale up, past ln 100 in the first steps
        engine.backward(loss)
        engine.step()
        # DeepSpeed re-gathered the student's persisted parameters after its step: unclamped.
        clamped_once |= bool(student.logit_scale.data > MAX_FP32)
        clamp_logit_scale_deepspeed(student, MAX_SCALE)
        # The clamp reaches the gathered copy the student's forward reads, and the master.
        gathered = student.logit_scale
        assert gathered.ds_status == ZeroParamStatus.AVAILABLE and gathered.data.shape == ()
        master = safe_get_full_fp32_param(gathered)
        assert float(gathered.data) <= MAX_FP32 and float(master) <= MAX_FP32, (float(gathered.data), float(master))
        assert torch.equal(gathered.data, master.to(gathered.dtype)), (gathered.data, master)

        plain.load_state_dict({k: v.float() for k, v in gathered_masters(student).items()}
                              | {"offset": torch.arange(5.0)})
        for dtype, teacher in teachers.items():
            with CountCollectives() as counted:
                teacher.update(student)
            # The lerp communicates nothing; the refresh is one coalesced all-gather.
            assert counted.calls == ["all_gather_into_tensor"], counted.calls
            refs[dtype].update(plain)
        for dtype, teacher in teachers.items():
            ref = refs[dtype]
            params = dict(teacher.module.named_parameters())
            ref_params = dict(ref.module.named_parameters())  # the replica's forward copy (bf16) or state
            for name in PERSISTED:  # refreshed by update(): gathered, holding the new values
                p = params[name]
                assert p.ds_status == ZeroParamStatus.AVAILABLE, (step, name)
                assert p.dtype == (dtype or torch.float32)
                assert torch.equal(p.data, ref_params[name].detach()), (step, name, dtype)
            # The teacher's gathered logit_scale is under the clamp too (an EMA of clamped values).
            assert float(params["logit_scale"].data) <= MAX_FP32
            with CountCollectives() as gathers:
                got = forward(teacher.module, probe, dtype)
            gathered_bytes[dtype] = sum(gathers.bytes)
            want = forward(ref.module, probe, dtype)
            assert torch.equal(got, want), (step, dtype, (got - want).abs().max())
            state, ref_state = teacher.state_dict(), ref.state_dict()
            for name, value in ref_state.items():
                assert state[name].dtype == value.dtype and torch.equal(state[name], value), (step, name, dtype)
            # DeepSpeed releases every parameter after its module while it records the fetch order
            # (the first forward); from the second forward on the persisted ones stay gathered.
            if step > 0:
                assert all(params[name].ds_status == ZeroParamStatus.AVAILABLE for name in PERSISTED), step
        # The forwards gathered the same parameters, the bf16 teacher in half the bytes (up to
        # DeepSpeed's padding of the coalesced buffers: 744 vs 1472 bytes here).
        assert gathered_bytes[None] > 0, gathered_bytes
        assert 0.45 < gathered_bytes[torch.bfloat16] / gathered_bytes[None] <= 0.55, gathered_bytes
        low, full = forward(bf16.module, probe, torch.bfloat16), forward(teachers[None].module, probe, None)
        error = float((low - full).norm() / full.norm())
        assert 0 < error <= BF16_REL_TOL, (step, error)  # 0: the bf16 copy would not be bf16
    assert clamped_once, "the clamp had nothing to do: the test does not exercise it"
    # It lags the student (decay 0.6), as the replicas do.
    assert not torch.equal(bf16.state_dict()["inp.weight"], gathered_masters(student, torch.float32)["inp.weight"])

    # A skipped step (apply 0) moves nothing, and the persisted parameters are those of the
    # replica's forward copy after the same skipped update (the same path: under the Triton
    # interpreter its bf16 copy rounds toward zero, where torch rounds to nearest).
    state_before = bf16.state_dict()
    engine.backward(-engine(torch.randn(4, 6)).pow(2).mean())
    engine.step()
    plain.load_state_dict({k: v.float() for k, v in gathered_masters(student).items()}
                          | {"offset": torch.arange(5.0)})
    bf16.update(student, apply=torch.tensor(0.0))
    refs[torch.bfloat16].update(plain, apply=torch.tensor(0.0))
    state = bf16.state_dict()
    for k, v in state_before.items():
        assert torch.equal(state[k], v), k
    params = dict(bf16.module.named_parameters())
    replica = dict(refs[torch.bfloat16].module.named_parameters())
    for name in PERSISTED:  # refreshed from the rewritten forward copy
        assert params[name].ds_status == ZeroParamStatus.AVAILABLE
        assert params[name].dtype == torch.bfloat16 and torch.equal(params[name].data, replica[name].data), name
    assert torch.equal(forward(bf16.module, probe, torch.bfloat16),
                       forward(refs[torch.bfloat16].module, probe, torch.bfloat16))

    # load_state_dict refreshes the persisted copies and the forward copy as well.
    shifted = {k: v + 0.25 for k, v in teachers[None].state_dict().items()}
    bf16.load_state_dict(shifted)
    refs[torch.bfloat16].load_state_dict(shifted)
    params = dict(bf16.module.named_parameters())
    for name in PERSISTED:
        assert torch.equal(params[name].data, shifted[name].to(torch.bfloat16)), name
    assert torch.equal(forward(bf16.module, probe, torch.bfloat16),
                       forward(refs[torch.bfloat16].module, probe, torch.bfloat16))
    again = bf16.state_dict()
    for k, v in shifted.items():
        assert torch.equal(again[k], v), k


def main() -> int:
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    check_unpersisted_fp32(rank)
    check_persisted_bf16_and_fp32(rank)
    if rank == 0:
        print("EMA-ZERO3-OK")
    return 0


if __name__ == "__main__":
    code = main()
    # Leave deterministically: the checks do not release their engines and teachers (the trainer's
    # Run.close does; docs/training.md), so their process groups' threads would meet interpreter
    # shutdown, which occasionally ends a finished rank in std::terminate (SIGABRT).
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
