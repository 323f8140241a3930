"""The ``triton`` backend: the kernels are the GEMMs, one autograd node (the design and its
counts: :mod:`degla_fast.loss.fused`'s doc and docs/loss.md; kernels:
:mod:`degla_fast.kernels.degla_loss`)."""
from __future__ import annotations

import torch

from ..kernels import degla_loss as kernels
from ..kernels import local_terms
from ..kernels.loss_terms import finish, new_state
from .fused import LossTerms, fused_backward, keep, local_args


class TritonLoss(torch.autograd.Function):
    """The ``triton`` backend, with :class:`~degla_fast.loss.gemm_backend.GemmLoss`'s signature and
    outputs (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``). The logits are kept from the forward (fp16 cosines
    for 16-bit inputs, fp32 for fp32) where they fit in ``chunk_bytes``, else recomputed in the
    backward (:func:`degla_fast.kernels.degla_loss.make_plan`)."""

    @staticmethod
    def forward(ctx, q, x, scale, teacher_q, teacher_x, terms: LossTerms):
        R, K = q.shape[0], terms.num_negatives
        num_groups = terms.num_groups(x.shape[0])
        s = scale.reshape(1).float()
        plan = kernels.plan_for(q, x, terms.dot_precision, num_groups=num_groups, with_cols=terms.with_cols,
                                store_bytes=terms.chunk_bytes)
        state = new_state(R, num_groups, plan.fwd_splits, plan.col_parts, q.device)
        logits = kernels.forward(q, x, s, state, plan, row_offset=terms.row_offset, num_negatives=K,
                                 with_igc=terms.with_igc)
        local = local_args(terms, q, x, teacher_q, teacher_x)
        tgc, tgc_lse, dist = local_terms.local_forward(*local) if local else (None, None, None)
        outs = finish(state, tgc, dist, terms.weights, num_groups=num_groups, **terms.flags)
        return keep(ctx, terms, scale, plan, outs, q, x, s, teacher_q, teacher_x, state["row_m"][0],
                    state["group_m"][0], state["col_m"][0], tgc_lse, logits)

    @staticmethod
    @fused_backward
    def backward(ctx, grads):
        q, x, s, teacher_q, teacher_x, row_lse, group_lse, col_lse, tgc_lse, logits = ctx.saved_tensors
        terms = ctx.terms
        dq, dx = torch.empty_like(q), torch.empty_like(x)
        if terms.local:  # written first; the global term's kernels add to it
            local_terms.local_backward(x, teacher_x, q, teacher_q, terms.num_negatives, terms.tgc_scale, tgc_lse,
                                       grads, terms.weights[2:], dx, dq, terms.official)
        dscale = kernels.backward(q, x, logits, s, grads, (row_lse, group_lse, col_lse), dq, dx, ctx.launch,
                                  row_offset=terms.row_offset, num_negatives=terms.num_negatives,
                                  weights=terms.weights, accumulate=terms.local, **terms.flags)
        return dq, dx, dscale
