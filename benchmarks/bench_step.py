"""One training step split into its phases (data, forward, teacher forward, loss, backward,
optimiser, EMA) for plain CLIP, the released DeGLA step re-implemented faithfully, and ours, on
the same model and batch.

- ``plain CLIP``: B image/caption pairs, 77-token captions, CLIP loss, no teacher.
- ``DeGLA as released``: 1 + K captions per image padded to 77 tokens, the reference loss
  (full logits, masked IGC/TGC), an fp32 teacher run under the student's autocast, and the
  per-parameter ``mul_``/``add_`` EMA loop.
- ``DeGLA (ours)``: captions trimmed to the batch's longest, the fused loss (``backend="auto"``),
  ``EMATeacher`` (one fused pass that also writes the teacher's bf16 forward weights on a GPU).

Plain CLIP and ours are ``degla_fast.train.step.train_step`` itself, on the trainer's parts:
what is benchmarked is what trains (the released step keeps its own loop). ``p50_ms`` is the
step as it trains, with no sync inside; the phase columns come from the same steps run again
with a device sync at each phase boundary. On a GPU the table has B=256 for every variant and
B=1024 for the eager ones (``peak_mem_bytes``: does it fit), each case in its own process,
measured in this order: eager at B=256, ours at B=1024, the compiled ones (ours first), then the
other eager ones at B=1024.
``--synthetic-data``: ``make train``'s fine-tuning step on the CPU (``degla-synth``, B=32, K=4,
fp32, one thread) with its batch read from a rendered synthetic world (256 fine-tuning scenes) by
the trainer's own torch pipeline in the training process, as ``make train`` reads it, each cut
added to the one before: the step as before (every image decoded on every read, each crop seeded
with ``torch.manual_seed``, CLIP's 49,408-token vocabulary), the crop seed on the CPU generator only
(no image cache), decoded images kept in memory (still CLIP's vocabulary), and as it is now
(degla-synth's 128-id compact vocabulary), and with the image tower (the student's, then the
teacher's forward) on a second thread (the trainer's ``tower_thread``: one thread each, on a
2-core machine the step then has a core to spare): ``speedup_vs_DeGLA (ours), data as before`` is the
ratio, written to ``bench_step_data.json``. The warm-up is one epoch, so the timed steps read every image from the
cache, as the fine-tuning's epochs after its first do.
``--budget-s S`` (what ``make gpu-check`` gives this benchmark) starts a case only when the
rest of S covers it and stops one at the end of S: what does not fit is a row that says so.

Every phase sits in a ``record_function`` range (NVTX too on CUDA) named data, forward,
teacher_forward, loss, backward, optimizer, ema; ``--profile TRACE.json`` writes a torch.profiler
Chrome trace of one variant. GPU: ViT-B-32-quickgelu (random weights), B=256, K=4, bf16 autocast,
fused AdamW. ``--quick``: the tiny model on the CPU in fp32, which proves the benchmark runs and
says nothing about GPU speed.

    python benchmarks/bench_step.py --quick
    python benchmarks/bench_step.py                       # GPU
    python benchmarks/bench_step.py --budget-s 150        # GPU, what fits in 150 s
    python benchmarks/bench_step.py --profile benchmarks/results/trace_step.json --variant "DeGLA (ours)"
    python benchmarks/bench_step.py --synthetic-data     # CPU: make train's step, data as before vs now
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from common import add_ratios, peak_rss_bytes, percentiles, profile_trace, report_run

from degla_fast.profiling import PhaseClock, profile_range

NAME = "bench_step"
PHASES = ("data", "forward", "teacher_forward", "loss", "backward", "optimizer", "ema")
VARIANTS = ("plain CLIP", "plain CLIP (torch.compile)", "DeGLA as released", "DeGLA (ours)",
            "DeGLA (ours, torch.compile)")
#: ``--synthetic-data``: how each case reads its batches (:func:`data_batches`)
#: variant -> (how the batches are read, the token vocabulary): each cut added to the one before
DATA_VARIANTS = {"DeGLA (ours), data as before": ("before", "clip"),
                 "DeGLA (ours), data, no image cache": ("no cache", "clip"),
                 "DeGLA (ours), data, CLIP vocabulary": ("now", "clip"),
                 "DeGLA (ours), data": ("now", "compact"),
                 "DeGLA (ours), data, tower threads": ("now", "compact")}
DATA_BASELINE = "DeGLA (ours), data as before"
#: fine-tuning scenes of the ``--synthetic-data`` world: the warm-up (one epoch at B=32) reads each once
DATA_IMAGES = 256
CONTEXT = 77
SOT, EOT = 49406, 49407


def synthetic_tokens(rows: int, gen: torch.Generator, min_len: int = 8, max_len: int = 24) -> torch.Tensor:
    """``[rows, 77]`` CLIP-style token ids: start, random words, end-of-text, zero padding.
    Lengths are drawn in ``[min_len, max_len]``, the range of COCO-like captions."""
    tokens = torch.zeros(rows, CONTEXT, dtype=torch.long)
    lengths = torch.randint(min_len, max_len + 1, (rows,), generator=gen)
    for i, n in enumerate(lengths.tolist()):
        tokens[i, 0] = SOT
        tokens[i, 1:n - 1] = torch.randint(1, 49000, (n - 2,), generator=gen)
        tokens[i, n - 1] = EOT
    return tokens


class Step:
    """One variant's model, teacher, loss and optimiser. ``__call__(phases=True)`` runs one step
    and returns its phase times in ms (device-synchronised at each phase boundary);
    ``phases=False`` runs it as training does (no sync inside) and returns ``{"total": ms}``
    with one sync at the end.

    Plain CLIP and ours run ``degla_fast.train.step.train_step`` itself on the trainer's parts
    (``StepParts``: fused AdamW, schedule, clamp, device-side finiteness, EMATeacher with its
    bf16 forward copy on a GPU); the released DeGLA step keeps its own loop below.
    """

    def __init__(self, variant: str, *, model_name: str, batch: int, num_negatives: int, device: torch.device,
                 amp: torch.dtype | None, data: str | None = None):
        from degla_fast import EMATeacher
        from degla_fast.model import create_model
        from degla_fast.ema.reference import ema_update_loop_
        from degla_fast.train.optim import build_optimizer, build_scheduler
        from degla_fast import DeGLALoss
        from degla_fast.train.step import StepParts, clamp_logit_scale_

        self.variant, self.device, self.amp = variant, device, amp
        self.released, self.plain = variant.startswith("DeGLA as released"), variant.startswith("plain")
        self.k = 0 if self.plain else num_negatives
        torch.manual_seed(0)
        self.bundle = create_model(model_name, None, device=str(device))
        self.model = self.bundle.model.train()
        self.loss_fn = DeGLALoss(num_negatives=self.k, backend="reference" if self.released else "auto",
                                 check_finite=False)
        self.optimizer = build_optimizer(self.model, lr=1e-5, weight_decay=0.1, betas=(0.9, 0.98), eps=1e-6)
        self.teacher = self.ema = self.parts = None
        if self.released:
            import copy

            self.teacher = copy.deepcopy(self.model).eval().requires_grad_(False)
            t_params, s_params = list(self.teacher.parameters()), list(self.model.parameters())
            self.ema = lambda: ema_update_loop_(t_params, s_params, 0.9996)
        else:
            teacher = None
            if not self.plain:
                teacher = EMATeacher(self.model, decay=0.9996, forward_dtype=amp)  # the trainer's bf16 copy
                self.teacher = teacher.module
            model = self.model
            self.parts = StepParts(
                model=model, loss_fn=self.loss_fn, optimizer=self.optimizer,
                scheduler=build_scheduler(self.optimizer, warmup_steps=1, total_steps=10**6),
                clamp_logit_scale=lambda: clamp_logit_scale_(model), teacher=teacher,
                autocast_dtype=amp, teacher_autocast_dtype=amp,
                # (the trainer's tower_thread: the image tower, the teacher's too, on a second thread)
                tower_pool=ThreadPoolExecutor(1, thread_name_prefix="image-tower") if "tower threads" in variant
                else None)
        if "torch.compile" in variant:
            # As the trainer does (model.compile): each tower in place, the teacher's too.
            for net in [self.model] + ([self.teacher] if self.teacher is not None else []):
                net.visual.compile()
                net.transformer.compile()
        gen = torch.Generator().manual_seed(0)
        size = self.bundle.image_size
        self.images = torch.randn(batch, 3, size, size, generator=gen)
        self.tokens = synthetic_tokens(batch * (1 + self.k), gen)
        if device.type == "cuda":
            self.images, self.tokens = self.images.pin_memory(), self.tokens.pin_memory()
        self.batches = None if data is None else data_batches(data, variant, self.bundle, batch, self.k)

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, phases: bool = True) -> dict:
        from degla_fast.data.text import trim_tokens
        from degla_fast.train.step import train_step

        start = time.perf_counter()
        with profile_range("data"):
            if self.batches is not None:  # the trainer's pipeline: trimmed tokens, normalised images
                batch = next(self.batches)
                images, tokens = batch.images, batch.tokens
                self.tokens = tokens
            else:
                # The release pads every caption to 77 tokens; ours trims to the batch's longest.
                tokens = self.tokens if self.released or self.plain else trim_tokens(self.tokens)
                images = self.images.to(self.device, non_blocking=True)
                tokens = tokens.to(self.device, non_blocking=True)
        if phases:
            self._sync()
        data_ms = (time.perf_counter() - start) * 1e3
        if self.released:
            times = self._released_step(images, tokens, phases)
        else:
            self.parts.sync = self._sync if phases else None
            result = train_step(self.parts, images, tokens)
            times = {PHASE_OF.get(k, k): v * 1e3 for k, v in result.times.items()}
        if not phases:
            self._sync()
            return {"total": (time.perf_counter() - start) * 1e3}
        return {"data": data_ms, **times}

    def _released_step(self, images, tokens, phases: bool) -> dict:
        """The released DeGLA step: fp32 teacher under the student's autocast, features upcast to
        fp32 for the reference loss, plain AdamW step, the per-parameter EMA loop."""
        from degla_fast.model import clip_features
        from degla_fast.train.step import clamp_logit_scale_

        clock = PhaseClock(self._sync if phases else None)
        amp = dict(device_type=self.device.type, dtype=self.amp, enabled=self.amp is not None)
        with clock.phase("forward"), torch.autocast(**amp):
            image, text, scale = clip_features(self.model, images, tokens)
        with clock.phase("teacher_forward"), torch.no_grad(), torch.autocast(**amp):
            t_image, t_text, _ = clip_features(self.teacher, images, tokens)
        t_image, t_text = t_image.float(), t_text.float()
        with clock.phase("loss"):
            out = self.loss_fn(image.float(), text.float(), scale.float(), t_image, t_text)
        with clock.phase("backward"):
            out.total.backward()
        with clock.phase("optimizer"):
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            clamp_logit_scale_(self.model)
        with clock.phase("ema"):
            self.ema()
        return {k: v * 1e3 for k, v in clock.times.items()}


#: train_step's phase names -> this benchmark's
PHASE_OF = {"optim": "optimizer"}


def data_batches(folder: str, variant: str, bundle, batch: int, k: int):
    """Endless batches of the synthetic world in ``folder`` through the trainer's torch pipeline in
    this process (``make train``'s ``num_workers=0``), read as :data:`DATA_VARIANTS` says. "before"
    puts ``torch.manual_seed`` back as the crop seed: this case runs in a process of its own."""
    from degla_fast.data import build_train_data, torch_pipeline
    from degla_fast.data.loader import IMAGE_CACHE_BYTES

    how = DATA_VARIANTS[variant][0]
    if how == "before":
        torch_pipeline.seed_cpu_rng = torch.manual_seed
    data = build_train_data(Path(folder) / "train.json", tokenizer=bundle.tokenizer, image_size=bundle.image_size,
                            mean=bundle.mean, std=bundle.std, batch_size=batch, num_negatives=k, pipeline="torch",
                            num_workers=0, image_cache_bytes=IMAGE_CACHE_BYTES if how == "now" else 0)
    epoch = 0
    while True:
        data.set_epoch(epoch)
        yield from data
        epoch += 1


def data_config(folder: str) -> dict:
    """The ``--synthetic-data`` cases: ``make train``'s fine-tuning step (model, B, K, fp32) on the
    CPU, the warm-up one epoch of the world in ``folder``."""
    return {"model": "degla-synth", "B": 32, "K": 4, "device": "cpu", "precision": "fp32",
            "warmup": DATA_IMAGES // 32, "iters": 10, "data": str(folder)}


def config(quick: bool, batch: int | None = None) -> dict:
    """Model, batch and precision of a run: the tiny model on the CPU, ViT-B/32 at B=256 on a GPU
    (``batch`` overrides B, e.g. 1024 to check that it fits)."""
    gpu = torch.cuda.is_available() and not quick
    if gpu:
        cfg = {"model": "ViT-B-32-quickgelu", "B": 256, "K": 4, "device": "cuda", "precision": "bf16",
               "warmup": 3, "iters": 10}
    else:
        cfg = {"model": "degla-tiny", "B": 8 if quick else 64, "K": 4, "device": "cpu", "precision": "fp32",
               "warmup": 1, "iters": 2 if quick else 5}
    return {**cfg, "B": batch or cfg["B"]}


def clip_vocabulary_model(name: str) -> str:
    """``name`` as it was before its compact vocabulary (degla_fast/vocab.py): its open_clip config
    with CLIP's 49,408-row token embedding, registered as ``<name>-clip-vocab``, whose tokenizer is
    open_clip's own."""
    import tempfile

    import open_clip

    from degla_fast.vocab import clip_vocabulary_overrides

    cfg = {**open_clip.get_model_config(name), **clip_vocabulary_overrides(name)}
    with tempfile.TemporaryDirectory(prefix="bench_step-vocab-") as folder:
        (Path(folder) / f"{name}-clip-vocab.json").write_text(json.dumps(cfg))
        open_clip.add_model_config(folder)  # reads the file now
    return f"{name}-clip-vocab"


def build(variant: str, cfg: dict) -> Step:
    """The :class:`Step` of ``variant`` under run config ``cfg`` (see :func:`config`)."""
    import degla_fast.model  # noqa: F401  (registers the tiny model config with open_clip)

    amp = torch.bfloat16 if cfg["precision"] == "bf16" else None
    name = cfg["model"]
    if DATA_VARIANTS.get(variant, (None, "compact"))[1] == "clip":
        name = clip_vocabulary_model(name)
    return Step(variant, model_name=name, batch=cfg["B"], num_negatives=cfg["K"],
                device=torch.device(cfg["device"]), amp=amp, data=cfg.get("data"))


def run_case(case: dict) -> dict:
    """Measure one ``{"variant", **config}`` case: per-phase p50 ms, total p20/p50/p80, peak memory."""
    device = torch.device(case["device"])
    if device.type == "cpu":
        torch.set_num_threads(1)
    row = _row_of(case["variant"], case)
    try:
        step = build(case["variant"], case)
        for _ in range(case["warmup"]):
            step(phases=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        # The step as it trains (no sync inside it), then the same steps with a sync per phase for the split.
        totals = [step(phases=False)["total"] for _ in range(case["iters"])]
        samples = [step() for _ in range(case["iters"])]
    except torch.cuda.OutOfMemoryError:
        return {**row, "skipped": "out of memory"}
    row.update(percentiles(totals))
    for phase in PHASES:
        row[f"{phase}_ms"] = sorted(s[phase] for s in samples)[len(samples) // 2]
    # Peak of the whole process (weights, optimiser state, activations), as a user sizes a GPU.
    row["peak_mem_bytes"] = torch.cuda.max_memory_allocated() if device.type == "cuda" else peak_rss_bytes()
    row["peak_mem_gib"] = round(row["peak_mem_bytes"] / 2**30, 2)
    row["params"] = sum(p.numel() for p in step.model.parameters())
    row["text_tokens"] = int(step.tokens.shape[1] if step.released or step.plain else
                             (step.tokens != 0).any(0).nonzero()[-1] + 1)
    return row


#: GPU: the batch of the timing table and the one whose peak memory must fit (eager variants only).
GPU_BATCHES = (256, 1024)
EAGER = ("plain CLIP", "DeGLA as released", "DeGLA (ours)")
#: Compiled variants, ours first: a budget too short for both still measures the one the target is about.
COMPILED = ("DeGLA (ours, torch.compile)", "plain CLIP (torch.compile)")
#: Seconds one case is expected to take on an H100/H200 (fresh process, imports, model build, warm-up
#: with its kernel compiles, the timed steps): a budgeted run (``budget_s``) starts a case only when
#: at least this much of the budget is left, or 1.25 times the longest case of the same stage so far.
#: Guesses until a GPU run records ``case_s``; a compiled case is mostly Inductor's compiles of both
#: towers (and the teacher's, for ours).
CASE_NEED_S = {"eager": 25.0, "peak memory": 30.0, "compiled": 90.0}
#: On the CPU (quick mode, the gpu-check dry run) every case needs about this much.
CPU_CASE_NEED_S = 4.0


def stages(quick: bool, batch: int | None = None, peak_batch: int | None = None) -> list[tuple[str, dict, tuple]]:
    """``(stage, case config, variants)`` in the order they are measured, what the targets need
    first: every eager variant at the table's batch; ours at the peak-memory batch (B=1024 on a
    GPU; ``peak_batch`` elsewhere, none by default: does it fit); the compiled ones, whose
    compiles cost the most; then the other eager ones at the peak-memory batch. With ``batch``
    given, every variant at that batch only."""
    cfg = config(quick, batch)
    gpu = cfg["device"] == "cuda"
    peak = GPU_BATCHES[1] if gpu and batch is None else peak_batch
    peak_cfg = {**cfg, "B": peak, "warmup": 1, "iters": 3}
    with_peak = bool(peak) and peak != cfg["B"]
    out = [("eager", cfg, EAGER)]
    if with_peak:
        out.append(("peak memory", peak_cfg, ("DeGLA (ours)",)))
    out.append(("compiled", cfg, COMPILED))
    if with_peak:
        out.append(("peak memory", peak_cfg, ("DeGLA as released", "plain CLIP")))
    return out


def _run_case_process(case: dict, timeout: float, limit: str = "the rest of the budget") -> dict:
    """``run_case`` in a fresh process (its own peak memory and compile caches) with a time limit;
    the process and its children (Inductor's compile workers) are its own process group, ended
    whole at the limit. A failing case is a row with its reason, never an exception."""
    import signal
    import subprocess

    cmd = [sys.executable, str(Path(__file__).resolve()), "--case", json.dumps(case)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace",
                            start_new_session=True)

    def end_group():
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the group this call started, nothing else
        except ProcessLookupError:
            pass

    try:
        stdout, stderr = proc.communicate(timeout=max(timeout, 1.0))
    except subprocess.TimeoutExpired:
        end_group()
        proc.communicate()
        return {"skipped": f"timed out after {timeout:.0f} s ({limit})"}
    except BaseException:  # stopped from outside (SIGINT, or SIGTERM made an exit): the case goes too
        end_group()
        raise
    end_group()  # whatever the case left behind (compile workers)
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (stderr.strip().splitlines() or ["no output"])[-1]
        return {"skipped": f"case failed (exit {proc.returncode}): {tail[:200]}"}
    return json.loads(lines[-1])


def _row_of(variant: str, case: dict) -> dict:
    return {"name": "train_step", "impl": variant, "model": case["model"], "B": case["B"],
            "K": 0 if variant.startswith("plain") else case["K"], "precision": case["precision"]}


def run(quick: bool, batch: int | None = None, *, budget_s: float | None = None, peak_batch: int | None = None,
        on_row=None, clock=time.monotonic, data: str | None = None) -> list[dict]:
    """One row per case of :func:`stages`, each case in a fresh process; compiled variants only on
    a GPU. On a GPU without ``batch``: every variant at B=256 and the eager ones at B=1024 (peak
    memory; out of memory is a row that says so), in the order of :func:`stages`.

    ``budget_s``: the seconds the whole may take (``make gpu-check`` gives it its stage's
    share): a case starts only when what is left covers what it needs (:data:`CASE_NEED_S`) and
    runs at most until the budget ends; a case not started or stopped is a row whose ``skipped``
    says why, so the table shows what the budget left out. ``on_row(row)`` sees each row as it
    comes (gpu-check keeps them if it is stopped). ``case_s`` is each case's wall time.
    ``data``: a synthetic world's folder: the :data:`DATA_VARIANTS` cases on it instead."""
    deadline = None if budget_s is None else clock() + budget_s
    rows, took = [], {}
    plan = [("synthetic data", data_config(data), tuple(DATA_VARIANTS))] if data else stages(quick, batch, peak_batch)
    for stage, cfg, variants in plan:
        gpu = cfg["device"] == "cuda"
        for variant in variants:
            case = {"variant": variant, **cfg}
            base = _row_of(variant, case)
            if "torch.compile" in variant and not gpu:
                row = {**base, "skipped": "torch.compile is measured on a GPU only"}
            else:
                need = max([CASE_NEED_S[stage] if gpu else CPU_CASE_NEED_S]
                           + [1.25 * s for s in took.get(stage, [])])
                left = None if deadline is None else deadline - clock()
                if left is not None and left < need:
                    row = {**base, "skipped": f"not run: {left:.0f} s of the {budget_s:.0f} s budget left, "
                                              f"a {stage} case needs about {need:.0f} s"}
                else:
                    t0 = clock()
                    if left is None:
                        row = {**base, **_run_case_process(case, 1800, "the per-case limit")}
                    else:
                        row = {**base, **_run_case_process(case, left)}
                    seconds = clock() - t0
                    took.setdefault(stage, []).append(seconds)
                    row["case_s"] = round(seconds, 1)
            row["stage"] = stage
            rows.append(row)
            if on_row:
                on_row(row)
    return finish_rows(rows)


def finish_rows(rows: list[dict]) -> list[dict]:
    """The table's order (by B, then :data:`VARIANTS`) and the speedups against the released
    step within each B, for the rows measured so far (gpu-check keeps them if it is stopped)."""
    order = {v: i for i, v in enumerate(VARIANTS)}
    rows.sort(key=lambda r: (r["B"], order.get(r["impl"], len(order))))  # stable: the table's order
    add_ratios(rows, DATA_BASELINE, group_by=("B",))
    return add_ratios(rows, "DeGLA as released", group_by=("B",))


COLUMNS = ["model", "B", "K", "impl", "params", "text_tokens", "p20_ms", "p50_ms", "p80_ms"] + [f"{p}_ms" for p in PHASES] + [
    "peak_mem_bytes", "speedup_vs_DeGLA as released", f"speedup_vs_{DATA_BASELINE}", "case_s", "skipped"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model on the CPU (proves the benchmark runs)")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)  # one case, in a fresh process
    parser.add_argument("--profile", metavar="TRACE.json", default=None,
                        help="write a torch.profiler Chrome trace of one variant instead of benchmarking")
    parser.add_argument("--batch", type=int, default=None, help="batch size B (default 256 on a GPU)")
    parser.add_argument("--variant", default="DeGLA (ours)", choices=VARIANTS, help="the --profile variant")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="seconds the whole may take: cases that do not fit are rows that say so")
    parser.add_argument("--synthetic-data", action="store_true",
                        help="CPU: make train's fine-tuning step with its batch from a synthetic world, the data "
                             "as before against now (bench_step_data.json)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return 0
    if args.profile:
        cfg = config(args.quick, args.batch)
        step = build(args.variant, cfg)
        print(f"wrote {profile_trace(lambda: step(phases=False), args.profile, device=cfg['device'])}")
        return 0
    if args.synthetic_data:
        return _synthetic_data_run(args)
    report_run(NAME, run(args.quick, args.batch, budget_s=args.budget_s), COLUMNS, quick=args.quick, out_dir=args.out)
    return 0


def _synthetic_data_run(args) -> int:
    """``--synthetic-data``: render a small world into a temporary folder, time its cases there."""
    import tempfile

    from degla_fast.data.synthetic import generate

    with tempfile.TemporaryDirectory(prefix="bench_step_data-") as folder:
        generate(folder, num_images=DATA_IMAGES, pretrain_images=1, eval_items=1, zeroshot_items=1, progress=False)
        rows = run(args.quick, budget_s=args.budget_s, data=folder)
    report_run(NAME + "_data", rows, COLUMNS, quick=args.quick, out_dir=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
