"""Run a stage once: the one cache scheme of ``make train`` (:mod:`degla_fast.demo`) and ``make
experiment`` (:mod:`degla_fast.experiment`).

A stage is a folder and a *stamp*, a JSON-able dict of everything its output depends on. When
``FOLDER/stage.json`` holds the same stamp, the stage is finished and its saved result is returned;
otherwise the work runs (training stages resume an interrupted run from its newest checkpoint) and
the stamp and result are written last, atomically, so an interrupted stage is never taken for a
finished one.

The stages: :func:`synth_stage` (render the synthetic world), :func:`train_stage` (one
``degla-fast train`` run, configured through the trainer's own fields) and :func:`eval_stage`
(held-out compositional and zero-shot accuracy on one split, plus the pairwise accuracy of the
training set's own hard negatives, :func:`train_pairwise`).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from .console import log as log_line
from .io import write_json_atomic

STAGE_FILE = "stage.json"
STARTED_FILE = "stage-started.json"  # a training stage's stamp, written before it trains
PAIRWISE_RECORDS = 400  # training records whose hard negatives are probed


def _saved_with(path: Path, stamp: dict) -> dict | None:
    """The JSON record at ``path`` when it was written with ``stamp`` (compared as JSON), else None."""
    if not path.is_file():
        return None
    saved = json.loads(path.read_text(encoding="utf-8"))
    return saved if saved.get("stamp") == json.loads(json.dumps(stamp)) else None


def finished(folder: Path, stamp: dict) -> dict | None:
    """The saved result of ``folder`` when its stamp equals ``stamp``, else None."""
    saved = _saved_with(Path(folder) / STAGE_FILE, stamp)
    return None if saved is None else saved["result"]


def run_stage(folder: str | Path, stamp: dict, work: Callable[[], dict], name: str | None = None,
              log: Callable[[str], None] | None = log_line) -> tuple[dict, float]:
    """(result, seconds spent): ``work()``'s result, computed once per stamp; 0 s when reused."""
    folder = Path(folder)
    result = finished(folder, stamp)
    if result is not None:
        if log:
            log(f"  {name or folder.name}: reused ({folder})")
        return result, 0.0
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    result = work()
    elapsed = time.perf_counter() - start
    write_json_atomic(folder / STAGE_FILE, {"stamp": stamp, "result": result, "seconds": elapsed})
    if log:
        log(f"  {name or folder.name}: done in {elapsed:.0f} s")
    return result, elapsed


# ---------------------------------------------------------------------------------------------- stages

def synth_stage(folder: str | Path, *, progress: bool = False, log=log_line, **sizes) -> Path:
    """The synthetic world in ``folder`` (:func:`degla_fast.data.synthetic.generate` with ``sizes``),
    rendered by one process per core this process may use (the files do not depend on it)."""
    from .data.synthetic import VERSION, generate
    from .threads import available_cores

    stamp = {"stage": "synth", "version": VERSION, **sizes}
    run_stage(folder, stamp, lambda: {"train": str(generate(folder, progress=progress, workers=available_cores(),
                                                            **sizes))}, "data", log)
    return Path(folder)


def train_config(output: str | Path, fields: dict):
    """The trainer's :class:`TrainConfig` of a stage: quiet CPU defaults, then ``fields`` (dotted names).
    Quiet includes the trainer's own log lines: the demo and the experiment report their stages.
    The CPU threads are those this process has: the demo and the experiment chose them for all of
    their processes together (:mod:`degla_fast.threads`), which the trainer's own rule cannot know."""
    import torch

    from .train.config import load_config

    defaults = {"data.num_workers": 0, "data.pipeline": "torch", "precision": "fp32", "device": "cpu",
                "epochs": 10_000, "save_every": 0, "keep_last": 1, "log_every": 10, "profile_phases": False,
                "resume": "latest", "log_lines": False, "threads": torch.get_num_threads()}
    return load_config(None, {**defaults, **fields, "output": str(output)})


# Trainer fields that change how soon a run ends, never its numbers (each sample's augmentation is
# seeded by its index, whichever process loads it; tower_thread computes every op as one thread
# does): left out of a stage's stamp, so that setting them reuses finished stages.
SPEED_FIELDS = ("data.num_workers", "tower_thread")


def speed_fields(processes: int = 1, ends_last: bool = False) -> dict:
    """Values of :data:`SPEED_FIELDS` that end a run sooner on this machine, for one of
    ``processes`` processes side by side at torch's thread count: where a core is spare, a
    data-loading worker (decoding and cropping leave the step) and the image tower on a thread of
    its own (``tower_thread: normal``); where none is, the run that ``ends_last`` gets that thread
    at the lowest priority (``idle``): it takes the cores the other runs leave as they end."""
    import torch

    from .threads import available_cores

    threads = torch.get_num_threads()
    spare = available_cores() - processes * threads
    towers = "normal" if spare >= threads else "idle" if ends_last else "none"
    return {"data.num_workers": int(spare >= 1), "tower_thread": towers}


def train_stamp(fields: dict, depends: dict | None = None) -> dict:
    """The stamp of a training stage: its trainer fields but :data:`SPEED_FIELDS`, what builds its
    model and what else it depends on."""
    from . import model  # noqa: F401  (registers the project's model configs with open_clip)
    from .vocab import model_fingerprint

    name = fields.get("model.name")
    built = {"model": model_fingerprint(name)} if name else {}
    kept = {k: v for k, v in fields.items() if k not in SPEED_FIELDS}
    return {"stage": "train", "fields": kept, **built, **(depends or {})}


def set_aside_other_run(folder: Path, stamp: dict, log=log_line) -> None:
    """Move ``folder`` to ``previous/<name>-<time>`` beside it when it holds a run begun under
    another stamp (or under one this code cannot know: checkpoints without ``STARTED_FILE``). The
    trainer resumes what it finds (``resume: latest``): without this, a run of other settings in
    the folder (other steps, weights) would be resumed instead of the new one trained from its start."""
    if _saved_with(folder / STARTED_FILE, stamp) is not None or not (folder / "checkpoints").exists():
        return
    target = folder.parent / "previous" / f"{folder.name}-{time.strftime('%Y%m%dT%H%M%S')}"
    target.parent.mkdir(parents=True, exist_ok=True)
    folder.rename(target)
    folder.mkdir()
    if log:
        log(f"  {folder.name}: begun with other settings; that run moved to {target}, this one starts afresh")


def train_stage(folder: str | Path, fields: dict, *, progress: bool = False, log=log_line, name: str | None = None,
                depends: dict | None = None) -> Path:
    """One ``degla-fast train`` run into ``folder`` with the configuration ``fields`` (dotted
    field names, see ``degla-fast train --help-config``); ``depends``: more of the stamp (the
    dataset's version, the stamp of the start point). ``resume: latest`` continues an interrupted run."""
    from .train.main import train

    folder = Path(folder)
    config = train_config(folder, {**fields, "progress": progress})
    stamp = train_stamp(fields, depends)

    def work() -> dict:
        set_aside_other_run(folder, stamp, log)
        write_json_atomic(folder / STARTED_FILE, {"stamp": stamp})
        train(config)  # which writes the run's own config.yaml
        return {"checkpoint": str(folder / "checkpoints")}

    run_stage(folder, stamp, work, name, log)
    return folder


def eval_stage(run: str | Path, data: str | Path, split: str = "test", *, log=log_line, device: str = "cpu") -> dict:
    """Metrics of ``run``'s newest checkpoint on ``split`` ("val" or "test") of the synthetic world
    ``data``, cached as the stage ``run/eval-<split>``; see :func:`evaluate`."""
    from .checkpoint import resolve_checkpoint

    run = Path(run)
    checkpoint = resolve_checkpoint(run)
    result, _ = run_stage(run / f"eval-{split}", _eval_stamp(checkpoint, data, split),
                          lambda: evaluate(checkpoint, data, split, device=device), f"{run.name} on {split}", log)
    return result


def _eval_stamp(checkpoint: Path, data: str | Path, split: str) -> dict:
    return {"stage": "eval", "split": split, "checkpoint": str(checkpoint), "mtime": checkpoint.stat().st_mtime_ns,
            "data": str(data)}


def _evaluated(run: Path, data: Path, split: str) -> bool:
    """``run``'s newest checkpoint has been evaluated on ``split`` (:func:`eval_stage` would reuse it)."""
    from .checkpoint import resolve_checkpoint

    return finished(run / f"eval-{split}", _eval_stamp(resolve_checkpoint(run), data, split)) is not None


def curve_stage(run: str | Path, data: str | Path, split: str = "val", *, log=log_line, device: str = "cpu") -> dict:
    """The learning curve of ``run``: compositional accuracy (:func:`evaluate_compositional`) of each
    checkpoint it kept, ``{"steps": {step: metrics}}``, cached as the stage ``run/curve-<split>``. A
    run keeps a curve's checkpoints when it saves every N steps and keeps them all (``save_every``,
    ``keep_last``)."""
    from .checkpoint import checkpoint_step, is_checkpoint_name

    run = Path(run)
    checkpoints = sorted(p for p in (run / "checkpoints").iterdir() if is_checkpoint_name(p.name))
    stamp = {"stage": "curve", "split": split, "data": str(data),
             "checkpoints": [[p.name, p.stat().st_mtime_ns] for p in checkpoints]}

    def work() -> dict:
        return {"steps": {str(checkpoint_step(p)): evaluate_compositional(p, data, split, device=device)
                          for p in checkpoints}}

    result, _ = run_stage(run / f"curve-{split}", stamp, work, f"{run.name}'s curve on {split}", log)
    return {int(step): metrics for step, metrics in result["steps"].items()}


# ---------------------------------------------------------------------------------------------- metrics

def split_dir(data: str | Path, split: str) -> Path:
    """Where ``split``'s held-out sets are: the test split at the top, the validation split in ``val/``."""
    return Path(data) if split == "test" else Path(data) / "val"


def chance_levels(data: str | Path) -> dict:
    """Chance accuracy (%) of every metric: 50 for the two-way compositional choices, 100 / classes
    for each zero-shot task (balanced labels), and their averages."""
    from .data.synthetic import EVAL_SUBSETS
    from .evaluate.synthetic import zeroshot_chance

    out = {k: 50.0 for k in ("swap", "replace", "add", "compositional_avg", "train_pairwise", *EVAL_SUBSETS)}
    chance = zeroshot_chance(split_dir(data, "test"))
    out.update({f"zeroshot_{t}": value for t, value in chance.items()})
    out["zeroshot_avg"] = sum(chance.values()) / len(chance)
    return out


def train_pairwise(encoder, data: str | Path, records: int = PAIRWISE_RECORDS) -> float:
    """Pairwise accuracy (%) on the fine-tuning set's own hard negatives: over the first ``records``
    records of ``train.json`` and each of their negatives, how often the image is closer to its
    caption than to the negative (what NegCLIP's training objective rehearses)."""
    from .evaluate.encode import ChoiceItem, ImageRef
    from .evaluate.metrics import accuracy, choice_correct

    data = Path(data)
    items = []
    for record in json.loads((data / "train.json").read_text(encoding="utf-8"))[:records]:
        image = ImageRef(data / record["image"])
        items += [ChoiceItem(image, (record["original"], negative)) for negative in record["enhanced"]]
    return accuracy(choice_correct(encoder.choice_scores(items, "train negatives")))


def evaluate_compositional(checkpoint: str | Path, data: str | Path, split: str = "test", *,
                           device: str = "cpu") -> dict:
    """{swap, replace, add, compositional_avg, each subset}: the compositional half of
    :func:`evaluate` alone (what a learning curve follows; no zero-shot tasks)."""
    from .evaluate.encode import Encoder
    from .evaluate.synthetic import compositional_result
    from .model import load_model

    encoder = Encoder(load_model(None, checkpoint, device=device), device=device, batch_size=256)
    return {k: float(v) for k, v in compositional_result(encoder, split_dir(data, split)).metrics.items()}


def evaluate(checkpoint: str | Path, data: str | Path, split: str = "test", *, device: str = "cpu") -> dict:
    """{swap, replace, add (SugarCrepe-style category means), compositional_avg, each subset,
    zeroshot_<task> for every task, zeroshot_avg, train_pairwise}: accuracies in %."""
    from .evaluate.encode import Encoder
    from .evaluate.synthetic import synthetic_result
    from .model import load_model

    encoder = Encoder(load_model(None, checkpoint, device=device), device=device, batch_size=256)
    out = {k: float(v) for k, v in synthetic_result(encoder, split_dir(data, split)).metrics.items()}
    out["train_pairwise"] = float(train_pairwise(encoder, data))
    return out


# ---------------------------------------------------------------------------------------------- parallel runs

def _train_eval_job(job: tuple) -> tuple[dict, float]:
    """Worker: :func:`train_stage` (unless the job's fields are None) then :func:`eval_stage` of
    one run, in its own process."""
    import torch

    folder, fields, depends, data, split, threads, device = job
    torch.set_num_threads(threads)
    start = time.perf_counter()
    if fields is not None:
        train_stage(folder, fields, depends=depends, log=None)
    return eval_stage(folder, data, split, device=device, log=None), time.perf_counter() - start


def _pending(job: tuple) -> bool:
    folder, fields, depends, data, split = job[:5]
    if fields is None:
        return not _evaluated(folder, data, split)
    return finished(folder, train_stamp(fields, depends)) is None


def train_and_evaluate(jobs: list[tuple], processes: int = 1, threads: int = 1, device: str = "cpu",
                       on_done: Callable[[int, dict, float], None] | None = None) -> list[dict]:
    """Train and evaluate several runs, ``processes`` at a time (1: in this process), in the
    order given (a process takes the next job as it frees up).

    ``jobs``: (run folder, trainer fields or None to evaluate the run as it is, stamp extras, data
    folder, split). Returns the metrics of each run in order; ``on_done(index, metrics, seconds)``
    is called as each one finishes, with ``seconds`` None for a run that was finished already
    (reused, as :func:`run_stage` says)."""
    full = [(Path(f), fields, depends, Path(data), split, threads, device) for f, fields, depends, data, split in jobs]
    results: list[dict] = [{}] * len(full)
    pending = [job for job in full if _pending(job)]
    if processes > 1 and len(pending) > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        pool = ProcessPoolExecutor(min(processes, len(pending)), mp_context=mp.get_context("spawn"))
        try:
            futures = {pool.submit(_train_eval_job, job): i for i, job in enumerate(full) if job in pending}
            for future in as_completed(futures):
                i = futures[future]
                results[i], seconds = future.result()
                if on_done:
                    on_done(i, results[i], seconds)
        finally:
            # Every result is in (or one failed): the caller goes on while the workers exit (a
            # second or two of torch's teardown each); a failure drops the jobs not yet begun.
            pool.shutdown(wait=False, cancel_futures=True)
    if any(not r for r in results):  # one process, or only finished runs left (no worker start-up)
        import torch

        previous = torch.get_num_threads()
        for i, job in enumerate(full):
            if not results[i]:
                results[i], seconds = _train_eval_job(job)
                if on_done:
                    on_done(i, results[i], seconds if job in pending else None)
        torch.set_num_threads(previous)
    return results
