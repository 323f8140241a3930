"""EMA update and teacher: float64 expectations for both backends (Triton through its CPU
interpreter), in-place semantics, input errors and the EMATeacher contract."""
from __future__ import annotations

import math

import pytest
import torch

from degla_fast import EMATeacher, ema_update_
from degla_fast.errors import ConfigError, ShapeError
from degla_fast.kernels import ema as kernel
from degla_fast.ema.reference import ema_update_loop_

BACKENDS = ["torch", "triton"]
SHAPES = [(1,), (7,), (1023,), (4097,), (6, 3, 5, 5), (2, 3, 7, 11)]


def _expected(teacher, student, decay):
    """t + (1 - decay) (s - t) in float64 from the inputs as stored."""
    return [t.double() + (1.0 - decay) * (s.double() - t.double()) for t, s in zip(teacher, student)]


def _assert_matches(actual, expected, dtype):
    # fp32 teacher: fp32 arithmetic; 16-bit forward copy: one rounding (1 ulp covers the CPU
    # interpreter's truncating cast as well as round-to-nearest on a GPU).
    rel = {torch.float32: 2e-7, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}[dtype]
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.dtype == dtype
        err = (a.double() - e).abs()
        assert bool((err <= rel * e.abs() + 1e-6).all()), (i, float(err.max()))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("t_dtype,s_dtype", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                             (torch.float32, torch.float16), (torch.float32, torch.float64)])
def test_matches_float64_expectation(backend, t_dtype, s_dtype, kernel_device):
    # A float64 student is not a kernel dtype: the triton backend sends it through torch.
    teacher = [torch.randn(s).to(kernel_device, t_dtype) for s in SHAPES]
    student = [torch.randn(s).to(kernel_device, s_dtype) for s in SHAPES]
    expected = _expected(teacher, student, 0.9)
    ema_update_(teacher, student, 0.9, backend=backend)
    _assert_matches(teacher, expected, t_dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_in_place_and_student_untouched(backend):
    teacher = [torch.randn(s) for s in SHAPES]
    student = [torch.randn(s, dtype=torch.bfloat16) for s in SHAPES]
    ptrs, objects = [t.data_ptr() for t in teacher], [id(t) for t in teacher]
    student_before = [s.clone() for s in student]
    assert ema_update_(teacher, student, 0.5, backend=backend) is None
    assert [t.data_ptr() for t in teacher] == ptrs and [id(t) for t in teacher] == objects
    assert all(torch.equal(a, b) for a, b in zip(student, student_before))


@pytest.mark.parametrize("backend", BACKENDS)
def test_decay_edges_and_release_loop(backend):
    teacher = [torch.randn(s) for s in SHAPES]
    student = [torch.randn(s) for s in SHAPES]
    kept = [t.clone() for t in teacher]
    ema_update_(kept, student, 1.0, backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(kept, teacher))
    copied = [t.clone() for t in teacher]
    ema_update_(copied, student, 0.0, backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(copied, student))
    ours, loop = [t.clone() for t in teacher], [t.clone() for t in teacher]
    ema_update_(ours, student, 0.9996, backend=backend)
    ema_update_loop_(loop, student, 0.9996)
    for a, b in zip(ours, loop):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_views_at_odd_offsets_and_non_contiguous(backend):
    # Views at odd element offsets defeat the 16-byte alignment; a transposed tensor is not dense.
    buf_t, buf_s = torch.randn(200), torch.randn(200, dtype=torch.bfloat16)
    teacher = [buf_t[1:8], buf_t[9:42], buf_t[43:43], torch.randn(5, 9).t()]
    student = [buf_s[3:10], buf_s[11:44], buf_s[50:50], torch.randn(9, 5, dtype=torch.bfloat16)]
    expected = _expected(teacher, student, 0.75)
    ema_update_(teacher, student, 0.75, backend=backend)
    _assert_matches(teacher, expected, torch.float32)


def test_kernel_block_boundaries_and_alignment():
    # A small block makes every tensor span several full blocks plus a masked tail.
    flat = torch.zeros(4 * 64 + 40)
    teacher = [flat[0:33], flat[64:64 + 128], flat[256:256 + 17]]
    student = [torch.randn(33), torch.randn(128), torch.randn(17)]
    expected = _expected(teacher, student, 0.3)
    plan = kernel.build_plan(teacher, student, block=16)
    # Views on 64-element boundaries and 64-byte aligned students: 16-byte vector loads are provable.
    assert (plan.t_align, plan.s_align) == (8, 4)
    assert plan.count.tolist() == [16, 16, 1] + [16] * 8 + [16, 1]
    kernel.launch(plan, teacher[0], student[0], 0.7)
    _assert_matches(teacher, expected, torch.float32)
    # Offsets are relative to the first tensor (the base pointer's own alignment the compiler sees).
    odd = kernel.build_plan([flat[1:8], flat[10:21]], [torch.randn(7), torch.randn(11)], block=16)
    assert (odd.t_align, odd.s_align) == (1, 1)  # one stream off its vector: element offsets everywhere
    # 4 fp32 apart is 16 bytes of the state, but 8 bytes of a 16-bit copy at the same offsets.
    shifted = kernel.build_plan([flat[0:4], flat[4:8]], [torch.randn(4), torch.randn(4)], block=16)
    assert shifted.t_align == 1
    with pytest.raises(ValueError, match="fp32 teacher"):
        kernel.build_plan([torch.zeros(3, dtype=torch.bfloat16)], [torch.zeros(3)])


def test_plan_cache_follows_new_tensors():
    for _ in range(3):  # same shapes, fresh tensors each time (cache keys are addresses)
        teacher = [torch.randn(s) for s in SHAPES]
        student = [torch.randn(s) for s in SHAPES]
        expected = _expected(teacher, student, 0.8)
        ema_update_(teacher, student, 0.8, backend="triton")
        _assert_matches(teacher, expected, torch.float32)
    # Same addresses and sizes, but a transposed (non-dense) view: a cached table must not be reused.
    base = torch.randn(5, 9)
    ema_update_([base], [torch.randn(5, 9)], 0.8, backend="triton")
    teacher, student = [base.t()], [torch.randn(9, 5)]
    expected = _expected(teacher, student, 0.8)
    ema_update_(teacher, student, 0.8, backend="triton")
    _assert_matches(teacher, expected, torch.float32)


def test_errors_are_value_errors_naming_the_culprit():
    t, s = [torch.zeros(3), torch.zeros(4)], [torch.zeros(3), torch.zeros(4)]
    with pytest.raises(ShapeError, match="2 teacher tensors but 1 student"):
        ema_update_(t, s[:1], 0.9)
    with pytest.raises(ShapeError, match=r"tensor 1: teacher shape \(4,\) != student shape \(5,\)"):
        ema_update_(t, [torch.zeros(3), torch.zeros(5)], 0.9)
    with pytest.raises(ShapeError, match="tensor 0: teacher on cpu but student on meta"):
        ema_update_(t, [torch.zeros(3, device="meta"), torch.zeros(4)], 0.9)
    for decay in (-0.1, 1.5, math.nan):
        with pytest.raises(ConfigError, match="decay must be in"):
            ema_update_(t, s, decay)
    with pytest.raises(ConfigError, match="backend must be one of"):
        ema_update_(t, s, 0.9, backend="cuda")
    for dtype in (torch.bfloat16, torch.float16, torch.float64):  # the EMA state is fp32 only
        with pytest.raises(ShapeError, match=f"tensor 1: the teacher \\(EMA state\\) must be float32, got {dtype}"):
            ema_update_([t[0], t[1].to(dtype)], s, 0.9)
    for err in (ShapeError, ConfigError):
        assert issubclass(err, ValueError)
    assert torch.equal(t[0], torch.zeros(3))  # nothing was written by a rejected call


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ConfigError, match="TRITON_INTERPRET=1"):
        ema_update_([torch.zeros(3)], [torch.ones(3)], 0.9, backend="triton")
    ema_update_([torch.zeros(3)], [torch.ones(3)], 0.9, backend="auto")  # auto on the CPU: torch


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.norm = torch.nn.BatchNorm2d(4)
        self.head = torch.nn.Linear(4, 5)
        self.scale = torch.nn.Parameter(torch.tensor(2.5))

    def forward(self, x):
        return self.head(self.norm(self.conv(x)).mean((2, 3))) * self.scale


def _step(student: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))


@pytest.mark.parametrize("backend", BACKENDS)
def test_teacher_semantics(backend):
    student = _Net()
    student(torch.randn(2, 3, 6, 6))  # moves the BatchNorm running statistics
    teacher = EMATeacher(student, decay=0.9, backend=backend)
    t_params, s_params = list(teacher.module.parameters()), list(student.parameters())
    assert not teacher.module.training and student.training
    assert all(not p.requires_grad for p in t_params)
    assert all(tp is not sp and tp.data_ptr() != sp.data_ptr() for tp, sp in zip(t_params, s_params))
    for (k, a), (_, b) in zip(teacher.state_dict().items(), student.state_dict().items()):
        assert torch.equal(a, b), k  # an exact copy, buffers included
    # Parameters are views of one flat fp32 buffer.
    lo, hi = teacher.flat.data_ptr(), teacher.flat.data_ptr() + teacher.flat.numel() * 4
    assert all(lo <= p.data_ptr() < hi and p.dtype == torch.float32 for p in t_params)

    expected = [p.detach().double().clone() for p in s_params]
    buffers = {k: v.clone() for k, v in teacher.module.named_buffers()}
    for _ in range(3):
        _step(student)
        student(torch.randn(2, 3, 6, 6))
        teacher.update(student)
        expected = [e + 0.1 * (p.detach().double() - e) for e, p in zip(expected, s_params)]
    for tp, e in zip(teacher.module.parameters(), expected):
        torch.testing.assert_close(tp.double(), e, rtol=1e-6, atol=1e-6)
    for k, v in teacher.module.named_buffers():  # buffers are copied once, never averaged
        assert torch.equal(v, buffers[k]), k


def test_teacher_follows_replaced_student_storage():
    student = _Net()
    teacher = EMATeacher(student, decay=0.5, backend="triton")
    teacher.update(student)
    # Re-assigning .data (what Module.to does) moves the storage: the cached table must not be reused.
    student.head.weight.data = torch.full_like(student.head.weight, 3.0)
    before = teacher.module.head.weight.detach().clone()
    teacher.update(student)
    torch.testing.assert_close(teacher.module.head.weight, before + 0.5 * (3.0 - before))
    with pytest.raises(ShapeError, match="student has"):
        teacher.update(torch.nn.Linear(2, 2))


def test_bf16_teacher_is_an_fp32_state_with_a_bf16_forward_copy():
    student = _Net().to(torch.bfloat16)
    teacher = EMATeacher(student, decay=0.75, backend="triton", forward_dtype=torch.bfloat16)
    assert teacher.dtype == torch.float32 and teacher.forward_dtype == torch.bfloat16
    assert teacher.flat.dtype == torch.float32  # the EMA state never is 16-bit
    assert all(p.dtype == torch.bfloat16 for p in teacher.module.parameters())
    fp32 = EMATeacher(student, decay=0.75, backend="triton")
    assert fp32.flat.dtype == torch.float32 and fp32.flat.numel() == teacher.flat.numel()
    start = [p.detach().double().clone() for p in teacher.module.parameters()]
    _step(student)
    for ema in (teacher, fp32):
        ema.update(student)
    s_params = list(student.parameters())
    _assert_matches(list(teacher.module.parameters()), _expected(start, s_params, 0.75), torch.bfloat16)
    _assert_matches(list(fp32.module.parameters()), _expected(start, s_params, 0.75), torch.float32)
    assert all(v.dtype == torch.float32 for k, v in teacher.state_dict().items() if "norm.running" not in k
               and "num_batches" not in k)
    with pytest.raises(ConfigError, match=r"forward_dtype must be .* \(the EMA state is always fp32\)"):
        EMATeacher(student, forward_dtype=torch.float64)
    assert EMATeacher(student, forward_dtype=torch.float32).forward_dtype is None  # the state itself
    with pytest.raises(TypeError, match="dtype"):  # one way to ask for a 16-bit teacher: forward_dtype
        EMATeacher(student, dtype=torch.bfloat16)


def _ulp_bf16(x: torch.Tensor) -> torch.Tensor:
    """One bf16 ulp at |x| (fp32 tensor): 2 ** (floor(log2 |x|) - 7), for x != 0."""
    return torch.exp2(torch.floor(torch.log2(x.abs().clamp_min(2.0 ** -120))) - 7)


def _assert_copy_tracks(copy: torch.Tensor, state: torch.Tensor, exact: bool) -> None:
    """The bf16 forward copy is the fp32 state rounded once: exact for torch's round-to-nearest
    copy, within one ulp for the interpreter's truncating cast."""
    assert copy.dtype == torch.bfloat16 and state.dtype == torch.float32
    if exact:
        assert torch.equal(copy, state.to(torch.bfloat16))
    else:
        assert bool(((copy.float() - state).abs() <= _ulp_bf16(state)).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_teacher_moves_over_2000_updates(backend):
    # decay 0.9996, a student 0.1 away from the teacher: each step moves the state by ~4e-5,
    # below half a bf16 ulp (~0.002-0.004 at |t| ~ 0.5-1). A bf16 state would stay frozen; the
    # fp32 state must follow the float64 recurrence and the bf16 copy must track the state.
    decay, steps = 0.9996, 2000
    gen = torch.Generator().manual_seed(0)
    # One parameter: the interpreter costs ~6 ms per program and launch, whatever the block.
    student = torch.nn.Linear(16, 33, bias=False)
    with torch.no_grad():
        for p in student.parameters():
            p.copy_(0.5 + torch.rand(p.shape, generator=gen))
    teacher = EMATeacher(student, decay=decay, backend=backend, forward_dtype=torch.bfloat16)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    names, states, copies = teacher.parameter_views()
    start = [t.double().clone() for t in states]
    target = [p.detach().double() for p in student.parameters()]
    expected = [t.clone() for t in start]
    for step in range(1, steps + 1):
        teacher.update(student)
        expected = [e + (1 - decay) * (s - e) for e, s in zip(expected, target)]
        if step % 500 == 0:
            for c, t in zip(copies, states):
                _assert_copy_tracks(c, t, exact=backend == "torch")
    moved = 1 - decay ** steps  # ~0.55 of the way to the student
    for t, e, t0, s in zip(states, expected, start, target):
        assert float((t.double() - e).abs().max()) <= 2e-4 * float(e.abs().max())  # fp32 rounding, 2,000 steps
        gap = (s - t0).abs()
        travelled = (t.double() - t0) / (s - t0)
        assert float((travelled - moved)[gap > 0.01].abs().max()) < 0.01  # every element that has a way to go
        assert abs(float((t.double() - t0).abs().sum() / gap.sum()) - moved) < 1e-3
    # What a bf16 state does with the same inputs: almost nothing moves (the bug this guards against).
    frozen = [t0.to(torch.bfloat16) for t0 in start]
    for _ in range(steps):
        torch._foreach_lerp_(frozen, [s.to(torch.bfloat16) for s in target], 1 - decay)
    changed = sum(int((f != t0.to(torch.bfloat16)).sum()) for f, t0 in zip(frozen, start))
    assert changed < 0.05 * sum(t.numel() for t in start)



def test_state_dict_round_trip_and_bad_arguments():
    student = _Net()
    teacher = EMATeacher(student, decay=0.5, backend="torch")
    _step(student)
    teacher.update(student)
    other = EMATeacher(_Net(), decay=0.5, backend="torch")
    other.load_state_dict(teacher.state_dict())
    for (k, a), (_, b) in zip(other.state_dict().items(), teacher.state_dict().items()):
        assert torch.equal(a, b), k
    lo, hi = other.flat.data_ptr(), other.flat.data_ptr() + other.flat.numel() * 4
    assert all(lo <= p.data_ptr() < hi for p in other.module.parameters())  # still views of the flat buffer
    with pytest.raises(ConfigError, match="decay"):
        EMATeacher(student, decay=2.0)
    with pytest.raises(ConfigError, match="backend"):
        EMATeacher(student, backend="fast")


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_copy_written_in_the_same_pass(backend):
    student = _Net()
    teacher = EMATeacher(student, decay=0.75, backend=backend, forward_dtype=torch.bfloat16)
    reference = EMATeacher(student, decay=0.75, backend=backend)
    assert all(p.dtype == torch.bfloat16 for p in teacher.module.parameters())
    for _ in range(2):
        _step(student)
        teacher.update(student)
        reference.update(student)
    state, expected = teacher.state_dict(), reference.state_dict()
    for k, v in expected.items():  # the EMA state itself stays fp32
        assert state[k].dtype == v.dtype and torch.equal(state[k], v), k
    for (name, p), ref in zip(teacher.module.named_parameters(), reference.module.parameters()):
        _assert_matches([p], [ref.detach().double()], torch.bfloat16)
    # Under autocast the bf16 weights are used as they are (a layer autocast leaves in fp32,
    # LayerNorm, casts them up): same output as the fp32 teacher's autocast forward.
    mlp = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))
    fast = EMATeacher(mlp, backend=backend, forward_dtype=torch.bfloat16).module
    slow = EMATeacher(mlp, backend=backend).module
    x = torch.randn(3, 6)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(fast(x), slow(x), rtol=0.02, atol=0.02)

    fresh = EMATeacher(_Net(), decay=0.75, backend=backend, forward_dtype=torch.bfloat16)
    fresh.load_state_dict(state)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, state[k]), k  # fp32 precision survives the round trip
    for p, q in zip(fresh.module.parameters(), teacher.module.parameters()):
        torch.testing.assert_close(p, q, rtol=2 ** -7, atol=0)


@pytest.mark.parametrize("arch", [80, 90])
def test_gate_configs_cover_what_the_launcher_builds(arch):
    from degla_fast.kernels import configs

    gate = kernel.gate_configs(arch)
    assert len(gate) == 18  # 3 students x (no copy, bf16, fp16) x aligned or not
    assert len({(tuple(c.signature.items()), tuple(c.constexprs.items())) for c in gate}) == len(gate)
    block, warps = kernel.tile(arch)
    assert all(c.num_warps == warps and c.constexprs["BLOCK"] == block and c.arch == arch for c in gate)
    assert all(set(c.label) == {"dtype", "D", "tile"} for c in gate)
    assert all(isinstance(c, configs.KernelConfig) and c.name == "_ema_kernel" for c in gate)

    def variant(plan, t, s, c):
        types = {"T": configs.POINTER_TYPES[str(t.dtype)[6:]], "S": configs.POINTER_TYPES[str(s.dtype)[6:]],
                 "C": configs.POINTER_TYPES[str((c if c is not None else t).dtype)[6:]]}
        return (types, {"BLOCK": plan.block, "T_ALIGN": plan.t_align, "S_ALIGN": plan.s_align,
                        "WRITE_COPY": c is not None}, plan.num_warps)

    gated = [({k: c.signature[k] for k in ("T", "S", "C")}, c.constexprs, c.num_warps) for c in gate]
    flat = torch.zeros(256)
    for s_dtype in kernel.STUDENT_DTYPES:
        for aligned in (True, False):
            t = [flat[0:33], flat[64:64 + 40]] if aligned else [flat[1:34], flat[64:64 + 40]]
            s = [torch.randn(33).to(s_dtype), torch.randn(40).to(s_dtype)]
            plan = kernel.build_plan(t, s)
            assert (plan.block, plan.num_warps) == kernel.TILES[90]  # the CPU interpreter plans as sm_90
            for c_dtype in kernel.COPY_DTYPES:
                c = None if c_dtype is None else torch.zeros(256, dtype=c_dtype)
                got = variant(plan, t[0], s[0], c)
                if arch == 90:
                    assert got in gated, got


def test_plan_cache_evicts_the_least_recently_used():
    # The one cache behind the EMA's block tables and AdamWEMA's layouts, tables and launches.
    from degla_fast.plan_cache import PlanCache

    cache, built = PlanCache(2), []
    for key in ("a", "b", "a", "c", "a", "b"):
        assert cache.get(key, lambda: built.append(key) or key.upper()) == key.upper()
    assert built == ["a", "b", "c", "b"] and len(cache) == 2  # "b" was the least recent when "c" came


def test_a_device_side_skip_takes_the_triton_kernel(monkeypatch):
    # update(apply=t) passes (1 - decay) * t to the kernel in device memory: the same numbers as
    # update() for t = 1, nothing moved for t = 0, and no fallback to the torch ops.
    launches = []
    real_launch = kernel.launch
    monkeypatch.setattr(kernel, "launch", lambda *a, **k: (launches.append(a[3]), real_launch(*a, **k))[1])
    student = _Net()
    plain = EMATeacher(student, decay=0.7, backend="triton", forward_dtype=torch.bfloat16)
    gated = EMATeacher(student, decay=0.7, backend="triton", forward_dtype=torch.bfloat16)
    _step(student)
    plain.update(student)
    gated.update(student, apply=torch.tensor(1.0))
    assert all(torch.equal(a, b) for a, b in zip(plain.module.parameters(), gated.module.parameters()))
    assert torch.equal(plain.flat, gated.flat)
    before = gated.flat.clone(), [p.clone() for p in gated.module.parameters()]
    _step(student)
    gated.update(student, apply=torch.tensor(False))
    assert torch.equal(gated.flat, before[0])
    assert all(torch.equal(p, q) for p, q in zip(gated.module.parameters(), before[1]))
    assert len(launches) == 3 and all(torch.is_tensor(w) for w in launches[1:])
