"""docs/loss.md's counts against the code: what a CPU can check of them (launches, allocations and
their sizes, the plan's passes, programs and memory at GPU sizes) is checked here."""
from __future__ import annotations

import pytest
import torch

from degla_fast.loss import count as loss_count
from degla_fast.kernels import degla_loss as kernels
from test_losses import _fwd_bwd_work


@pytest.mark.parametrize("chunk_bytes", [256 << 20, 1], ids=["stored", "recomputed"])
def test_triton_count_matches_a_real_call(chunk_bytes):
    """The count's launches and allocations (in order, with their bytes) are those of one
    forward + backward through the interpreter (B=16, K=4, D=32, fp32)."""
    work = _fwd_bwd_work("triton", chunk_bytes=chunk_bytes)
    count = loss_count.triton_count(16, 4, 32, "float32", store_bytes=chunk_bytes, gpu=None, precision="ieee")
    assert [f"triton:{name}" for name in count.launches] == work.launches
    assert [size for _, size, _ in count.allocations] == work.allocations
    assert (count.plan.stored is not None) == (chunk_bytes > 1)


def test_gemm_count_matches_a_real_call(monkeypatch):
    """The same for the gemm backend, one chunk (stored) and two recomputed ones."""
    import degla_fast.loss.gemm_backend as fused

    work = _fwd_bwd_work("gemm")
    count = loss_count.gemm_count(16, 4, 32, "float32", gpu=None)
    assert count.launches == \
        [n.replace("triton:", "").replace("addmm_", "addmm") for n in work.launches]
    assert [size for _, size, _ in count.allocations] == work.allocations
    monkeypatch.setattr(fused, "CHUNK_ALIGN", 16)
    two = _fwd_bwd_work("gemm", chunk_bytes=16 * 8 * 48)
    count = loss_count.gemm_count(16, 4, 32, "float32", chunk_bytes=16 * 8 * 48, gpu=None)
    assert len(count.launches) == len(two.launches) == 15
    assert [size for _, size, _ in count.allocations] == two.allocations


def test_the_targets_by_count_at_gpu_sizes():
    """Issue targets at K=4, D=512, bf16 on an H100 (the plans the launchers would make there):
    B=4096 within 1.25x the three-GEMM floor, 300 MB and 8 launches; at least two programs per SM
    in both backward kernels; B=256 fills the SMs; beyond, recomputed in at most 6 passes."""
    big = loss_count.triton_count(4096, 4, 512)
    assert big.plan.stored == torch.float16 and big.passes == 3
    assert big.x_floor() <= 1.25 and big.peak_bytes <= 300e6 and len(big.launches) <= 8
    sms = loss_count.H100["sms"]
    plan = big.plan
    assert plan.row_blocks * plan.slices * plan.dq_splits >= 2 * sms
    assert plan.col_blocks * plan.slices * plan.dx_splits >= 2 * sms
    small = loss_count.triton_count(256, 4, 512).plan
    assert small.row_blocks * small.slices * small.dq_splits >= sms
    assert small.col_blocks * small.slices * small.dx_splits >= sms
    huge = loss_count.triton_count(65536, 4, 512)
    assert huge.plan.stored is None and huge.passes <= 6 and huge.peak_bytes < 40e9
    recomputed = loss_count.triton_count(4096, 4, 512, store_bytes=0)
    assert recomputed.passes <= 6
    assert loss_count.gemm_count(4096, 4, 512).x_floor() > 2  # why gemm is no longer the modelled choice


def test_plans_keep_int32_offsets():
    """No stored logits, split partials or chunks of 2^31 elements or more (int32 offsets)."""
    from degla_fast.loss.gemm_backend import plan_chunks

    plan = kernels.make_plan(65536, 327680, 512, "bfloat16", "tf32", num_groups=65536, with_cols=True,
                             store_bytes=1 << 40, arch=90, sm_count=132)
    assert plan.stored is None  # 21e9 logits: not even an unlimited budget stores them
    assert plan.dq_splits * 65536 * 512 < 2 ** 31 and plan.dx_splits * 327680 * 512 < 2 ** 31
    chunks = plan_chunks(65536, 327680, 2, 1 << 40)
    assert len(chunks) > 1 and all(65536 * (c1 - c0) < 2 ** 31 for c0, c1 in chunks)


def test_docs_hold_the_current_tables():
    """docs/loss.md's tables are what ``python -m degla_fast.loss.count`` prints from the code now."""
    from pathlib import Path

    docs = (Path(__file__).resolve().parents[1] / "docs" / "loss.md").read_text(encoding="utf-8")
    for batch in (256, 4096, 65536):
        for line in loss_count.table(batch).splitlines():
            assert line in docs, f"docs/loss.md is missing (rerun python -m degla_fast.loss.count): {line}"
