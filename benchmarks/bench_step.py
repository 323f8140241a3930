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
B=1024 for the eager ones (``peak_mem_bytes``: does it fit), each case in its own process.

Every phase sits in a ``record_function`` range (NVTX too on CUDA) named data, forward,
teacher_forward, loss, backward, optimizer, ema; ``--profile TRACE.json`` writes a torch.profiler
Chrome trace of one variant. GPU: ViT-B-32-quickgelu (random weights), B=256, K=4, bf16 autocast,
fused AdamW. ``--quick``: the tiny model on the CPU in fp32, which proves the benchmark runs and
says nothing about GPU speed.

    python benchmarks/bench_step.py --quick
    python benchmarks/bench_step.py                       # GPU
    python benchmarks/bench_step.py --profile benchmarks/results/trace_step.json --variant "DeGLA (ours)"
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (add_ratios, nvtx_range, peak_rss_bytes, percentiles, profile_trace,  # noqa: E402
                    report_run, run_case_in_subprocess)

NAME = "bench_step"
PHASES = ("data", "forward", "teacher_forward", "loss", "backward", "optimizer", "ema")
VARIANTS = ("plain CLIP", "plain CLIP (torch.compile)", "DeGLA as released", "DeGLA (ours)",
            "DeGLA (ours, torch.compile)")
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
                 amp: torch.dtype | None):
        from degla_fast import EMATeacher
        from degla_fast.model import create_model
        from degla_fast.reference import ema_update_loop_
        from degla_fast.train.optim import build_optimizer, build_scheduler
        from degla_fast.train.step import StepParts, clamp_logit_scale_, make_loss

        self.variant, self.device, self.amp = variant, device, amp
        self.released, self.plain = variant.startswith("DeGLA as released"), variant.startswith("plain")
        self.k = 0 if self.plain else num_negatives
        torch.manual_seed(0)
        self.bundle = create_model(model_name, None, device=str(device))
        self.model = self.bundle.model.train()
        self.loss_fn = make_loss(num_negatives=self.k, backend="reference" if self.released else "auto")
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
                autocast_dtype=amp, teacher_autocast_dtype=amp)
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

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, phases: bool = True) -> dict:
        from degla_fast.model import trim_tokens
        from degla_fast.train.step import train_step

        start = time.perf_counter()
        with nvtx_range("data"):
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

        times, last = {}, time.perf_counter()

        def lap(phase):
            nonlocal last
            if phases:
                self._sync()
            now = time.perf_counter()
            times[phase], last = (now - last) * 1e3, now

        amp = dict(device_type=self.device.type, dtype=self.amp, enabled=self.amp is not None)
        with nvtx_range("forward"), torch.autocast(**amp):
            image, text, scale = clip_features(self.model, images, tokens)
        lap("forward")
        with nvtx_range("teacher_forward"), torch.no_grad(), torch.autocast(**amp):
            t_image, t_text, _ = clip_features(self.teacher, images, tokens)
        t_image, t_text = t_image.float(), t_text.float()
        lap("teacher_forward")
        with nvtx_range("loss"):
            out = self.loss_fn(image.float(), text.float(), scale.float(), t_image, t_text)
        lap("loss")
        with nvtx_range("backward"):
            out.total.backward()
        lap("backward")
        with nvtx_range("optimizer"):
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            clamp_logit_scale_(self.model)
        lap("optimizer")
        with nvtx_range("ema"):
            self.ema()
        lap("ema")
        return times


#: train_step's phase names -> this benchmark's
PHASE_OF = {"optim": "optimizer"}


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


def build(variant: str, cfg: dict) -> Step:
    """The :class:`Step` of ``variant`` under run config ``cfg`` (see :func:`config`)."""
    import degla_fast.model  # noqa: F401  (registers the tiny model config with open_clip)

    amp = torch.bfloat16 if cfg["precision"] == "bf16" else None
    return Step(variant, model_name=cfg["model"], batch=cfg["B"], num_negatives=cfg["K"],
                device=torch.device(cfg["device"]), amp=amp)


def run_case(case: dict) -> dict:
    """Measure one ``{"variant", **config}`` case: per-phase p50 ms, total p20/p50/p80, peak memory."""
    device = torch.device(case["device"])
    if device.type == "cpu":
        torch.set_num_threads(1)
    row = {"name": "train_step", "impl": case["variant"], "model": case["model"], "B": case["B"],
           "K": 0 if case["variant"].startswith("plain") else case["K"], "precision": case["precision"]}
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
    row["text_tokens"] = int(step.tokens.shape[1] if step.released or step.plain else
                             (step.tokens != 0).any(0).nonzero()[-1] + 1)
    return row


#: GPU: the batch of the timing table and the one whose peak memory must fit (eager variants only).
GPU_BATCHES = (256, 1024)


def run(quick: bool, batch: int | None = None) -> list[dict]:
    """One row per variant (same model and batch); compiled variants only on a GPU. On a GPU
    without ``batch``: every variant at B=256, then the eager ones at B=1024 (peak memory; out
    of memory is a row that says so)."""
    cfg = config(quick, batch)
    rows = []
    batches = GPU_BATCHES if cfg["device"] == "cuda" and batch is None else (cfg["B"],)
    for b in batches:
        part = []
        for variant in VARIANTS:
            case = {"variant": variant, **cfg, "B": b}
            if b != batches[0]:
                if "torch.compile" in variant:
                    continue
                case.update(warmup=1, iters=3)
            if "torch.compile" in variant and cfg["device"] != "cuda":
                part.append({"name": "train_step", "impl": variant, "model": cfg["model"], "B": b,
                             "skipped": "torch.compile is measured on a GPU only"})
            else:  # a fresh process: its own peak memory (and compile caches)
                part.append(run_case_in_subprocess(__file__, case))
        rows.extend(add_ratios(part, "DeGLA as released"))
    return rows


COLUMNS = ["model", "B", "K", "impl", "text_tokens", "p50_ms"] + [f"{p}_ms" for p in PHASES] + [
    "peak_mem_bytes", "speedup_vs_DeGLA as released", "skipped"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model on the CPU (proves the benchmark runs)")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)  # one case, in a fresh process
    parser.add_argument("--profile", metavar="TRACE.json", default=None,
                        help="write a torch.profiler Chrome trace of one variant instead of benchmarking")
    parser.add_argument("--batch", type=int, default=None, help="batch size B (default 256 on a GPU)")
    parser.add_argument("--variant", default="DeGLA (ours)", choices=VARIANTS, help="the --profile variant")
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
    report_run(NAME, run(args.quick, args.batch), COLUMNS, quick=args.quick, out_dir=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
