"""How far the DeGLA loss and its gradients in bf16 are from the float64 oracle (benchmarks/loss_oracle.py).

The trainer hands the loss its features in the autocast dtype (bf16 on a GPU); the kernels
accumulate in fp32. This measures, on the CPU, the error of bf16 features against the float64
loss of the same (unrounded) features, split into what the rounding of the inputs costs and
what the loss arithmetic adds, for each backend, at the demo's shapes (configs/demo-cpu.yaml:
B=64, K=4, degla-tiny D=128) and at ViT-B/32's (B=256 per GPU, K=4, D=512)::

    TRITON_INTERPRET=1 .venv/bin/python benchmarks/bf16_loss_error.py            # both shapes
    TRITON_INTERPRET=1 .venv/bin/python benchmarks/bf16_loss_error.py --quick    # demo shape only

Columns: ``loss_rel`` |loss - oracle| / |oracle| and ``grad_rel`` max |grad - oracle grad| /
max |oracle grad| (image, text and logit_scale gradients; the worst of the three), with the
oracle evaluated on the fp32 features (``vs exact``) and on the bf16-rounded features
(``vs rounded``: the loss arithmetic alone).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

from loss_oracle import oracle_terms

WEIGHTS = (0.1, 0.1, 0.005)
SHAPES = {"demo (degla-tiny)": (64, 4, 128), "ViT-B/32 per GPU": (256, 4, 512)}


def features(batch: int, k: int, dim: int, seed: int = 0):
    """Unit features as a trained CLIP gives them: a student, and a teacher close to it (after EMA
    warm-up), logit scale 100 (the clamp; the largest, so the worst case for rounding)."""
    gen = torch.Generator().manual_seed(seed)

    def unit(t):
        return F.normalize(t, dim=-1)

    image = unit(torch.randn(batch, dim, generator=gen, dtype=torch.float64))
    text = unit(torch.randn(batch * (1 + k), dim, generator=gen, dtype=torch.float64))
    # Positives correlated with their image, so the logits are not all near 0.
    text[:batch] = unit(text[:batch] + 2.0 * image)
    t_image = unit(image + 0.05 * torch.randn(image.shape, generator=gen, dtype=torch.float64))
    t_text = unit(text + 0.05 * torch.randn(text.shape, generator=gen, dtype=torch.float64))
    return [t.float() for t in (image, text, torch.tensor(100.0, dtype=torch.float64), t_image, t_text)]


def oracle(inputs, k):
    """float64 total loss and gradients (image, text, logit_scale) of ``inputs`` (any dtype)."""
    image, text, scale, t_image, t_text = [t.detach().double().requires_grad_(i < 3) for i, t in enumerate(inputs)]
    clip, igc, tgc, distill = oracle_terms(image, text, scale, t_image, t_text, k)
    total = clip + WEIGHTS[0] * igc + WEIGHTS[1] * tgc + WEIGHTS[2] * distill
    total.backward()
    return total.detach(), (image.grad, text.grad, scale.grad)


def measure(backend: str, batch: int, k: int, dim: int) -> dict:
    from degla_fast.loss import DeGLALoss

    exact = features(batch, k, dim)
    rounded = [t.to(torch.bfloat16) if i != 2 else t for i, t in enumerate(exact)]  # logit_scale stays fp32
    leaves = [t.detach().clone().requires_grad_(i < 3) for i, t in enumerate(rounded)]
    out = DeGLALoss(num_negatives=k, backend=backend)(*leaves)
    out.total.backward()
    row = {"backend": backend, "B": batch, "K": k, "D": dim}
    for name, inputs in (("exact", exact), ("rounded", rounded)):
        total, grads = oracle(inputs, k)
        row[f"loss_rel_vs_{name}"] = float((out.total.double() - total).abs() / total.abs())
        row[f"grad_rel_vs_{name}"] = max(float((g.grad.double() - want).abs().max() / want.abs().max())
                                         for g, want in zip(leaves[:3], grads))
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the demo shape only")
    args = parser.parse_args(argv)
    backends = ["reference", "torch"] + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else [])
    shapes = {k: v for k, v in SHAPES.items() if not args.quick or k.startswith("demo")}
    print("| shape | backend | loss rel. err. vs exact | grad rel. err. vs exact | loss vs rounded | grad vs rounded |")
    print("|---|---|---|---|---|---|")
    for label, (batch, k, dim) in shapes.items():
        for backend in backends:
            r = measure(backend, batch, k, dim)
            print(f"| {label} B={batch} K={k} D={dim} | {backend} | {r['loss_rel_vs_exact']:.2e} | "
                  f"{r['grad_rel_vs_exact']:.2e} | {r['loss_rel_vs_rounded']:.2e} | {r['grad_rel_vs_rounded']:.2e} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
