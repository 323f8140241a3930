"""The compiled kernels at GPU sizes against float64 expectations (``make test-gpu``).

Loss (``DeGLALoss(backend="gemm")`` and ``backend="triton"``): fp32 with TF32 and with IEEE dots, bf16 and fp16; D in
{64, 512, 768}; B in {32, 256, 1000, 4096}; K in {1, 4}; with and without IGC; values of every
term and the gradients of image features, text features and logit_scale, each flavour with its
own tolerance. The float64 expectation is vectorised torch on the same device (section 3 of the
method doc, written independently of ``degla_fast.loss.reference``; checked against the per-row loop
oracle at a small size). EMA (``ema_update_``, ``EMATeacher`` with a bf16 forward copy) and the
fused AdamW+EMA step (``AdamWEMA``) over ViT-B/32's 302 parameter tensors (151M parameters,
shapes from ``benchmarks/gpu_check.py``, no open_clip) against float64.

Runs on CUDA tensors with the compiled kernels (TRITON_INTERPRET=0, a CUDA device). With
``DEGLA_GPU_DRY_RUN=1`` (``make gpu-check DRY_RUN=1``) the same tests run on CPU tensors through
Triton's interpreter at tiny sizes (B in {3, 17}, D in {16, 40}, 38 of the parameter tensors
1024x smaller), which is how CI keeps them from rotting. Anywhere else the module is skipped.
"""
from __future__ import annotations

import os
import zlib

import pytest
import torch
import torch.nn.functional as F

from gpu_check import clip_parameter_spec  # benchmarks/gpu_check.py (pytest.ini puts benchmarks/ on sys.path)

DRY_RUN = os.environ.get("DEGLA_GPU_DRY_RUN", "") not in ("", "0")
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
if DRY_RUN:
    DEVICE = torch.device("cpu")
    if not INTERPRET:
        pytestmark = pytest.mark.skip(reason="DEGLA_GPU_DRY_RUN=1 needs TRITON_INTERPRET=1 (CPU tensors)")
elif torch.cuda.is_available() and not INTERPRET:
    DEVICE = torch.device("cuda")
else:
    DEVICE = torch.device("cpu")
    pytestmark = pytest.mark.skip(reason="GPU sizes need CUDA and TRITON_INTERPRET=0 (make test-gpu); "
                                         "DEGLA_GPU_DRY_RUN=1 runs them tiny on the CPU (make gpu-check DRY_RUN=1)")

# --- loss --------------------------------------------------------------------------------------

#: name -> (input dtype, precision argument of fp32 inputs or None)
FLAVOURS = {"fp32-tf32": (torch.float32, "tf32"), "fp32-ieee": (torch.float32, "ieee"),
            "bf16": (torch.bfloat16, None), "fp16": (torch.float16, None)}
#: name -> (loss terms: relative error, counted against max(1, |value|);
#:          gradients: ||got - want|| / ||want||; gradients: max |got - want| / max |want|).
#: The expectation sees the inputs rounded to the input dtype, so what remains is the kernels'
#: arithmetic: fp32 accumulation (IEEE), TF32 operands (10-bit mantissa, about 5e-4 relative per
#: operand, times logit scales up to 100), and for bf16/fp16 the 16-bit operands of the backward
#: GEMMs (probabilities) and the 16-bit gradients themselves (2^-9 and 2^-11 relative). TF32,
#: emulated on the CPU (operands rounded to 10 bits, B=4096, K=4, scale 100): terms within 2e-5,
#: gradients 6e-4 (norm) and 1.4e-3 (max) at D=64, before the backward GEMMs' own rounding.
TOLERANCE = {"fp32-ieee": (2e-5, 5e-5, 2e-4), "fp32-tf32": (5e-4, 5e-3, 1e-2),
             "bf16": (1e-2, 1.5e-2, 4e-2), "fp16": (3e-3, 4e-3, 1e-2)}
WEIGHTS = {"tgc": 0.1, "distill": 0.005}

# (D, B, K, IGC, logit scale) per flavour. GPU: every D with every (B, K, IGC) combination that
# matters (B=4096 with K=4 and IGC is the paper's global batch; B=1000 is no multiple of any
# block; B=32 is the paper's per-GPU batch). Dry run: each D, B, K and IGC setting at least once.
if DRY_RUN:
    SHAPES = [(16, 3, 1, True, 14.3), (40, 17, 4, False, 100.0), (40, 3, 4, True, 100.0), (16, 17, 1, False, 14.3)]
else:
    SHAPES = [(d, b, k, igc, s) for d in (64, 512, 768) for b, k, igc, s in (
        (32, 1, True, 14.3), (256, 4, False, 100.0), (1000, 1, False, 14.3), (1000, 4, True, 100.0),
        (4096, 4, True, 100.0), (4096, 1, False, 14.3))]
LOSS_CASES = [pytest.param(backend, f, d, b, k, igc, s, id=f"{backend}-{f}-D{d}-B{b}-K{k}-{'igc' if igc else 'noigc'}")
              for backend in ("gemm", "triton") for f in FLAVOURS for d, b, k, igc, s in SHAPES]
# The triton backend keeps its logits wherever they fit (all above but fp32 at B=4096): its recomputing path
# (chunk_bytes=1) too, at D=512 (one feature slice, as the count assumes).
LOSS_CASES += [pytest.param("triton-recomputed", f, d, b, k, igc, s,
                            id=f"triton-recomputed-{f}-D{d}-B{b}-K{k}-{'igc' if igc else 'noigc'}")
               for f in FLAVOURS for d, b, k, igc, s in SHAPES if DRY_RUN or d == 512]


def expected_terms(image, text, scale, t_image, t_text, k: int, tgc_scale: float = 10.0) -> dict:
    """clip, igc, tgc, distill (method doc, section 3) in float64, vectorised: the i2t logits
    [B, B(1+K)], the t2i logits [B, B] and the per-sample (1+K)-way IGC and TGC logits."""
    image, text, scale, t_image, t_text = (x.double() for x in (image, text, scale, t_image, t_text))
    batch, dim = image.shape
    pos, own = text[:batch], text[batch:].view(batch, k, dim)  # own[i]: the K negatives of sample i
    i2t = scale * image @ text.T
    t2i = scale * pos @ image.T
    diag = torch.arange(batch, device=image.device)
    clip = ((torch.logsumexp(i2t, 1) - i2t[diag, diag]).mean() + (torch.logsumexp(t2i, 1) - t2i[diag, diag]).mean()) / 2
    igc = scale * torch.cat([(image * pos).sum(-1, keepdim=True), torch.einsum("bd,bkd->bk", image, own)], 1)
    tgc = tgc_scale * torch.cat([(pos * t_text[:batch]).sum(-1, keepdim=True), torch.einsum("bd,bkd->bk", pos, own)], 1)
    return {"clip": clip, "igc": (torch.logsumexp(igc, 1) - igc[:, 0]).mean(),
            "tgc": (torch.logsumexp(tgc, 1) - tgc[:, 0]).mean(),
            "distill": ((image - t_image) ** 2).sum() + ((text - t_text) ** 2).sum()}


def make_inputs(batch: int, k: int, dim: int, dtype: torch.dtype, seed: int):
    """Unit-norm student features, a teacher close to them, rounded to ``dtype`` on DEVICE."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=DEVICE, dtype=torch.float64)

    image, text = F.normalize(randn(batch, dim), dim=-1), F.normalize(randn(batch * (1 + k), dim), dim=-1)
    t_image = F.normalize(image + 0.1 * randn(batch, dim), dim=-1)
    t_text = F.normalize(text + 0.1 * randn(*text.shape), dim=-1)
    return [x.to(dtype) for x in (image, text, t_image, t_text)]


def _rel(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    """(||got - want|| / ||want||, max |got - want| / max |want|) in float64."""
    diff = got.double() - want
    return (float(diff.norm() / want.norm().clamp_min(1e-30)),
            float(diff.abs().max() / want.abs().max().clamp_min(1e-30)))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("backend,flavour,dim,batch,k,with_igc,scale", LOSS_CASES)
def test_loss_matches_float64(backend, flavour, dim, batch, k, with_igc, scale):
    from degla_fast import DeGLALoss

    dtype, precision = FLAVOURS[flavour]
    image, text, t_image, t_text = make_inputs(batch, k, dim, dtype, seed=zlib.crc32(f"{flavour}-{dim}-{batch}-{k}".encode()))
    # logit_scale stays fp32, as open_clip's exp() of its parameter is under autocast.
    scale_t = torch.tensor(scale, device=DEVICE, dtype=torch.float32)
    igc_weight = 0.1 if with_igc else 0.0

    leaves = [x.detach().double().requires_grad_(True) for x in (image, text, scale_t)]
    want = expected_terms(*leaves, t_image, t_text, k)
    want_total = want["clip"] + igc_weight * want["igc"] + WEIGHTS["tgc"] * want["tgc"] + WEIGHTS["distill"] * want["distill"]
    want_grads = torch.autograd.grad(want_total, leaves)

    student = [x.detach().clone().requires_grad_(True) for x in (image, text, scale_t)]
    kwargs = {"dot_precision": precision} if precision else {}
    if backend == "triton-recomputed":
        backend, kwargs["chunk_bytes"] = "triton", 1
    loss = DeGLALoss(num_negatives=k, igc_weight=igc_weight, tgc_weight=WEIGHTS["tgc"],
                     distill_weight=WEIGHTS["distill"], backend=backend, **kwargs)
    out = loss(*student[:2], student[2], t_image, t_text)
    out.total.backward()

    value_tol, grad_norm_tol, grad_max_tol = TOLERANCE[flavour]
    names = ["clip", "tgc", "distill"] + (["igc"] if with_igc else [])
    for name in names:
        got, exp = float(getattr(out, name).detach()), float(want[name].detach())
        assert abs(got - exp) <= value_tol * max(1.0, abs(exp)), f"{name}: {got!r} vs float64 {exp!r}"
    got, exp = float(out.total.detach()), float(want_total.detach())
    assert abs(got - exp) <= value_tol * max(1.0, abs(exp)), f"total: {got!r} vs float64 {exp!r}"
    for name, x, g in zip(("image", "text", "logit_scale"), student, want_grads):
        assert x.grad is not None and x.grad.dtype == x.dtype and x.grad.shape == x.shape, name
        assert bool(torch.isfinite(x.grad).all()), f"{name} grad has NaN/Inf"
        norm_err, max_err = _rel(x.grad, g)
        if name == "logit_scale":  # a scalar: one relative error
            assert max_err <= grad_max_tol, f"logit_scale grad {float(x.grad)!r} vs float64 {float(g)!r}"
        else:
            assert norm_err <= grad_norm_tol and max_err <= grad_max_tol, (
                f"{name} grad: relative error {norm_err:.3g} (norm, limit {grad_norm_tol}), {max_err:.3g} "
                f"(max, limit {grad_max_tol})")
    assert t_image.grad is None and t_text.grad is None


def test_float64_expectation_matches_the_loop_oracle():
    """The vectorised expectation above equals benchmarks/loss_oracle.py's per-row loops."""
    from loss_oracle import oracle_terms

    gen = torch.Generator().manual_seed(0)
    batch, k, dim = 5, 3, 24
    image = F.normalize(torch.randn(batch, dim, generator=gen, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.randn(batch * (1 + k), dim, generator=gen, dtype=torch.float64), dim=-1)
    t_image = F.normalize(image + 0.1 * torch.randn(image.shape, generator=gen, dtype=torch.float64), dim=-1)
    t_text = F.normalize(text + 0.1 * torch.randn(text.shape, generator=gen, dtype=torch.float64), dim=-1)
    scale = torch.tensor(14.3, dtype=torch.float64)
    want = oracle_terms(image, text, scale, t_image, t_text, k)
    got = expected_terms(image, text, scale, t_image, t_text, k)
    for name, w in zip(("clip", "igc", "tgc", "distill"), want):
        torch.testing.assert_close(got[name], w, rtol=1e-12, atol=1e-12)


# --- EMA and AdamW+EMA over ViT-B/32's parameter list ------------------------------------------

def vit_b32_shapes() -> list[torch.Size]:
    """ViT-B/32's 302 parameter shapes (151,277,313 parameters). Dry run: the tensors outside the
    residual blocks and those of the first block of each tower (38 tensors, the 0-dim
    logit_scale among them), 1-D and 1024x smaller (the interpreter runs one program at a time)."""
    spec = clip_parameter_spec("ViT-B-32")
    if not DRY_RUN:
        return [torch.Size(s) for _, s in spec]
    spec = [(n, s) for n, s in spec if "resblocks." not in n or "resblocks.0." in n]
    return [torch.Size(s) if len(s) == 0 else torch.Size([max(1, torch.Size(s).numel() // 1024)]) for _, s in spec]


def _assert_close(actual, expected, magnitude, what: str, rel: float) -> None:
    """Each element within ``rel`` times its ``magnitude`` (the size of the operands it was computed
    from, so a result that cancels to near zero is not held to its own tiny size) of float64."""
    for i, (a, e, mag) in enumerate(zip(actual, expected, magnitude)):
        err = (a.double() - e).abs()
        assert bool((err <= rel * mag + 1e-30).all()), (what, i, tuple(a.shape), float(err.max()))


def _randn(shapes, dtype=torch.float32, seed=0, scale=1.0):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    return [(scale * torch.randn(s, generator=gen, device=DEVICE)).to(dtype) for s in shapes]


class _Params(torch.nn.Module):
    def __init__(self, tensors):
        super().__init__()
        self.params = torch.nn.ParameterList([torch.nn.Parameter(t) for t in tensors])


def test_vit_b32_shape_list():
    shapes = [torch.Size(s) for _, s in clip_parameter_spec("ViT-B-32")]
    assert len(shapes) == 302 and sum(s.numel() for s in shapes) == 151_277_313


@pytest.mark.timeout(300)
@pytest.mark.parametrize("s_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("decay", [0.9996, 0.9])
def test_ema_update_vit_b32_float64(s_dtype, decay):
    from degla_fast import ema_update_

    shapes = vit_b32_shapes()
    teacher = _randn(shapes, seed=1)
    student = _randn(shapes, s_dtype, seed=2)
    before = [t.clone() for t in teacher]
    ema_update_(teacher, student, decay, backend="triton")
    expected = [t.double() + (1.0 - decay) * (s.double() - t.double()) for t, s in zip(before, student)]
    magnitude = [t.double().abs() + s.double().abs() for t, s in zip(before, student)]
    _assert_close(teacher, expected, magnitude, "teacher", 2.5e-7)


@pytest.mark.timeout(300)
def test_ema_teacher_vit_b32_float64_with_bf16_forward_copy():
    from degla_fast import EMATeacher

    student = _Params(_randn(vit_b32_shapes(), seed=3)).to(DEVICE)
    teacher = EMATeacher(student, decay=0.999, backend="triton", forward_dtype=torch.bfloat16)
    gen = torch.Generator(device=DEVICE).manual_seed(4)
    for _ in range(3):
        with torch.no_grad():
            for p in student.parameters():  # in place: the update's plan is reused
                p.add_(torch.randn(p.shape, generator=gen, device=DEVICE), alpha=0.1)
        _, states, _ = teacher.parameter_views()
        expected = [t.double() + 0.001 * (p.detach().double() - t.double()) for t, p in zip(states, student.parameters())]
        magnitude = [t.double().abs() + p.detach().double().abs() for t, p in zip(states, student.parameters())]
        teacher.update(student)
        _, states, forwards = teacher.parameter_views()
        _assert_close(states, expected, magnitude, "EMA state", 2.5e-7)
        assert forwards is not None and all(f.dtype == torch.bfloat16 for f in forwards)
        for f, t in zip(forwards, states):  # one rounding of the fp32 state (1 ulp: truncating or nearest)
            torch.testing.assert_close(f.float(), t.to(torch.bfloat16).float(), rtol=2 ** -7, atol=0)


@pytest.mark.timeout(300)
def test_adamw_ema_vit_b32_float64():
    from degla_fast import EMATeacher
    from degla_fast.optim_ema import AdamWEMA

    lr, (beta1, beta2), eps, wd, decay = 1e-3, (0.9, 0.98), 1e-6, 0.1, 0.9996
    model = _Params(_randn(vit_b32_shapes(), seed=5, scale=0.02)).to(DEVICE)
    teacher = EMATeacher(model, decay=decay, backend="triton")
    opt = AdamWEMA(model.parameters(), teacher, lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=wd, backend="triton")
    params = list(model.parameters())
    gen = torch.Generator(device=DEVICE).manual_seed(6)
    m = [torch.zeros(p.shape, dtype=torch.float64, device=DEVICE) for p in params]
    v = [torch.zeros(p.shape, dtype=torch.float64, device=DEVICE) for p in params]
    for step in (1, 2):
        for p in params:
            p.grad = 1e-3 * torch.randn(p.shape, generator=gen, device=DEVICE)
        _, teachers, _ = teacher.parameter_views()
        # The expectation of this step from the stored state before it (float64 arithmetic).
        p_new, t_new, mags = [], [], {"p": [], "m": [], "v": [], "t": []}
        for i, p in enumerate(params):
            g = p.grad.double()
            if step > 1:
                state = opt.state[p]
                m[i], v[i] = state["exp_avg"].double(), state["exp_avg_sq"].double()
            mags["m"].append(m[i].abs() + g.abs())
            mags["v"].append(v[i] + g * g)
            m[i] = beta1 * m[i] + (1 - beta1) * g
            v[i] = beta2 * v[i] + (1 - beta2) * g * g
            q = p.detach().double() * (1 - lr * wd)
            q = q - lr / (1 - beta1 ** step) * m[i] / ((v[i] / (1 - beta2 ** step)).sqrt() + eps)
            p_new.append(q)
            mags["p"].append(p.detach().double().abs() + lr)
            t_old = teachers[i].double()
            t_new.append(t_old + (1 - decay) * (q - t_old))
            mags["t"].append(t_old.abs() + q.abs())
        opt.step()
        _, teachers, _ = teacher.parameter_views()
        _assert_close([p.detach() for p in params], p_new, mags["p"], f"param, step {step}", 1e-6)
        _assert_close([opt.state[p]["exp_avg"] for p in params], m, mags["m"], f"exp_avg, step {step}", 1e-6)
        _assert_close([opt.state[p]["exp_avg_sq"] for p in params], v, mags["v"], f"exp_avg_sq, step {step}", 1e-6)
        _assert_close(teachers, t_new, mags["t"], f"teacher, step {step}", 1e-6)
