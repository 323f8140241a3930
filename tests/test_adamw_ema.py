"""Fused AdamW + EMA step: float64 expectations for both backends (Triton through its CPU
interpreter), equality with torch.optim.AdamW + EMATeacher.update, flat partitions, the
state dict round trip and the input errors."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from degla_fast import EMATeacher
from degla_fast.errors import ConfigError, ShapeError
from degla_fast.optim_ema import AdamWEMA, adamw_ema_step_

BACKENDS = ["torch", "triton"]
SHAPES = [(1,), (7,), (1023,), (4097,), (4, 3, 3, 3)]
HYPER = dict(beta1=0.9, beta2=0.95, eps=1e-8)
GROUPS = [dict(lr=1e-2, weight_decay=0.1), dict(lr=3e-3, weight_decay=0.0)]
DECAY = 0.8


def _expected_step(p, g, m, v, t, *, step, lr, weight_decay, beta1, beta2, eps, decay):
    """torch.optim.AdamW's formula, then the EMA toward the new parameter, in float64."""
    p = p * (1 - lr * weight_decay)
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    p = p - lr / (1 - beta1 ** step) * m / ((v / (1 - beta2 ** step)).sqrt() + eps)
    return p, m, v, t + (1 - decay) * (p - t)


def _assert_close(actual, expected, what):
    for i, (a, e) in enumerate(zip(actual, expected)):
        err = (a.double() - e).abs()
        assert bool((err <= 1e-6 * e.abs() + 1e-6).all()), (what, i, float(err.max()))


def _state(shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen) for s in shapes]
    teachers = [p + 0.1 * torch.randn(p.shape, generator=gen) for p in params]
    return params, teachers


@pytest.mark.parametrize("backend", BACKENDS)
def test_functional_matches_float64_over_steps_and_groups(backend, kernel_device):
    # Two "groups" (different lr / weight decay), as AdamWEMA calls the function once per group.
    groups = []
    for hyper, shapes in zip(GROUPS, (SHAPES, SHAPES[:3])):
        params, teachers = ([x.to(kernel_device) for x in xs] for xs in _state(shapes, seed=len(groups)))
        zeros = [[torch.zeros_like(p) for p in params] for _ in range(2)]
        exp = [[x.double() for x in xs] for xs in (params, *zeros, teachers)]
        groups.append((hyper, [params, *zeros, teachers], exp))
    gen = torch.Generator().manual_seed(1)
    for step in (1, 2, 3):
        for hyper, (params, m, v, teachers), exp in groups:
            grads = [torch.randn(p.shape, generator=gen).to(kernel_device) for p in params]
            adamw_ema_step_(params, grads, m, v, teachers, step=step, decay=DECAY, backend=backend, **hyper, **HYPER)
            new = [_expected_step(p, g.double(), m_, v_, t, step=step, decay=DECAY, **hyper, **HYPER)
                   for p, m_, v_, t, g in zip(*exp, grads)]
            exp[:] = [list(col) for col in zip(*new)]
    for _, actual, exp in groups:
        for name, a, e in zip(("param", "exp_avg", "exp_avg_sq", "teacher"), actual, exp):
            _assert_close(a, e, name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_flat_partition_odd_offsets_and_copies(backend):
    # DeepSpeed-style: one flat 1-D fp32 tensor, plus views at odd offsets of a shared buffer
    # (alignment 1 for the kernel) and a bf16 copy of the teacher written by the same pass.
    flat, teacher = _state([(5000,)])
    buf = torch.randn(50)
    views = [buf[1:8], buf[9:42]]
    params = flat + views
    teachers = teacher + [v + 0.5 for v in views]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    copies = [torch.zeros(p.shape, dtype=torch.bfloat16) for p in params]
    exp = [[x.double() for x in xs] for xs in (params, m, v, teachers)]
    for step in (1, 2):
        grads = [torch.randn(p.shape) for p in params]
        adamw_ema_step_(params, grads, m, v, teachers, step=step, decay=DECAY, backend=backend,
                        teacher_copies=copies, **GROUPS[0], **HYPER)
        new = [_expected_step(p, g.double(), m_, v_, t, step=step, decay=DECAY, **GROUPS[0], **HYPER)
               for p, m_, v_, t, g in zip(*exp, grads)]
        exp = [list(col) for col in zip(*new)]
    _assert_close(params, exp[0], "param")
    _assert_close(teachers, exp[3], "teacher")
    for c, t in zip(copies, teachers):  # one rounding (the interpreter's cast truncates: 1 ulp)
        torch.testing.assert_close(c, t.to(torch.bfloat16), rtol=2 ** -7, atol=0)
    torch.testing.assert_close(buf[1:8], params[1], rtol=0, atol=0)  # updated in place, through the view


def test_triton_equals_torch_and_non_contiguous_falls_back():
    base = [torch.randn(6, 5), torch.randn(3, 4).t(), torch.randn(0), torch.randn(9)]
    results = []
    for backend in BACKENDS:
        params = [p.clone() if p.is_contiguous() else p.clone().t().contiguous().t() for p in base]
        teachers = [p * 0.5 for p in params]
        m = [torch.zeros_like(p) for p in params]
        v = [torch.zeros_like(p) for p in params]
        gen = torch.Generator().manual_seed(3)
        for step in (1, 2):
            grads = [torch.randn(p.shape, generator=gen) for p in params]
            adamw_ema_step_(params, grads, m, v, teachers, step=step, decay=DECAY, backend=backend,
                            **GROUPS[0], **HYPER)
        results.append(params + teachers)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 3, 3)
        self.norm = torch.nn.LayerNorm(12)
        self.head = torch.nn.Linear(12, 5)
        self.extra = torch.nn.Linear(12, 5)  # used only at some steps: no grad at the others

    def forward(self, x, use_extra):
        h = self.norm(self.conv(x).flatten(1))
        return self.head(h) + (self.extra(h) if use_extra else 0)


def _groups(model, named):
    decay = [(n, p) for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [(n, p) for n, p in model.named_parameters() if p.ndim <= 1]
    pick = (lambda ps: dict(ps)) if named else (lambda ps: [p for _, p in ps])
    groups = [{"params": pick(decay), "lr": 1e-2, "weight_decay": 0.1},
              {"params": pick(no_decay), "lr": 3e-3, "weight_decay": 0.0}]
    if named:
        for g in groups:
            g["params"] = list(g["params"].items())
    return groups


def _train(model, opt, ema, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for i in range(steps):
        opt.zero_grad(set_to_none=True)
        x = torch.randn(2, 2, 4, 4, generator=gen)
        model(x, use_extra=i != 1).square().mean().backward()
        opt.step()
        if ema is not None:
            ema.update(model)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("teacher_kwargs", [{}, {"forward_dtype": torch.bfloat16},
                                            {"forward_dtype": torch.float16}])
def test_optimizer_equals_adamw_then_teacher_update(backend, teacher_kwargs):
    torch.manual_seed(0)
    ref_model = _Net()
    model = copy.deepcopy(ref_model)
    ref_teacher = EMATeacher(ref_model, decay=DECAY, backend="torch", **teacher_kwargs)
    teacher = EMATeacher(model, decay=DECAY, backend=backend, **teacher_kwargs)
    ref_opt = torch.optim.AdamW(_groups(ref_model, named=False), betas=(0.9, 0.95), foreach=True)
    opt = AdamWEMA(_groups(model, named=True), teacher, betas=(0.9, 0.95), backend=backend)
    _train(ref_model, ref_opt, ref_teacher, 3)
    _train(model, opt, None, 3)
    exact = backend == "torch"  # same ops in the same order; the kernel rounds differently (fma)
    pairs = list(zip(model.parameters(), ref_model.parameters()))
    pairs += list(zip(teacher.state_dict().values(), ref_teacher.state_dict().values()))
    pairs += list(zip(teacher.module.parameters(), ref_teacher.module.parameters()))
    for a, b in pairs:
        if exact:
            assert torch.equal(a, b)
        elif a.dtype == torch.bfloat16:
            # The bf16 forward copy: one rounding of the fp32 state (the interpreter's cast truncates).
            torch.testing.assert_close(a, b, rtol=2 * 2 ** -7, atol=0)
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert opt.state[model.extra.weight]["step"].item() == 2  # no grad at the second step: no AdamW step
    for group in opt.param_groups:
        for p in group["params"]:
            ref_state = ref_opt.state[dict(zip(model.parameters(), ref_model.parameters()))[p]]
            assert opt.state[p]["step"].item() == ref_state["step"].item()


class _Scaled(torch.nn.Module):
    """A weight and an open_clip-style 0-d ``logit_scale`` just under the trainer's maximum."""

    def __init__(self, maximum):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(3, 5))
        self.logit_scale = torch.nn.Parameter(torch.tensor(maximum - 1e-3))


def test_group_clamp_applies_before_the_teacher_moves():
    # logit_scale in a group of its own with clamp_max: the update pushes it past the maximum, the
    # student ends at the maximum and the teacher moves toward that clamped value (not the
    # unclamped one), as AdamW.step(); clamp_(); teacher.update() gives. Both backends alike.
    maximum = math.log(100.0)
    results = {}
    for backend in BACKENDS:
        torch.manual_seed(0)
        model = _Scaled(maximum)
        teacher = EMATeacher(model, decay=DECAY, backend=backend, forward_dtype=torch.bfloat16)
        _, states, _ = teacher.parameter_views()
        states[1].fill_(3.0)  # a teacher behind the student: lerp toward max vs max + lr differs by 0.02
        groups = [{"params": [("weight", model.weight)], "weight_decay": 0.1},
                  {"params": [("logit_scale", model.logit_scale)], "weight_decay": 0.0, "clamp_max": maximum}]
        opt = AdamWEMA(groups, teacher, lr=0.1, backend=backend)
        model.weight.grad = torch.randn(3, 5)
        model.logit_scale.grad = torch.tensor(-1.0)  # AdamW's first step: +lr, far past the maximum
        weight = model.weight.detach().clone()
        opt.step()
        clamped = torch.tensor(maximum, dtype=torch.float32)
        assert torch.equal(model.logit_scale.detach(), clamped)  # the maximum rounded to fp32, exactly
        expected = torch.lerp(torch.tensor(3.0), clamped, 1 - DECAY)
        torch.testing.assert_close(states[1], expected, rtol=1e-6, atol=0)
        torch.testing.assert_close(teacher.module.logit_scale, expected.bfloat16(), rtol=2 ** -7, atol=0)
        assert bool((model.weight != weight).all())  # the other group: updated, and never clamped
        results[backend] = [model.weight.detach().clone(), model.logit_scale.detach().clone(), teacher.flat.clone()]
    for a, b in zip(*results.values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_group_clamp_survives_a_state_without_one():
    model = _Scaled(1.0)
    groups = [{"params": [model.weight]}, {"params": [model.logit_scale], "clamp_max": 1.0}]
    opt = AdamWEMA(groups, EMATeacher(model, backend="torch"), backend="torch")
    opt.load_state_dict(torch.optim.AdamW([{"params": [model.weight]}, {"params": [model.logit_scale]}]).state_dict())
    assert [g["clamp_max"] for g in opt.param_groups] == [None, 1.0]
    # The functional form clamps too, the frozen path included (no gradient: no AdamW step, still clamped).
    p, t = [torch.tensor([0.5, 2.0])], [torch.zeros(2)]
    adamw_ema_step_(p, [torch.zeros(2)], [torch.zeros(2)], [torch.zeros(2)], t, step=1, lr=0.0, beta1=0.9,
                    beta2=0.99, eps=1e-8, weight_decay=0.0, decay=0.5, backend="torch", clamp_max=1.0)
    assert p[0].tolist() == [0.5, 1.0] and t[0].tolist() == [0.25, 0.5]
    model.logit_scale.data.fill_(5.0)
    model.weight.grad, model.logit_scale.grad = torch.zeros(3, 5), None
    opt.step()
    assert model.logit_scale.item() == 1.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_cached_launches_follow_new_gradient_tensors(backend):
    model = torch.nn.Linear(4, 3)
    ref = copy.deepcopy(model)
    opt = AdamWEMA(model.parameters(), EMATeacher(model, decay=DECAY, backend=backend), lr=0.1, backend=backend)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=0.1)
    kept = []  # old gradients stay alive: the new ones cannot reuse their addresses
    for step in range(3):
        grads = [torch.full_like(p, float(step + 1)) for p in model.parameters()]
        for p, q, g in zip(model.parameters(), ref.parameters(), grads):
            kept.append(p.grad)
            p.grad, q.grad = g, g.clone()
        opt.step()
        ref_opt.step()
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("arch", [80, 90])
def test_gate_configs_cover_what_the_launcher_builds(arch):
    from degla_fast.kernels import adamw_ema as kernel

    gate = kernel.gate_configs(arch)
    assert len(gate) == 6  # forward copy (none, bf16, fp16) x aligned or not
    block, warps = kernel.tile(arch)
    assert all(c.num_warps == warps and c.constexprs["BLOCK"] == block and c.num_stages == 1 for c in gate)
    assert all(set(c.label) == {"dtype", "D", "tile"} and c.name == "_adamw_ema_kernel" for c in gate)
    gated = [(c.signature["C"], tuple(c.constexprs[k] for k in ("P_ALIGN", "G_ALIGN", "M_ALIGN", "V_ALIGN",
                                                                  "T_ALIGN", "C_ALIGN", "WRITE_COPY")))
             for c in gate]
    buf = torch.zeros(300)
    for aligned in (True, False):
        params = [torch.randn(40), torch.randn(9)] if aligned else [buf[1:41], buf[50:59]]
        five = [params] + [[torch.randn(p.shape) for p in params] for _ in range(4)]
        layout = kernel.build_layout([p.numel() for p in params], torch.device("cpu"))
        assert (layout.block, layout.num_warps) == kernel.TILES[90]  # the CPU interpreter plans as sm_90
        for c_dtype, name in ((None, "*fp32"), (torch.bfloat16, "*bf16"), (torch.float16, "*fp16")):
            copies = None if c_dtype is None else [torch.zeros(p.shape, dtype=c_dtype) for p in params]
            table = kernel.build_table(*five, copies)
            assert (table.aligns == (4, 4, 4, 4, 4, 4 if c_dtype is None else 8)) == aligned, table.aligns
            assert (name, table.aligns + (copies is not None,)) in gated
    with pytest.raises(ValueError, match="teachers must be float32"):
        kernel.build_table(*five[:4], [t.bfloat16() for t in five[4]])


def test_kernel_block_boundaries():
    from degla_fast.kernels import adamw_ema as kernel

    sizes = [15, 16, 17, 48, 1]
    layout = kernel.build_layout(sizes, torch.device("cpu"), block=16)
    assert layout.blocks.tolist() == [[0, 0], [1, 0], [2, 0], [2, 1], [3, 0], [3, 1], [3, 2], [4, 0]]
    params, teachers = _state([(n,) for n in sizes])
    grads = [torch.randn(n) for n in sizes]
    m, v = [torch.rand(n) for n in sizes], [torch.rand(n) for n in sizes]
    exp = [_expected_step(p.double(), g.double(), a.double(), b.double(), t.double(), step=4, decay=DECAY,
                          **GROUPS[0], **HYPER) for p, g, a, b, t in zip(params, grads, m, v, teachers)]
    table = kernel.build_table(params, grads, m, v, teachers)
    kernel.launch(layout, table, [params[0], grads[0], m[0], v[0], teachers[0], teachers[0]], step=4,
                  decay=DECAY, write_copy=False, **GROUPS[0], **HYPER)
    for name, actual, i in (("param", params, 0), ("exp_avg", m, 1), ("exp_avg_sq", v, 2), ("teacher", teachers, 3)):
        _assert_close(actual, [e[i] for e in exp], name)


def test_positional_mapping_and_state_dict_round_trip():
    torch.manual_seed(0)
    model = _Net()
    twin = copy.deepcopy(model)
    teacher = EMATeacher(model, decay=DECAY, backend="torch")
    opt = AdamWEMA(model.parameters(), teacher, lr=1e-2, backend="torch")
    _train(model, opt, None, 2)
    saved = copy.deepcopy(opt.state_dict())
    assert {"step", "exp_avg", "exp_avg_sq"} == set(saved["state"][0])

    twin.load_state_dict(model.state_dict())
    twin_teacher = EMATeacher(twin, decay=DECAY, backend="torch")
    twin_teacher.load_state_dict(teacher.state_dict())
    twin_opt = AdamWEMA(twin.parameters(), twin_teacher, lr=1e-2, backend="torch")
    twin_opt.load_state_dict(saved)
    _train(model, opt, None, 1, seed=5)
    _train(twin, twin_opt, None, 1, seed=5)
    for a, b in zip(list(model.parameters()) + [teacher.flat], list(twin.parameters()) + [twin_teacher.flat]):
        assert torch.equal(a, b)

    # A torch AdamW state dict loads too (its groups have no EMA decay: the default is kept).
    adamw = torch.optim.AdamW(twin.parameters(), lr=1e-2)
    twin_opt.load_state_dict(adamw.state_dict())
    assert twin_opt.param_groups[0]["decay"] == DECAY


def test_errors_are_value_errors_naming_the_culprit():
    p, t = [torch.zeros(3), torch.zeros(4)], [torch.zeros(3), torch.zeros(4)]
    ok = dict(step=1, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decay=0.9)
    with pytest.raises(ShapeError, match="different lengths"):
        adamw_ema_step_(p, p[:1], p, p, t, **ok)
    with pytest.raises(ShapeError, match=r"tensor 1: grads shape \(5,\) != param shape \(4,\)"):
        adamw_ema_step_(p, [torch.zeros(3), torch.zeros(5)], p, p, t, **ok)
    with pytest.raises(ShapeError, match="tensor 0: params must be float32"):
        adamw_ema_step_([x.bfloat16() for x in p], p, p, p, t, **ok)
    with pytest.raises(ShapeError, match="tensor 1: teachers must be float32"):
        adamw_ema_step_(p, p, p, p, [t[0], t[1].long()], **ok)
    with pytest.raises(ShapeError, match="tensor 1: teachers must be float32 .*got torch.bfloat16"):
        adamw_ema_step_(p, p, p, p, [t[0], t[1].bfloat16()], **ok)  # the EMA state is fp32 only
    with pytest.raises(ShapeError, match="tensor 0: teacher_copies must be bfloat16 or float16"):
        adamw_ema_step_(p, p, p, p, t, **ok, teacher_copies=[x.double() for x in t])
    for bad in (dict(step=0), dict(lr=-1.0), dict(beta1=1.0), dict(beta2=float("nan")), dict(decay=1.5),
                dict(eps=-1.0), dict(weight_decay=-0.1), dict(step=1.5), dict(clamp_max=float("nan"))):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            adamw_ema_step_(p, p, p, p, t, **{**ok, **bad})
    with pytest.raises(ConfigError, match="backend"):
        adamw_ema_step_(p, p, p, p, t, **ok, backend="cuda")
    assert issubclass(ShapeError, ValueError) and issubclass(ConfigError, ValueError)

    model = torch.nn.Linear(3, 2)
    teacher = EMATeacher(model, backend="torch")
    with pytest.raises(ConfigError, match="amsgrad"):
        AdamWEMA(model.parameters(), teacher, amsgrad=True)
    with pytest.raises(ConfigError, match="1 parameters but the teacher has 2"):
        AdamWEMA([model.weight], teacher)
    with pytest.raises(ConfigError, match="'bias2' is not a parameter of the teacher"):
        AdamWEMA([("bias2", model.bias)], teacher)
    with pytest.raises(ShapeError, match="'bias'"):
        AdamWEMA([("bias", torch.nn.Parameter(torch.zeros(5)))], teacher)
    with pytest.raises(ConfigError, match="EMATeacher"):
        AdamWEMA(model.parameters(), object())
    with pytest.raises(ConfigError, match="clamp_max"):
        AdamWEMA([{"params": [model.weight]}, {"params": [model.bias], "clamp_max": float("nan")}], teacher)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_teacher_moves_over_2000_fused_steps(backend):
    # AdamWEMA with a "bf16 teacher" (fp32 state + bf16 forward copy), decay 0.9996:
    # each EMA step is ~4e-4 * (p - t), below half a bf16 ulp of t. The fp32 state must follow the
    # float64 EMA of the parameters the optimiser produced, and the bf16 copy must track it.
    decay, steps = 0.9996, 2000
    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Linear(16, 33, bias=False)  # one tensor: the interpreter costs ~6 ms per program
    with torch.no_grad():
        model.weight.copy_(0.5 + torch.rand(model.weight.shape, generator=gen))
    teacher = EMATeacher(model, decay=decay, backend=backend, forward_dtype=torch.bfloat16)
    assert teacher.flat.dtype == torch.float32 and teacher.module.weight.dtype == torch.bfloat16
    opt = AdamWEMA(model.parameters(), teacher, lr=2e-4, weight_decay=0.0, backend=backend)
    grad = torch.randn(model.weight.shape, generator=gen)  # a steady push: p drifts by ~lr a step
    _, (state,), (copy_,) = teacher.parameter_views()
    start = state.double().clone()
    expected = start.clone()
    for step in range(1, steps + 1):
        model.weight.grad = grad
        opt.step()
        expected += (1 - decay) * (model.weight.detach().double() - expected)
        if step % 500 == 0:
            if backend == "torch":  # torch's round-to-nearest copy
                assert torch.equal(copy_, state.to(torch.bfloat16))
            else:  # the interpreter's cast truncates: within one ulp
                ulp = torch.exp2(torch.floor(torch.log2(state.abs())) - 7)
                assert bool(((copy_.float() - state).abs() <= ulp).all())
    assert float((state.double() - expected).abs().max()) <= 2e-4 * float(expected.abs().max())
    moved = (state.double() - start).abs()
    assert float(moved.min()) > 0.04  # the teacher travelled ~0.08 (the student ~0.4), many bf16 ulps
    assert float((copy_.double() - start).abs().min()) > 0.03  # and so did its bf16 forward weights


class _StateOnly:
    """A teacher that is only what AdamWEMA needs (a ReplicaTeacher): a decay and fp32 state views."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.names = [name for name, _ in model.named_parameters()]
        self.states = [p.detach().clone() for p in model.parameters()]

    def parameter_views(self):
        return list(self.names), list(self.states), None


def test_optimizer_takes_any_replica_teacher_and_refuses_a_sharded_one():
    from degla_fast.ema import ReplicaTeacher, ShardedEMATeacher

    torch.manual_seed(0)
    model, twin = _Scaled(1.0), _Scaled(1.0)
    twin.load_state_dict(model.state_dict())
    bare, full = _StateOnly(model, DECAY), EMATeacher(twin, decay=DECAY, backend="torch")
    assert isinstance(bare, ReplicaTeacher) and isinstance(full, ReplicaTeacher)
    start = [s.clone() for s in bare.states]
    opts = [AdamWEMA(m.parameters(), t, lr=0.1, backend="torch") for m, t in ((model, bare), (twin, full))]
    for m, opt in zip((model, twin), opts):
        m.weight.grad, m.logit_scale.grad = torch.ones_like(m.weight), torch.ones_like(m.logit_scale)
        opt.step()
    for state, first, view in zip(bare.states, start, full.parameter_views()[1]):
        assert not torch.equal(state, first) and torch.equal(state, view)  # moved, as EMATeacher's state
    assert not hasattr(ShardedEMATeacher, "parameter_views")  # its state is split in the optimiser's layout
    with pytest.raises(ConfigError, match="per-parameter state views"):
        AdamWEMA(model.parameters(), object(), backend="torch")
