"""DeGLA loss: every backend against the float64 oracle, odd shapes, dtypes, gradients, errors."""
import pytest
import torch
import torch.nn.functional as F

from degla_fast import DeGLALoss, LossOutput, backends
from degla_fast.loss import LossSpec, auto as loss_auto
from degla_fast.loss import functional as Fn
from degla_fast.errors import ConfigError, NonFiniteError, ShapeError
from loss_oracle import oracle_terms, oracle_total

BACKENDS = ["reference", "torch", "gemm", "triton"]
# (value rtol, value atol, grad atol relative to the largest gradient entry) per dtype
TOLERANCE = {torch.float32: (1e-5, 1e-5, 1e-5), torch.float16: (4e-3, 4e-3, 8e-3), torch.bfloat16: (3e-2, 3e-2, 4e-2)}
# B=1; B not a multiple of any block (70 > 64); K from 1 to 8 (4: the paper's); D not a power of two
SHAPES = [(1, 1, 8), (3, 2, 16), (5, 3, 24), (70, 2, 33), (6, 8, 20), (4, 5, 48), (9, 4, 40)]


def make_inputs(batch, k, dim, dtype=torch.float64, seed=0, scale=14.3):
    gen = torch.Generator().manual_seed(seed)

    def feats(rows):
        return F.normalize(torch.randn(rows, dim, generator=gen, dtype=torch.float64), dim=-1)

    image, text = feats(batch), feats(batch * (1 + k))
    # A teacher close to the student, as after EMA warm-up.
    t_image = F.normalize(image + 0.1 * torch.randn(image.shape, generator=gen, dtype=torch.float64), dim=-1)
    t_text = F.normalize(text + 0.1 * torch.randn(text.shape, generator=gen, dtype=torch.float64), dim=-1)
    return [t.to(dtype) for t in (image, text, torch.tensor(scale, dtype=torch.float64), t_image, t_text)]


def leaf(t, dtype):
    return t.detach().to(dtype).requires_grad_(True)


def oracle_with_grads(inputs, k, **kw):
    image, text, scale, t_image, t_text = [leaf(t, torch.float64) for t in inputs]
    terms = oracle_terms(image, text, scale, t_image, t_text, k, **kw)
    total = terms[0] + 0.1 * terms[1] + 0.1 * terms[2] + 0.005 * terms[3]
    total.backward()
    return total.detach(), [t.detach() for t in terms], (image.grad, text.grad, scale.grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("batch,k,dim", SHAPES)
def test_matches_float64_oracle(backend, dtype, batch, k, dim, kernel_device):
    inputs = make_inputs(batch, k, dim)
    # The oracle sees exactly the rounded inputs the backend sees.
    inputs = [t.to(dtype).double() for t in inputs]
    total_ref, terms_ref, grads_ref = oracle_with_grads(inputs, k)
    image, text, scale, t_image, t_text = [leaf(t.to(kernel_device), dtype) for t in inputs]
    # fp32 to 1e-5 needs exact fp32 products on a GPU (the default TF32 is tested in test_kernels_gpu.py).
    out = DeGLALoss(num_negatives=k, backend=backend, dot_precision="ieee")(image, text, scale, t_image, t_text)
    out.total.backward()
    rtol, atol, gtol = TOLERANCE[dtype]
    for got, want in zip((out.clip, out.igc, out.tgc, out.distill), terms_ref):
        torch.testing.assert_close(got.double().cpu(), want, rtol=rtol, atol=atol * max(1.0, float(want.abs())))
    torch.testing.assert_close(out.total.double().cpu(), total_ref, rtol=rtol,
                               atol=atol * max(1.0, float(total_ref.abs())))
    for name, got, want in zip(("image", "text", "logit_scale"), (image.grad, text.grad, scale.grad), grads_ref):
        assert got is not None and got.dtype == dtype, name
        bound = gtol * max(float(want.abs().max()), 1e-3)
        err = float((got.double().cpu() - want).abs().max())
        assert err <= bound, f"{name} grad error {err:.3g} > {bound:.3g}"
    assert t_image.grad is None and t_text.grad is None  # the teacher is never trained by gradients


# Plain CLIP (K=0): B=1; B above a block (70 > 64); D not a power of two
PLAIN_SHAPES = [(1, 8), (5, 24), (70, 33)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("batch,dim", PLAIN_SHAPES)
def test_plain_clip_matches_float64_oracle(backend, dtype, batch, dim, kernel_device):
    # K=0 through DeGLALoss with its default weights: [B, D] captions, no teacher, the extra terms 0.
    inputs = [t.to(dtype).double() for t in make_inputs(batch, 0, dim)]
    image, text, scale = [leaf(t, torch.float64) for t in inputs[:3]]
    clip_ref = oracle_terms(image, text, scale, image, text, 0)[0]
    grads_ref = torch.autograd.grad(clip_ref, (image, text, scale))
    image, text, scale = [leaf(t.to(kernel_device), dtype) for t in inputs[:3]]
    loss = DeGLALoss(num_negatives=0, backend=backend, dot_precision="ieee")
    assert not loss.needs_teacher
    out = loss(image, text, scale)
    out.total.backward()
    rtol, atol, gtol = TOLERANCE[dtype]
    for got in (out.total, out.clip):
        torch.testing.assert_close(got.double().cpu(), clip_ref.detach(), rtol=rtol, atol=atol * max(1.0, float(clip_ref.detach())))
    assert float(out.igc.detach()) == float(out.tgc.detach()) == float(out.distill.detach()) == 0.0
    for name, got, want in zip(("image", "text", "logit_scale"), (image.grad, text.grad, scale.grad), grads_ref):
        assert got is not None and got.dtype == dtype, name
        assert_grads_close(got, want, gtol, name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_plain_clip_ignores_teacher_features(backend):
    image, text, scale, t_image, t_text = [t.float() for t in make_inputs(4, 0, 16)]
    t_image.requires_grad_(True)
    with_teacher = Fn.degla_loss(image, text, scale, t_image, t_text, num_negatives=0, backend=backend)
    torch.testing.assert_close(with_teacher.total, Fn.clip_loss(image, text, scale, backend=backend))
    assert float(with_teacher.distill) == 0.0 and not with_teacher.total.requires_grad
    with pytest.raises(ShapeError, match=r"4\*\(1\+0\) = 4 rows.*\[12, 16\]"):  # K=0 reads [B, D] captions
        Fn.degla_loss(image, torch.cat([text] * 3), scale, num_negatives=0, backend=backend)


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("k", [2, 0])
def test_gradcheck_float64(backend, k):
    image, text, scale, t_image, t_text = make_inputs(3, k, 6, scale=3.0)
    fn = lambda i, x, s: Fn.degla_loss(i, x, s, t_image, t_text, num_negatives=k, backend=backend).total
    assert torch.autograd.gradcheck(fn, (leaf(image, torch.float64), leaf(text, torch.float64), leaf(scale, torch.float64)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_official_tgc_indexing(backend):
    batch, k = 8, 4
    inputs = make_inputs(batch, k, 16)
    out = Fn.degla_loss(*[t.float() for t in inputs], num_negatives=k, backend=backend, official_tgc_indexing=True)
    want = oracle_terms(*inputs, k, official=True)[2]
    paper = oracle_terms(*inputs, k, official=False)[2]
    torch.testing.assert_close(out.tgc.double(), want, rtol=1e-5, atol=1e-5)
    assert abs(float(want - paper)) > 1e-3  # the release's indexing really is a different loss


def test_official_indexing_mask_matches_the_release_description():
    # Method doc: for B=32, K=4 the release contrasts row i with negatives of samples i//K + 8m.
    from degla_fast.loss.reference import _own_negative_mask

    mask = _own_negative_mask(32, 4, 0, 128, official=True, device="cpu")
    for i in (0, 5, 31):
        samples = sorted({int(c) // 4 for c in mask[i].nonzero().flatten()})
        assert samples == [i // 4 + 8 * m for m in range(4)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_weights_and_missing_teacher(backend):
    image, text, scale, _, _ = [t.float() for t in make_inputs(4, 2, 16)]
    out = Fn.degla_loss(image, text, scale, num_negatives=2, tgc_weight=0.0, distill_weight=0.0, backend=backend)
    clip, igc, _, _ = oracle_terms(*make_inputs(4, 2, 16), 2)
    torch.testing.assert_close(out.total.double(), clip + 0.1 * igc, rtol=1e-5, atol=1e-5)
    assert float(out.tgc) == 0.0 and float(out.distill) == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_clip_loss_plain_matches_open_clip(backend):
    from open_clip.loss import ClipLoss

    image, text, scale, _, _ = [t.float() for t in make_inputs(7, 1, 20)]
    positives = text[:7]
    want = ClipLoss()(image, positives, scale)
    got = Fn.clip_loss(image, positives, scale, num_negatives=0, backend=backend)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_pieces_match_the_oracle():
    inputs = make_inputs(5, 3, 24)
    image, text, scale, t_image, t_text = inputs
    clip, igc, tgc, distill = oracle_terms(*inputs, 3)
    torch.testing.assert_close(Fn.clip_loss(image, text, scale, num_negatives=3), clip)
    torch.testing.assert_close(Fn.igc_loss(image, text, scale, num_negatives=3), igc)
    torch.testing.assert_close(Fn.tgc_loss(text, t_text, num_negatives=3), tgc)
    torch.testing.assert_close(Fn.distill_loss(image, text, t_image, t_text), distill)


def test_torch_backend_row_blocks_give_the_same_result():
    inputs = [leaf(t, torch.float64) for t in make_inputs(37, 3, 16)]
    whole = Fn.degla_loss(*inputs, num_negatives=3, backend="torch").total
    grads_whole = torch.autograd.grad(whole, inputs[:3])
    # 8-row blocks (148 columns of 8 + 8 bytes per row): 5 blocks, the last one partial
    blocked = Fn.degla_loss(*inputs, num_negatives=3, backend="torch", chunk_bytes=8 * 148 * 16).total
    grads_blocked = torch.autograd.grad(blocked, inputs[:3])
    torch.testing.assert_close(blocked, whole)
    for a, b in zip(grads_blocked, grads_whole):
        torch.testing.assert_close(a, b)


def test_loss_output_items_and_auto_backend():
    image, text, scale, t_image, t_text = [t.float() for t in make_inputs(3, 2, 8)]
    out = DeGLALoss(num_negatives=2)(image, text, scale, t_image, t_text)  # auto -> torch on the CPU
    assert isinstance(out, LossOutput)
    items = out.items()
    assert set(items) == {"total", "clip", "igc", "tgc", "distill"}
    assert items["total"] == pytest.approx(float(oracle_total(*make_inputs(3, 2, 8), 2)), rel=1e-5)
    assert loss_auto.resolve_backend(LossSpec(num_negatives=2), batch=3, device="cpu",
                                     dtype=torch.float32) == ("torch", "cpu tensors")


def test_auto_backend_rule(monkeypatch, tmp_path):
    cuda = torch.device("cuda")  # resolving needs no GPU: the capability is stood in for
    monkeypatch.setattr(loss_auto, "device_capability", lambda device: (9, 0))
    no_table = tmp_path / "none.json"
    size = dict(dtype=torch.bfloat16, chunk_bytes=256 << 20, table_path=no_table)

    def auto(rows, columns, device=cuda, backend="auto", **kw):
        return loss_auto.choose(backend, device, rows=rows, columns=columns, **{**size, **kw})

    name, reason = auto(256, 1280)            # no measurements: the modelled rule, by count
    assert name == "triton" and "modelled" in reason and "keeps" in reason
    name, reason = auto(65536, 327680)        # its logits do not fit: recomputed
    assert name == "triton" and "recomputes" in reason
    assert auto(4096, 20480, dtype=torch.float64).name == "torch"  # fp64: the fused kernels compute in fp32
    for name in ("triton", "gemm"):
        with pytest.raises(ConfigError, match=f"backend='{name}' computes in fp32 at most"):
            auto(4, 4, backend=name, dtype=torch.float64)
    assert auto(256, 1280, device=torch.device("cpu")).name == "torch"
    # The trainer's form, from the spec and the batch: anchors times every rank's captions.
    spec = LossSpec(num_negatives=4, local_loss=True)
    assert loss_auto.resolve_backend(spec, batch=256, device=cuda, dtype=torch.bfloat16, world_size=2,
                                     table_path=no_table) == auto(256, 2 * 1280)
    assert backends.resolve_backend("auto", cuda) == "triton"  # the EMA: no size rule
    # One rule for both: without an importable Triton, auto is torch for the loss and the EMA alike.
    monkeypatch.setattr(loss_auto, "triton_importable", lambda: False)
    monkeypatch.setattr(backends, "triton_importable", lambda: False)
    assert auto(4096, 20480).name == "torch"
    assert backends.resolve_backend("auto", cuda) == "torch"
    for name in ("triton", "gemm"):
        with pytest.raises(ConfigError, match=f"backend='{name}' needs Triton"):
            auto(4, 4, device=torch.device("cpu"), backend=name)


def test_auto_follows_the_measured_table(monkeypatch, tmp_path, caplog):
    """The table gpu-check writes from bench_loss rows: per dtype and B the fastest of torch, gemm
    and triton; auto takes the entry nearest in logits for the GPU's capability and dtype."""
    cuda = torch.device("cuda")
    monkeypatch.setattr(loss_auto, "device_capability", lambda device: (9, 0))
    rows = [{"impl": impl, "B": b, "K": 4, "D": 512, "dtype": "bfloat16", "p50_ms": ms}
            for b, times in ((32, {"torch": 0.05, "gemm": 0.09, "triton": 0.2}),
                             (4096, {"torch": 9.0, "gemm": 1.1, "triton": 2.5}),
                             (65536, {"torch": 900.0, "gemm": None, "triton": 400.0}))
            for impl, ms in times.items()]
    rows.append({"impl": "gemm floor", "B": 32, "K": 4, "D": 512, "dtype": "bfloat16", "p50_ms": 0.001})
    rows.append({"impl": "gemm", "B": 65536, "K": 4, "D": 512, "dtype": "bfloat16", "skipped": "out of memory"})
    table_path = tmp_path / "auto.json"
    table = loss_auto.write_auto_table(rows, {"device": "NVIDIA H200", "date": "2026-12-04"}, (9, 0), table_path)
    assert [(e["B"], e["backend"]) for e in table["entries"]] == [(32, "torch"), (4096, "gemm"), (65536, "triton")]

    def auto(batch, dtype=torch.bfloat16):
        return loss_auto.choose("auto", cuda, rows=batch, columns=5 * batch, dtype=dtype, chunk_bytes=256 << 20,
                                table_path=table_path)

    monkeypatch.setattr(loss_auto, "_logged", set())  # as in a fresh process
    with caplog.at_level("INFO", logger="degla_fast"):
        assert [auto(b).name for b in (16, 64, 2048, 8192, 40000, 100000)] == \
            ["torch", "torch", "gemm", "gemm", "triton", "triton"]
        name, reason = auto(64)
    assert name == "torch" and "measured" in reason and "NVIDIA H200" in reason
    chosen = [r.getMessage() for r in caplog.records if "backend auto" in r.getMessage()]
    assert len([m for m in chosen if "-> torch" in m]) == 1  # logged once per choice, not per call
    assert len(chosen) == 3
    assert auto(256, dtype=torch.float16).name == "triton"  # no fp16 entries: the modelled rule
    monkeypatch.setattr(loss_auto, "device_capability", lambda device: (8, 0))
    assert "modelled" in auto(32).reason  # another GPU model: not its table


def assert_grads_close(got, want, gtol, name):
    bound = gtol * max(float(want.abs().max()), 1e-30)
    err = float((got.double().cpu() - want).abs().max())
    assert err <= bound, f"{name} grad error {err:.3g} > {bound:.3g}"


@pytest.mark.parametrize("mode", ["stored", "recomputed", "second-call columns"])
@pytest.mark.parametrize("splits", [1, 3, 64])
def test_triton_column_splits_and_feature_chunks(splits, mode, monkeypatch, kernel_device):
    """Partial log-sum-exps merged over 1..many column splits, the dq and dx loops split as many
    ways (fp32 partials merged in order); D=130 spans several feature chunks; logits stored or
    recomputed; text-to-image column statistics from the logits kernel's epilogue or (beyond
    MAX_COL_PARTS row blocks) from a second forward call."""
    import degla_fast.kernels.degla_loss as kernels

    monkeypatch.setattr(kernels, "_INTERPRETER_PROGRAMS", splits)
    if mode == "second-call columns":
        monkeypatch.setattr(kernels, "MAX_COL_PARTS", 0)
    batch, k, dim = 37, 3, 130
    inputs = make_inputs(batch, k, dim, seed=3)
    total_ref, _, grads_ref = oracle_with_grads(inputs, k)
    image, text, scale, t_image, t_text = [leaf(t.to(kernel_device), torch.float32) for t in inputs]
    out = DeGLALoss(num_negatives=k, backend="triton", dot_precision="ieee",
                    chunk_bytes=1 if mode == "recomputed" else 256 << 20)(image, text, scale, t_image, t_text)
    out.total.backward()
    torch.testing.assert_close(out.total.double().cpu(), total_ref, rtol=1e-5, atol=1e-5)
    for name, got, want in zip(("image", "text", "logit_scale"), (image.grad, text.grad, scale.grad), grads_ref):
        assert_grads_close(got, want, 1e-5, name)


@pytest.mark.parametrize("backend", ["gemm", "triton"])
def test_fp16_gradients_do_not_underflow(backend, kernel_device):
    """A small upstream gradient over many logits: g / R must not meet the fp16 cast.

    With g = 1e-3 and R = 96 the factor g / R times a softmax entry is about 1e-8, below fp16's
    smallest subnormal (6e-8); scaled before the cast, most of the gradient would vanish.
    """
    batch, k, dim = 96, 4, 16
    inputs = [t.to(torch.float16).double() for t in make_inputs(batch, k, dim, seed=5, scale=20.0)]
    image, text, scale, t_image, t_text = [leaf(t, torch.float64) for t in inputs]
    want = torch.autograd.grad(1e-3 * Fn.degla_loss(image, text, scale, t_image, t_text, num_negatives=k,
                                                    backend="reference").total, (image, text))
    image, text, scale, t_image, t_text = [leaf(t.to(kernel_device), torch.float16) for t in inputs]
    got = torch.autograd.grad(1e-3 * DeGLALoss(num_negatives=k, backend=backend)(image, text, scale, t_image,
                                                                                 t_text).total, (image, text))
    for name, g, w in zip(("image", "text"), got, want):
        assert_grads_close(g.float(), w, 2e-2, name)


def test_precision_setting():
    with pytest.raises(ConfigError, match="dot_precision: 'fp32' is not one of tf32, ieee"):
        DeGLALoss(dot_precision="fp32")
    image, text, scale, _, _ = [t.float() for t in make_inputs(2, 1, 8)]
    with pytest.raises(ConfigError, match="precision"):
        Fn.clip_loss(image, text, scale, num_negatives=1, dot_precision="high")


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    image, text, scale, t_image, t_text = [t.float() for t in make_inputs(2, 1, 8)]
    with pytest.raises(ConfigError, match="TRITON_INTERPRET"):
        DeGLALoss(num_negatives=1, backend="triton")(image, text, scale, t_image, t_text)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_shapes_name_expected_and_actual(backend):
    image, text, scale, t_image, t_text = [t.float() for t in make_inputs(4, 2, 16)]
    loss = DeGLALoss(num_negatives=2, backend=backend)
    with pytest.raises(ShapeError, match=r"4\*\(1\+2\) = 12 rows.*\[11, 16\]"):
        loss(image, text[:11], scale, t_image, t_text[:11])
    with pytest.raises(ShapeError, match=r"widths differ.*\[4, 16\].*\[12, 15\]"):
        loss(image, text[:, :15], scale, t_image, t_text)
    with pytest.raises(ShapeError, match=r"teacher_image_features \[3, 16\] must match image_features \[4, 16\]"):
        loss(image, text, scale, t_image[:3], t_text)
    with pytest.raises(ShapeError, match="teacher_image_features and teacher_text_features are required"):
        loss(image, text, scale)
    with pytest.raises(ShapeError, match="different devices"):
        loss(image, text.to("meta"), scale, t_image, t_text)
    with pytest.raises(ValueError):  # ShapeError is a ValueError, as users of other trainers expect
        loss(image, text[:11], scale, t_image, t_text)


def test_bad_settings():
    with pytest.raises(ValueError, match="num_negatives: must be >= 0"):  # ConfigError is a ValueError
        DeGLALoss(num_negatives=-1)
    with pytest.raises(ConfigError, match="num_negatives: must be >= 0"):  # an option: the spec's check
        Fn.degla_loss(*[t.float() for t in make_inputs(2, 1, 8)], num_negatives=-1)
    with pytest.raises(ConfigError, match="backend: 'cuda' is not one of"):
        DeGLALoss(backend="cuda")


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_non_finite_inputs_are_reported(backend):
    image, text, scale, t_image, t_text = [t.float() for t in make_inputs(3, 2, 8)]
    text[4, 2] = float("nan")
    with pytest.raises(NonFiniteError, match=r"text_features \[9, 8\]"):
        DeGLALoss(num_negatives=2, backend=backend)(image, text, scale, t_image, t_text)


def _emulated_tiles(q, x, scale, grad):
    """Torch emulation of the softmax kernels' 16-bit arithmetic on a GPU: products of the 16-bit
    inputs accumulated in fp32 (what tensor cores do), the probabilities cast to the input dtype at
    unit scale, the g / R factor applied to the fp32 product. Returns (lse, dq, dx, dscale)."""
    dots = q.float() @ x.float().T
    lse = torch.logsumexp(dots * scale, dim=1)
    p = torch.exp(dots * scale - lse[:, None]) - torch.eye(*dots.shape)  # target of row r: column r
    p_in = p.to(q.dtype).float()
    alpha = grad / q.shape[0] * scale
    return lse, (p_in @ x.float()) * alpha, (p_in.T @ q.float()) * alpha, (p * dots).sum() * grad / q.shape[0]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_softmax_kernels_do_the_16bit_casts_a_gpu_does(dtype, kernel_device):
    """The interpreter cannot run 16-bit dots, so the kernels are checked against an emulation of
    their tile math with the same casts. A different fp32 summation order can move a probability
    across a 16-bit rounding boundary, so entries agree to one ulp of the dtype; a kernel that
    applied the small g / R factor (1e-3 / 45 here) before the cast would lose most of fp16's
    precision to subnormals and fail by far more."""
    import degla_fast.kernels.degla_loss as kernels

    gen = torch.Generator().manual_seed(7)
    q = F.normalize(torch.randn(45, 40, generator=gen), dim=-1).to(dtype)
    x = F.normalize(torch.randn(131, 40, generator=gen), dim=-1).to(dtype)
    scale, grad = torch.tensor(30.0), torch.tensor([1e-3])
    eps = torch.finfo(dtype).eps
    lse_want, dq_want, dx_want, ds_want = _emulated_tiles(q, x, scale, grad[0])
    from degla_fast.kernels.loss_terms import finish, new_state

    q, x, scale, grad = q.to(kernel_device), x.to(kernel_device), scale.reshape(1).to(kernel_device), grad.to(kernel_device)
    # Recomputed logits (store_bytes=0): the emulation makes them from q and x the same way.
    plan = kernels.plan_for(q, x, "tf32", num_groups=131, with_cols=False, store_bytes=0)
    assert plan.stored is None
    state = new_state(45, 131, plan.fwd_splits, 0, q.device)
    kernels.forward(q, x, scale, state, plan, row_offset=0, num_negatives=0, with_igc=False)
    finish(state, None, None, (1.0, 0.0, 0.0, 0.0), num_groups=131, with_igc=False, with_cols=False)
    lse = state["row_m"][0]
    dq, dx = torch.empty_like(q), torch.empty_like(x)
    ds = kernels.backward(q, x, None, scale, grad, (lse, lse, lse), dq, dx, plan, row_offset=0, num_negatives=0,
                          weights=(1.0, 0.0), with_igc=False, with_cols=False, accumulate=False)
    torch.testing.assert_close(lse.cpu(), lse_want, rtol=1e-5, atol=1e-5)
    for got, want in ((dq, dq_want), (dx, dx_want)):  # written in the input dtype: half an ulp more
        assert got.dtype == dtype
        torch.testing.assert_close(got.float().cpu(), want, rtol=eps, atol=eps * float(want.abs().max()))
    torch.testing.assert_close(ds.cpu()[0], ds_want, rtol=1e-5, atol=0.0)


@pytest.mark.parametrize("backend", ["gemm", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_saturated_rows_give_zero_gradients(dtype, backend, kernel_device):
    """Each caption equal to its image and scale 100: every softmax sits at its target (the other
    logits are about 90 lower), so the true loss and gradients are ~1e-39. The target's
    probability must round to exactly 1 from logits recomputed bit for bit, and P - onehot be
    taken before the products; a kernel that recomputed the logits differently, or subtracted the
    target's x afterwards, leaves errors of 1e-6..1e-4 here."""
    batch, k, dim = 24, 2, 40
    gen = torch.Generator().manual_seed(11)
    image = F.normalize(torch.randn(batch, dim, generator=gen), dim=-1)
    negatives = F.normalize(torch.randn(batch * k, dim, generator=gen), dim=-1)
    text = torch.cat([image, negatives])
    image, text = leaf(image.to(kernel_device), dtype), leaf(text.to(kernel_device), dtype)
    scale = leaf(torch.tensor(100.0).to(kernel_device), torch.float32)
    out = DeGLALoss(num_negatives=k, backend=backend, dot_precision="ieee", tgc_weight=0.0, distill_weight=0.0)(
        image, text, scale)
    out.total.backward()
    assert float(out.clip.detach()) < 1e-6 and float(out.igc.detach()) < 1e-6
    for name, grad in (("image", image.grad), ("text", text.grad), ("logit_scale", scale.grad)):
        assert float(grad.abs().max()) < 1e-7, f"{name} gradient {float(grad.abs().max()):.3g} on a saturated batch"


# --- the gemm backend: column chunks, one autograd node, no host reads ---------------------------

@pytest.mark.parametrize("official", [False, True], ids=["own", "official"])
@pytest.mark.parametrize("igc", [0.1, 0.0], ids=["igc", "noigc"])
def test_gemm_column_chunks_equal_the_oracle(monkeypatch, official, igc, kernel_device):
    """Recomputed column chunks of 8..24 columns: text-to-image columns, IGC groups and target
    columns cut by chunk edges, the release's TGC indexing; values and gradients equal float64 and
    the stored single chunk's."""
    import degla_fast.loss.gemm_backend as gemm

    batch, k, dim = 37, 3, 20
    inputs = make_inputs(batch, k, dim, seed=4)
    leaves64 = [leaf(t, torch.float64) for t in inputs[:3]]
    terms = oracle_terms(*leaves64, *inputs[3:], k, official=official)
    want = terms[0] + igc * terms[1] + 0.1 * terms[2] + 0.005 * terms[3]
    want_grads = torch.autograd.grad(want, leaves64)
    monkeypatch.setattr(gemm, "CHUNK_ALIGN", 8)
    results = []
    for chunk_bytes in (1 << 30, batch * 8 * 24, batch * 8 * 8):
        image, text, scale, t_image, t_text = [leaf(t.to(kernel_device), torch.float32) for t in inputs]
        loss = DeGLALoss(num_negatives=k, igc_weight=igc, backend="gemm", dot_precision="ieee",
                         official_tgc_indexing=official, chunk_bytes=chunk_bytes)
        out = loss(image, text, scale, t_image, t_text)
        grads = torch.autograd.grad(out.total, (image, text, scale))
        torch.testing.assert_close(out.total.double().cpu(), want.detach(), rtol=1e-5, atol=1e-5)
        for name, got, exp in zip(("image", "text", "logit_scale"), grads, want_grads):
            assert_grads_close(got, exp, 1e-5, name)
        results.append([out.total.detach(), *grads])
    assert len(gemm.plan_chunks(batch, batch * (1 + k), 4, batch * 8 * 8)) == 19  # 148 columns in 8s
    for chunked in results[1:]:
        for a, b in zip(chunked, results[0]):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", ["gemm", "triton"])
@pytest.mark.parametrize("k", [9, 17])
def test_more_negatives_than_the_local_kernels_take(backend, k, kernel_device):
    """K > LOCAL_MAX_NEGATIVES: TGC and distillation leave the fused kernels for plain torch, and
    every negative's gradient row is still written (the gemm finalize walks them a tile at a time)."""
    inputs = make_inputs(5, k, 20, seed=6)
    total_ref, _, grads_ref = oracle_with_grads(inputs, k)
    image, text, scale, t_image, t_text = [leaf(t.to(kernel_device), torch.float32) for t in inputs]
    out = DeGLALoss(num_negatives=k, backend=backend, dot_precision="ieee")(image, text, scale, t_image, t_text)
    out.total.backward()
    torch.testing.assert_close(out.total.double().cpu(), total_ref, rtol=1e-5, atol=1e-5)
    for name, got, want in zip(("image", "text", "logit_scale"), (image.grad, text.grad, scale.grad), grads_ref):
        assert_grads_close(got, want, 1e-5, name)


def test_gemm_plan_chunks():
    from degla_fast.loss.gemm_backend import CHUNK_ALIGN, plan_chunks

    assert plan_chunks(4096, 20480, 2, 1 << 30) == [(0, 20480)]  # 503 MB fit in 1 GiB: stored
    chunks = plan_chunks(4096, 20480, 2, 256 << 20)  # the default budget at B=4096, K=4: two halves
    assert chunks == [(0, 10240), (10240, 20480)]
    assert all(4096 * (c1 - c0) * 6 <= 256 << 20 for c0, c1 in chunks)
    chunks = plan_chunks(100, 1000, 2, 100 * 6 * 130)  # at most 130 columns: 128-wide, one 104
    assert chunks[0] == (0, 128) and chunks[-1][1] == 1000 and all((c1 - c0) % CHUNK_ALIGN == 0 for c0, c1 in chunks[:-1])
    assert plan_chunks(10 ** 6, 5, 2, 1) == [(0, 5)]  # never narrower than CHUNK_ALIGN (one chunk here)


def test_gemm_back_propagates_through_every_output(kernel_device):
    """Gradients through clip, igc, tgc and distill as well as the total (the five-gradient path),
    equal the reference backend's."""
    inputs = make_inputs(9, 2, 16, seed=6)
    results = []
    for backend in ("reference", "gemm"):
        image, text, scale, t_image, t_text = [leaf(t.to(kernel_device), torch.float32) for t in inputs]
        out = DeGLALoss(num_negatives=2, backend=backend, dot_precision="ieee")(image, text, scale, t_image, t_text)
        objective = 0.5 * out.total + 0.3 * out.clip - 0.7 * out.igc + 2.0 * out.tgc + 0.1 * out.distill
        results.append(torch.autograd.grad(objective, (image, text, scale)))
    for name, got, want in zip(("image", "text", "logit_scale"), results[1], results[0]):
        assert_grads_close(got, want.double(), 1e-5, name)


@pytest.mark.parametrize("backend", ["gemm", "triton"])
def test_fused_backends_refuse_float64_in_one_line(backend, kernel_device):
    """fp64 features are never computed in fp32 without a word: the fused backends refuse them
    (auto takes torch, which computes in fp64)."""
    image, text, scale, t_image, t_text = [leaf(t.to(kernel_device), torch.float64) for t in make_inputs(5, 2, 12)]
    with pytest.raises(ConfigError, match="computes in fp32 at most; float64 features need backend='torch'"):
        DeGLALoss(num_negatives=2, backend=backend)(image, text, scale, t_image, t_text)
    out = DeGLALoss(num_negatives=2, backend="auto")(image, text, scale, t_image, t_text)
    assert out.total.dtype == torch.float64


@pytest.mark.parametrize("backend", ["gemm", "triton"])
def test_fused_backends_promote_mixed_dtypes_alike(backend, kernel_device):
    """bf16 images with fp32 text: both fused backends compute in the promoted dtype (fp32), as the
    torch backend does, and each feature's gradient comes back in its own dtype."""
    inputs = make_inputs(6, 2, 16)
    image, text, scale, t_image, t_text = [t.float().to(kernel_device) for t in inputs]
    image16 = image.to(torch.bfloat16)
    want = [leaf(t, torch.float32) for t in (image16.float(), text, scale)]
    loss = DeGLALoss(num_negatives=2, backend=backend, dot_precision="ieee")
    ref = loss(*want, t_image, t_text).total
    ref_grads = torch.autograd.grad(ref, want)
    got_in = [leaf(image16, torch.bfloat16), leaf(text, torch.float32), leaf(scale, torch.float32)]
    got = loss(*got_in, t_image, t_text).total
    grads = torch.autograd.grad(got, got_in)
    torch.testing.assert_close(got, ref)
    assert [g.dtype for g in grads] == [torch.bfloat16, torch.float32, torch.float32]
    for g, w in zip(grads, ref_grads):
        torch.testing.assert_close(g.float(), w.to(g.dtype).float())


@pytest.mark.parametrize("backend", ["torch", "gemm"])
def test_autocast_does_not_reach_the_loss_products(backend):
    """open_clip_train calls its loss inside an autocast region: fp32 features must still meet fp32
    products there (an autocast bf16 matmul would move the loss by about 1e-2)."""
    image, text, scale, t_image, t_text = [t.float() for t in make_inputs(12, 2, 32, seed=8, scale=100.0)]
    loss = DeGLALoss(num_negatives=2, backend=backend)
    plain = loss(image, text, scale, t_image, t_text).total
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = loss(image, text, scale, t_image, t_text).total
    torch.testing.assert_close(under, plain, rtol=1e-6, atol=1e-6)


def _fwd_bwd_work(backend, batch=16, k=4, dim=32, **kw):
    from device_work import DeviceWork

    image, text, scale, t_image, t_text = [t.float() for t in make_inputs(batch, k, dim)]
    leaves = [t.requires_grad_() for t in (image, text, scale)]
    loss = DeGLALoss(num_negatives=k, backend=backend, check_finite=False, **kw)
    torch.autograd.grad(loss(image, text, scale, t_image, t_text).total, leaves)  # warm: lazy imports, caches
    ones = torch.ones(())
    with DeviceWork() as work:
        out = loss(image, text, scale, t_image, t_text)
        torch.autograd.grad(out.total, leaves, ones)
    return work


def test_gemm_launches_at_world_size_1(monkeypatch):
    """docs/loss.md's count: 8 launches for forward + backward with the logits stored, 15 with two
    recomputed column chunks (K=4, IGC, TGC and distillation on)."""
    import degla_fast.loss.gemm_backend as gemm

    stored = _fwd_bwd_work("gemm")
    assert stored.launches == ["mm", "triton:_stats_kernel", "triton:_local_fwd_kernel", "triton:_finish_kernel",
                               "triton:_grad_kernel", "mm", "mm", "triton:_finalize_kernel"]
    monkeypatch.setattr(gemm, "CHUNK_ALIGN", 16)
    two = _fwd_bwd_work("gemm", chunk_bytes=16 * 8 * 48)  # 80 columns: 48 + 32
    assert len(two.launches) == 15 and two.launches.count("mm") + two.launches.count("addmm_") == 8


def test_triton_launches_at_world_size_1():
    """docs/loss.md's count for the tiled backend: no torch op at all; the text-to-image column
    statistics come from the logits kernel's epilogue; the dq loop is split (3 column tiles here)
    and its fp32 partials merged by one more launch: 7, at most 8 when both loops are split."""
    work = _fwd_bwd_work("triton")
    assert work.launches == ["triton:_lse_fwd_kernel", "triton:_local_fwd_kernel", "triton:_finish_kernel",
                             "triton:_local_bwd_kernel", "triton:_dq_kernel", "triton:_sum_parts_kernel",
                             "triton:_dx_kernel"]
    recomputed = _fwd_bwd_work("triton", chunk_bytes=1)
    assert recomputed.launches == work.launches


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_host_reads_inside_the_loss(backend):
    """With check_finite=False no backend reads a device value on the host, forward or backward
    (a float(tensor) in a backward pass is invisible to a TorchFunctionMode: counted at ATen level)."""
    work = _fwd_bwd_work(backend)
    assert work.host_reads == [], f"{backend}: {work.host_reads}"


# --- CUDA-only hazards, checked on the CPU through the same code paths ---------------------------

def _tf32_reads():
    flags = torch.backends.cuda.matmul
    out = []
    for name in ("allow_tf32", "fp32_precision"):
        try:
            out.append(getattr(flags, name))
        except RuntimeError:
            out.append("refused")
    return out


@pytest.mark.parametrize("user", ["untouched", "legacy True", "new ieee", "new tf32"])
@pytest.mark.parametrize("dot_precision", ["tf32", "ieee"])
def test_tf32_setting_reads_back_through_both_apis(user, dot_precision):
    """The loss sets cuBLAS's fp32 mode for its products and restores it through the API the
    process uses: after the call (and inside it, where inductor may read it) the legacy
    ``allow_tf32`` reads as before; torch >= 2.9 raises on that read once the new API was set to
    "tf32" by the loss itself (the CUDA path ran only on GPUs; loss_matmuls takes it here)."""
    from degla_fast.matmul import loss_matmuls

    flags = torch.backends.cuda.matmul
    saved = flags.allow_tf32
    try:
        if user == "legacy True":
            flags.allow_tf32 = True
        elif user.startswith("new") and hasattr(flags, "fp32_precision"):
            flags.fp32_precision = user.split()[1]
        before = _tf32_reads()
        with loss_matmuls(torch.device("cuda"), dot_precision):
            inside = _tf32_reads()
            if user != "new tf32":  # the process itself chose the new API at tf32: its own reads refuse
                assert inside[0] == (dot_precision == "tf32")
        assert _tf32_reads() == before
        if user != "new tf32":
            assert "refused" not in before
    finally:
        flags.allow_tf32 = saved


def test_out_dtype_gate_admits_only_torch_that_accepts_it(monkeypatch):
    """torch 2.8 and 2.9 have mm/addmm's out_dtype overloads but refuse addmm of an fp32
    accumulator with 16-bit factors: the gate is the version."""
    import importlib

    import degla_fast.matmul as matmul

    for version, admitted in (("2.8.0+cu128", False), ("2.9.1", False), ("2.10.0", True), ("2.11.0+cu126", True)):
        monkeypatch.setattr(torch, "__version__", version)
        assert importlib.reload(matmul)._HAS_OUT_DTYPE is admitted, version
    monkeypatch.undo()
    importlib.reload(matmul)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stored_logits_error_against_float64(dtype, kernel_device):
    """What keeping the logits costs in precision: the forward keeps fp16 cosines (11 significant
    bits; |cos| <= 1 for normalised features, so each is off by at most 2^-12 = 2.4e-4, i.e.
    scale * 2.4e-4 in a logit) and makes its statistics from them, so the backward's probabilities
    are the forward's. Stated bound: the loss moves by at most 2 * scale * 2^-12 (here 100 * 4.9e-4
    = 0.049 at the worst), and measured against float64 on the same 16-bit inputs it is far
    below that; the gradients stay within the bf16/fp16 tolerances of the recomputed path."""
    batch, k, dim = 70, 4, 48
    inputs = [t.to(dtype).double() for t in make_inputs(batch, k, dim, seed=11, scale=100.0)]
    total_ref, _, grads_ref = oracle_with_grads(inputs, k)
    errors = {}
    for mode, budget in (("stored", 256 << 20), ("recomputed", 1)):
        image, text, scale, t_image, t_text = [leaf(t.to(kernel_device), dtype) for t in inputs]
        out = DeGLALoss(num_negatives=k, backend="triton", chunk_bytes=budget)(image, text, scale, t_image, t_text)
        out.total.backward()
        errors[mode] = abs(float(out.total) - float(total_ref))
        rtol, atol, gtol = TOLERANCE[dtype]
        for name, got, want in zip(("image", "text"), (image.grad, text.grad), grads_ref):
            assert_grads_close(got.float(), want, gtol, f"{mode} {name}")
    assert errors["stored"] <= 2 * 100.0 * 2.0 ** -12
    assert errors["recomputed"] <= 1e-4 * max(1.0, float(total_ref))
