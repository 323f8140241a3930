"""What the CPU thread rule (degla_fast/threads.py) is for: processes that share a node's cores,
each with torch's default thread count (one thread per core, in every process) against the
rule's (the cores divided by the processes), in one run.

``--processes`` processes (default 2: ``torchrun --nproc_per_node 2`` on CPUs, or the demo's two
fine-tunes) each train the tiny CLIP (``degla-tiny``, random weights, batch 8, the CLIP loss,
AdamW) for ``--steps`` steps at the same time; a round's time is the slowest process's. The two
settings alternate round by round, so that a change of machine load hits both alike, and the
ratio of their median round times is the rule's effect on this machine. Rows carry the cores,
the threads each process used and the 1-minute load average.

    python benchmarks/bench_threads.py [--quick] [--processes 2] [--steps 10] [--rounds 3]
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time

from common import percentiles, report_run


def _train(schedule: list[int | None], steps: int, barrier, results) -> None:
    """One process: the tiny CLIP for ``steps`` steps per entry of ``schedule`` (threads; None:
    torch's default, what this process started with), every round begun with the other processes."""
    import torch
    import torch.nn.functional as F

    from degla_fast.model import TINY_MODEL, create_model

    default = torch.get_num_threads()
    torch.manual_seed(0)
    bundle = create_model(TINY_MODEL, None)
    model = bundle.model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.randn(8, 3, bundle.image_size, bundle.image_size)
    tokens = torch.randint(1, 1000, (8, 16))

    def step():
        image, text = model.encode_image(images, normalize=True), model.encode_text(tokens, normalize=True)
        logits = model.logit_scale.exp() * image @ text.T
        labels = torch.arange(len(images))
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for index, threads in enumerate(schedule):
        torch.set_num_threads(default if threads is None else threads)
        step()  # warm-up (first-call allocations; a new thread count's pool)
        barrier.wait()  # the timed steps of every process start together
        start = time.perf_counter()
        for _ in range(steps):
            step()
        results.put((index, torch.get_num_threads(), time.perf_counter() - start))


def run(quick: bool, processes: int = 2, steps: int | None = None, rounds: int | None = None) -> list[dict]:
    from degla_fast.threads import choose_threads

    steps, rounds = steps or (1 if quick else 10), rounds or (1 if quick else 3)
    chosen, why = choose_threads(processes=processes)
    settings = [("torch default", None), ("degla-fast rule", chosen)] * rounds  # alternating
    load_before = os.getloadavg()[0]
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(processes), ctx.Queue()
    # torch's default is what a process gets without OMP_NUM_THREADS (which this one may have).
    saved = os.environ.pop("OMP_NUM_THREADS", None)
    try:
        procs = [ctx.Process(target=_train, args=([t for _, t in settings], steps, barrier, results))
                 for _ in range(processes)]
        for p in procs:
            p.start()
    finally:
        if saved is not None:
            os.environ["OMP_NUM_THREADS"] = saved
    slowest: dict[int, float] = {}
    used: dict[str, int] = {}
    for _ in range(len(settings) * processes):
        index, threads, seconds = results.get(timeout=1800)
        slowest[index] = max(slowest.get(index, 0.0), seconds)  # a round lasts until its slowest process
        used[settings[index][0]] = threads
    for p in procs:
        p.join()
    times = {impl: [slowest[i] * 1e3 for i, (name, _) in enumerate(settings) if name == impl]
             for impl in ("torch default", "degla-fast rule")}
    load = f"{load_before:.1f}-{os.getloadavg()[0]:.1f}"
    rows = [{"name": f"{processes} processes x {steps} steps (degla-tiny, batch 8)", "impl": impl,
             "threads_per_process": used[impl], "cores": len(os.sched_getaffinity(0)), "rounds": rounds,
             "load_1min": load, **percentiles(times[impl])} for impl in times]
    rule = statistics.median(times["degla-fast rule"])
    for row in rows:
        row["time_vs_rule"] = row["p50_ms"] / rule
    rows[1]["why"] = why
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 step, 1 round (proves the benchmark runs)")
    parser.add_argument("--processes", type=int, default=2, help="processes sharing the cores (default 2)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per process (default 10)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per setting, alternating (default 3)")
    args = parser.parse_args(argv)
    rows = run(args.quick, args.processes, args.steps, args.rounds)
    report_run("bench_threads", rows, ["name", "impl", "threads_per_process", "p50_ms", "time_vs_rule", "rounds",
                                       "cores", "load_1min"], quick=args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
