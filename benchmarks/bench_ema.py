"""EMA teacher update over CLIP parameter lists: the release's loop vs ``_foreach_lerp_`` vs one
flat ``lerp_`` vs ``EMATeacher.update`` (torch and Triton backends), against the device's copy
bandwidth measured in the same run.

With ``forward_dtype=bf16`` the same pass also writes the bf16 weights of the teacher's forward,
compared with the update followed by the fp32 -> bf16 cast of every weight (what autocast does
at each teacher forward). Parameter lists are shaped like open_clip's ViT-B/32 (151M, 302 tensors) and ViT-L/14 (428M,
446 tensors), built on the meta device from open_clip's configs (nothing is downloaded). Bytes
moved per update: read teacher + read student + write teacher. The copy reference is
``dst.copy_(src)`` over the same number of bytes (read + write). ``--quick``: a list with the
same tensor count scaled down 32x, on the CPU, torch only (Triton's CPU interpreter is not a
kernel). CPU timings say nothing about GPU kernels.

    python benchmarks/bench_ema.py --quick
    python benchmarks/bench_ema.py            # on a GPU: full lists, all implementations
"""
from __future__ import annotations

import argparse
import sys

import torch

from common import add_ratios, markdown_table, measure, write_results

DECAY = 0.9996
MODELS = {"ViT-B/32": "ViT-B-32", "ViT-L/14": "ViT-L-14"}
_QUICK_SCALE = 32


def clip_parameter_shapes(open_clip_name: str) -> list[torch.Size]:
    """Shapes of every parameter of an open_clip CLIP model, built on the meta device."""
    import open_clip

    with torch.device("meta"):
        model = open_clip.model.CLIP(**open_clip.get_model_config(open_clip_name))
    return [p.shape for p in model.parameters()]


class _Params(torch.nn.Module):
    """A module holding a list of parameters (the student of ``EMATeacher.update``)."""

    def __init__(self, tensors: list[torch.Tensor]):
        super().__init__()
        self.params = torch.nn.ParameterList([torch.nn.Parameter(t, requires_grad=False) for t in tensors])


def _gbps(row: dict, bytes_moved: int, copy_ms: float | None) -> dict:
    row["bytes_moved"] = bytes_moved
    row["gb_per_s"] = bytes_moved / (row["p50_ms"] * 1e-3) / 1e9
    if copy_ms:
        row["pct_of_copy_bw"] = 100.0 * (bytes_moved / row["p50_ms"]) / (bytes_moved / copy_ms)
    return row


def _bench_list(label: str, shapes: list[torch.Size], device: torch.device, student_dtype: torch.dtype,
                triton: bool, iters: int) -> list[dict]:
    from degla_fast import EMATeacher
    from degla_fast.ema.reference import ema_update_loop_

    numel = sum(s.numel() for s in shapes)
    fields = {"params": numel, "tensors": len(shapes), "student_dtype": str(student_dtype).replace("torch.", "")}
    student = [torch.randn(s, device=device).to(student_dtype) for s in shapes]
    teacher = [s.to(torch.float32, copy=True) for s in student]  # never the student itself
    flat_t = torch.cat([t.reshape(-1) for t in teacher])
    flat_s = torch.cat([s.reshape(-1) for s in student])
    s_bytes = student[0].element_size()
    fp32_bytes = numel * (4 + s_bytes + 4)

    # Copy bandwidth: dst.copy_(src) moving the fp32 EMA's bytes (half read, half written).
    copy_src = torch.empty(fp32_bytes // 2, dtype=torch.uint8, device=device)
    copy_dst = torch.empty_like(copy_src)
    copy = measure(label, "copy_", lambda: copy_dst.copy_(copy_src), device=device, iters=iters, memory=False,
                   **fields, teacher_dtype="-")
    copy_ms = copy["p50_ms"]
    rows = [_gbps(copy, fp32_bytes, copy_ms)]

    def case(impl, fn, bytes_moved, teacher_dtype="float32"):
        row = measure(label, impl, fn, device=device, iters=iters, memory=False, **fields, teacher_dtype=teacher_dtype)
        rows.append(_gbps(row, bytes_moved, copy_ms))

    case("release loop", lambda: ema_update_loop_(teacher, student, DECAY), numel * (8 + 2 * s_bytes))  # mul_ + add_
    if student_dtype == torch.float32:
        case("_foreach_lerp_", lambda: torch._foreach_lerp_(teacher, student, 1 - DECAY), fp32_bytes)
        case("flat lerp_ (floor)", lambda: flat_t.lerp_(flat_s, 1 - DECAY), fp32_bytes)
    module = _Params(student)
    backends = ["torch"] + (["triton"] if triton else [])
    for backend in backends:
        ema = EMATeacher(module, decay=DECAY, backend=backend)
        case(f"EMATeacher.update ({backend})", lambda ema=ema: ema.update(module), fp32_bytes)
        # (A "bf16 teacher" is an fp32 state with a bf16 forward copy: the forward_dtype row below.)
        # Stretch (a): the bf16 weights of the teacher's forward written by the same pass, vs the
        # separate fp32 -> bf16 cast of every weight that autocast does at each teacher forward.
        views = list(ema.module.parameters())
        case(f"EMATeacher.update ({backend}) + bf16 cast of weights",
             lambda ema=ema, views=views: (ema.update(module), [v.to(torch.bfloat16) for v in views]),
             fp32_bytes + numel * (4 + 2))
        fused = EMATeacher(module, decay=DECAY, backend=backend, forward_dtype=torch.bfloat16)
        case(f"EMATeacher.update ({backend}, forward_dtype=bf16)", lambda ema=fused: ema.update(module),
             fp32_bytes + numel * 2)
        del ema, fused, views
    return rows


def run(quick: bool) -> list[dict]:
    """One row per (parameter list, student dtype, implementation); see the module docstring."""
    device = torch.device("cuda" if torch.cuda.is_available() and not quick else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(1)  # on a shared machine a stalled second thread dominates the timings
    triton = device.type == "cuda"
    rows: list[dict] = []
    for label, name in MODELS.items():
        shapes = clip_parameter_shapes(name)
        if quick:
            label = f"{label} / {_QUICK_SCALE}"
            shapes = [torch.Size([max(1, s.numel() // _QUICK_SCALE)]) for s in shapes]
        for student_dtype in (torch.float32, torch.bfloat16):
            rows += _bench_list(label, shapes, device, student_dtype, triton, iters=20 if quick else 50)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if quick:
            break  # one list proves the benchmark on the CPU
    return add_ratios(rows, "release loop", group_by=("name", "student_dtype"))


COLUMNS = ["name", "student_dtype", "teacher_dtype", "impl", "p50_ms", "gb_per_s", "pct_of_copy_bw",
           "speedup_vs_release loop"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small CPU sizes (proves the benchmark runs)")
    args = parser.parse_args(argv)
    rows = run(args.quick)
    print(markdown_table(rows, COLUMNS))
    path = write_results("bench_ema" + ("_quick" if args.quick else ""), rows)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
