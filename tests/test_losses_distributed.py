"""Two gloo processes on the CPU give the single-process loss and gradients of the concatenated batch,
with hard negatives (K=2) and as plain CLIP (K=0)."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from degla_fast.loss import functional as Fn
from exit_probe import thread_names
from test_losses import make_inputs

WORLD, B, D = 2, 3, 16
WEIGHTS = dict(igc_weight=0.1, tgc_weight=0.1, distill_weight=0.005)
#: The fused backends compute in fp32 (gemm casts fp64 inputs; triton's dots are fp32).
FP32_BACKENDS = ("gemm", "triton")
CASES = [(backend, local, with_grad, k) for backend in ("reference", "torch", "gemm", "triton")
         for local, with_grad in ((False, False), (True, True)) for k in (2, 0)]


def _rank_slice(inputs, rank, k):
    image, text, scale, t_image, t_text = inputs
    total = B * WORLD

    def text_slice(t):
        return torch.cat([t[rank * B:(rank + 1) * B], t[total + rank * B * k: total + (rank + 1) * B * k]])

    return image[rank * B:(rank + 1) * B], text_slice(text), scale, t_image[rank * B:(rank + 1) * B], text_slice(t_text)


def _worker(rank, init_file, out_dir):
    os.environ["TRITON_INTERPRET"] = "1"
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    results = {}
    for backend, local, with_grad, k in CASES:
        inputs = make_inputs(B * WORLD, k, D, dtype=torch.float64)
        image, text, scale, t_image, t_text = [t.clone().requires_grad_(i in (0, 1, 2))
                                              for i, t in enumerate(_rank_slice(inputs, rank, k))]
        dtype = torch.float32 if backend in FP32_BACKENDS else torch.float64
        leaves = [t.detach().to(dtype).requires_grad_() for t in (image, text, scale)]
        out = Fn.degla_loss(*leaves, t_image.to(dtype), t_text.to(dtype), num_negatives=k, backend=backend,
                            local_loss=local, gather_with_grad=with_grad, rank=rank, world_size=WORLD, **WEIGHTS)
        out.total.backward()
        results[(backend, local, with_grad, k)] = {
            "terms": [float(t.detach()) for t in (out.clip, out.igc, out.tgc, out.distill, out.total)],
            "grads": [t.grad.double() for t in leaves]}
    del out, leaves
    dist.destroy_process_group()
    results["threads after teardown"] = thread_names()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def run_ranks(worker, tmp, world: int = WORLD) -> list:
    """``worker(rank, init_file, out_dir)`` in ``world`` spawned processes (each joins a gloo group
    through ``init_file`` and saves its results to ``out_dir/rank<r>.pt``): the results in rank order."""
    mp.spawn(worker, args=(str(tmp / "init"), str(tmp)), nprocs=world, join=True)
    return [torch.load(tmp / f"rank{r}.pt") for r in range(world)]


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    return run_ranks(_worker, tmp_path_factory.mktemp("dist"))


def _single(k, scale_local_terms):
    """Single-process loss on the concatenated batch and gradients of ``objective``."""
    inputs = make_inputs(B * WORLD, k, D, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in inputs[:3]]
    out = Fn.degla_loss(*leaves, *inputs[3:], num_negatives=k, backend="reference", **WEIGHTS)
    objective = out.total if not scale_local_terms else (
        WORLD * (out.clip + 0.1 * out.igc + 0.1 * out.tgc) + 0.005 * out.distill)
    objective.backward()
    return out, [t.grad for t in leaves]


@pytest.mark.parametrize("backend,local,with_grad,k", CASES)
def test_two_processes_match_one(rank_results, backend, local, with_grad, k):
    tol = dict(rtol=2e-5, atol=2e-5) if backend in FP32_BACKENDS else dict(rtol=1e-9, atol=1e-10)
    ranks = [r[(backend, local, with_grad, k)] for r in rank_results]
    out, grads = _single(k, scale_local_terms=local)
    single = [float(t.detach()) for t in (out.clip, out.igc, out.tgc, out.distill, out.total)]
    if not local:
        # Every rank computes the whole gathered batch: the single-process loss exactly.
        for r in ranks:
            assert r["terms"] == pytest.approx(single, **{"rel": tol["rtol"], "abs": tol["atol"]})
    else:
        clip, igc, tgc, distill = (sum(r["terms"][i] for r in ranks) for i in range(4))
        assert [clip / WORLD, igc / WORLD, tgc / WORLD, distill] == pytest.approx(single[:4], rel=tol["rtol"], abs=tol["atol"])
    for rank, r in enumerate(ranks):
        image_g, text_g, _ = _rank_slice([grads[0], grads[1], None, grads[0], grads[1]], rank, k)[:3]
        torch.testing.assert_close(r["grads"][0], image_g, **tol)
        torch.testing.assert_close(r["grads"][1], text_g, **tol)
    # logit_scale is replicated: gradient contributions of the ranks add up (non-local: each rank has it all)
    scale_grad = ranks[0]["grads"][2] if not local else sum(r["grads"][2] for r in ranks)
    torch.testing.assert_close(scale_grad, grads[2], **tol)


def test_teardown_ends_the_gloo_threads(rank_results):
    # Nothing the loss does (gathers with gradients included) may keep the process group alive
    # after destroy_process_group: its threads would meet interpreter shutdown, where a finished
    # rank occasionally ends in SIGABRT.
    for r in rank_results:
        assert not [name for name in r["threads after teardown"] if "gloo" in name]
