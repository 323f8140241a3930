#!/usr/bin/env python3
"""``make gpu-check``: the one prepared command for a bare machine with one H100/H200.

On a machine that has only torch and triton (torch 2.11 + triton 3.6 images), no network:

1. install: ``gpu_check.py --install-only`` in its own process (:func:`install_only`; it needs
   only the standard library and pip, so it also runs alone, before anything else): the wheels of
   :data:`WHEELS` whose module is missing, from ``.gpu-wheels/`` (made here by ``make
   gpu-wheels``; the folder travels with the working tree; pytest's stack and open_clip_torch
   with ftfy, wcwidth, tqdm and regex), ``--no-index --no-deps``, in dependency order; then the
   project, built by nothing: a .pth file and an import finder in site-packages
   (:func:`install_project`, which says why not pip);
2. ``make test-gpu``: the float64-expectation kernel tests with the compiled kernels on CUDA
   (``tests/test_kernels_gpu.py`` at GPU sizes plus the float64 tests of the kernel suites);
3. ``bench_loss`` (B in 32..65536, K=4, D=512, bf16, fp32 at 4096: every backend, the gemm backend
   at three chunk budgets, triton storing and recomputing its logits, the two GEMM floors,
   CUDA-graph replays; the rows the targets need first, torch.compile and the peers last),
   ``bench_atomics`` (fp32 vector atomics, distinct and 32-way), ``bench_ema``,
   ``bench_adamw_ema`` and ``bench_step`` (``train_step`` at ViT-B-32: plain CLIP, the release
   structure and ours at B=256 K=4, ours at B=1024 for peak memory, the compiled ones, the
   other two at B=1024, as many as its budget allows), each in its own process with a time limit; a
   case that fails (an out-of-resources launch, out of memory) becomes a row with its reason, a
   case the budget leaves out a row that says so, and a benchmark stopped at its limit keeps the
   rows it measured and their ratios;
4. the report: ``benchmarks/RESULTS.md`` (plots where matplotlib exists) from
   ``benchmarks/results/gpu-check/*.json``, which hold the device name, versions and date;
   ``gpu_check.json`` there records every step (status, seconds, test counts); and the loss's
   ``auto`` table from bench_loss's rows (``degla_fast/auto_backends.json``, and a copy beside
   the JSON; the dry run writes only the copy);
5. printed last, a one-screen summary (also ``summary.md``, and ``targets`` in ``gpu_check.json``):
   each step, then each target of issue 26 with its figure, met or not (:func:`evaluate_targets`).

With ``--copy-to DIR`` (``make gpu-check`` passes ``$OUT`` where it is set, as on the GPU
machine) everything written so far is copied into DIR after every step (:func:`copy_out`).
Every step has a time limit (:data:`STEP_LIMIT_S`) inside a whole (:data:`TOTAL_S`) that, install
included, ends within 7 minutes,
and keeps the minimum of every later step (:data:`STEP_MIN_S`) free. A fresh
``TRITON_CACHE_DIR`` per run, so no kernel is taken from an earlier compile.

``--dry-run`` (``make gpu-check DRY_RUN=1``): the same steps on the CPU with tiny sizes and
Triton's interpreter, in this venv (install checked, not run), written under ``--out``
(default ``runs/gpu-check-dry``), never into committed files. ``tests/test_gpu_check.py`` runs
it in ``make test``.

    python3 benchmarks/gpu_check.py                      # on the GPU machine (make gpu-check)
    python3 benchmarks/gpu_check.py --copy-to "$OUT"     # also copy everything it writes there (8 files)
    python3 benchmarks/gpu_check.py --install-only       # only the carried wheels and the project, no index
    .venv/bin/python benchmarks/gpu_check.py --dry-run   # CPU, tiny sizes (make gpu-check DRY_RUN=1)
    .venv/bin/python benchmarks/gpu_check.py --download-wheels .gpu-wheels   # make gpu-wheels

Only the standard library is imported at the top: the script runs before anything is installed.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import traceback
import xml.etree.ElementTree as ET
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
WHEELS_DIR = ROOT / ".gpu-wheels"
DRY_OUT = ROOT / "runs" / "gpu-check-dry"

#: The wheels ``make gpu-wheels`` downloads (``pip download --no-deps``, exact versions: those of
#: this project's CI venv) and ``install`` puts in where the distribution's module is missing, in
#: this order (each one's needs before it): pytest and its needs, pytest-benchmark (``make bench``),
#: pytest-timeout (the suites' ``timeout`` marks, and a per-test limit here), pytest-xdist
#: (test-gpu compiles its kernels in parallel processes), and open_clip_torch with what its import
#: needs beyond torch, torchvision and numpy (bench_step builds its models): wcwidth, ftfy, tqdm,
#: regex. No setuptools or wheel: nothing is built (:func:`install_project`). open_clip's
#: other needs (huggingface_hub, safetensors, timm) are imported only to load pretrained weights or
#: timm towers, which bench_step never does, so none is carried; torchvision and numpy (compiled,
#: tied to the image's torch) come with the image.
WHEELS = (
    "pluggy==1.7.0", "iniconfig==2.3.1", "packaging==26.3", "pygments==2.21.0", "pytest==9.2.0",
    "py-cpuinfo2==10.1.1", "pytest-benchmark==5.3.1", "pytest-timeout==2.4.0",
    "execnet==2.1.2", "pytest-xdist==3.8.0",
    "wcwidth==0.9.4", "ftfy==6.3.1", "tqdm==4.70.1", "regex==2026.11.19", "open_clip_torch==3.3.0",
)
#: The carried wheels with compiled code, one per CPython listed (manylinux x86_64; the GPU images
#: run 3.12): the install takes the one whose tag is the machine's (:func:`carried_wheel`).
#: regex 2026.11.19 has no CPython 3.10 wheel.
BINARY_WHEELS = {"regex==2026.11.19": ("3.11", "3.12", "3.13")}
BINARY_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
#: Wheels never carried: they come with the machine's image.
NEVER_CARRIED = ("torch", "triton", "nvidia-")
#: Modules the GPU image is taken to lack (it has torch, triton, numpy, torchvision, pillow, pyyaml;
#: some images have more, none is relied on): a stage imports only what it needs, and a carried
#: one (:data:`WHEEL_MODULES`) comes from .gpu-wheels. tests/test_gpu_check.py runs the dry run
#: with the others blocked.
IMAGE_LACKS = ("deepspeed", "nvidia.dali", "webdataset", "safetensors", "timm", "huggingface_hub", "open_clip")

#: The benchmarks, in the order they run: bench_step last, since it fits its cases to what is left.
BENCHES = ("bench_loss", "bench_atomics", "bench_ema", "bench_adamw_ema", "bench_step")
STEPS = ("install", "test-gpu", *BENCHES, "report")
#: The whole run, install included, in at most 7 minutes (a rerun then fits in a 15-minute device
#: lease): every step, stopped or not, ends within these 400 s (:meth:`Run.limit`); what is left
#: of the 7 minutes is the summary's and the processes' start.
TOTAL_S = 400
#: A step at its limit: SIGINT (pytest still writes its JUnit file), then SIGTERM, then SIGKILL,
#: each followed by this many seconds' wait for the step's process group to end.
STOP_GRACE_S = {signal.SIGINT: 8, signal.SIGTERM: 4, signal.SIGKILL: 3}
#: Time limit of each step (seconds). A step never runs past the whole's deadline, and never into
#: the time kept for the steps after it (:data:`STEP_MIN_S`): an early step that runs long
#: shortens the later ones only down to their minimum. The loss benchmark decides the loss
#: backends (and writes the auto table): it gets the largest share, and measures the rows the
#: targets need first.
STEP_LIMIT_S = {"install": 40, "test-gpu": 90, "bench_loss": 150, "bench_atomics": 20, "bench_ema": 20,
                "bench_adamw_ema": 15, "bench_step": 100, "report": 20}
#: The seconds kept for a step whatever the steps before it took (bench_step: its eager B=256
#: cases at least, see bench_step.CASE_NEED_S).
STEP_MIN_S = {"install": 0, "test-gpu": 0, "bench_loss": 90, "bench_atomics": 10, "bench_ema": 10,
              "bench_adamw_ema": 10, "bench_step": 90, "report": 15}
#: bench_step's own share of its limit for the worker's start and the JSON: its cases get the rest.
BENCH_STEP_MARGIN_S = 15
#: The dry run on 2 CPU cores (the interpreter is slow, the sizes tiny).
DRY_STEP_LIMIT_S = {"install": 60, "test-gpu": 150, "bench_loss": 60, "bench_atomics": 40, "bench_ema": 40,
                    "bench_adamw_ema": 40,
                    "bench_step": 120, "report": 40}
DRY_STEP_MIN_S = {"install": 0, "test-gpu": 0, "bench_loss": 20, "bench_atomics": 20, "bench_ema": 20,
                  "bench_adamw_ema": 20,
                  "bench_step": 60, "report": 30}
DRY_TOTAL_S = 300
#: The dry run's bench_step is ``bench_step --quick``: the tiny model at B=8, every eager variant
#: (5 to 15 s each on 2 cores, mostly the fresh process's imports), compiled rows noted as
#: GPU-only; the budget and the other stages are tested with a stand-in for the cases.
# --- open_clip-free parameter shapes -----------------------------------------------------------

#: open_clip's configs of the two CLIP models the EMA benchmarks use (``open_clip.get_model_config``).
CLIP_CONFIGS = {
    "ViT-B-32": {"embed_dim": 512, "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 32},
                 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "layers": 12}},
    "ViT-L-14": {"embed_dim": 768, "vision_cfg": {"image_size": 224, "layers": 24, "width": 1024, "patch_size": 14},
                 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 768, "layers": 12}},
}


def _block(prefix: str, width: int) -> list[tuple[str, tuple[int, ...]]]:
    """One ResidualAttentionBlock's parameters (MLP ratio 4), in open_clip's order."""
    w = width
    return [(prefix + n, s) for n, s in (
        ("ln_1.weight", (w,)), ("ln_1.bias", (w,)), ("attn.in_proj_weight", (3 * w, w)), ("attn.in_proj_bias", (3 * w,)),
        ("attn.out_proj.weight", (w, w)), ("attn.out_proj.bias", (w,)), ("ln_2.weight", (w,)), ("ln_2.bias", (w,)),
        ("mlp.c_fc.weight", (4 * w, w)), ("mlp.c_fc.bias", (4 * w,)), ("mlp.c_proj.weight", (w, 4 * w)),
        ("mlp.c_proj.bias", (w,)))]


def clip_parameter_spec(name: str) -> list[tuple[str, tuple[int, ...]]]:
    """``(name, shape)`` of every parameter of open_clip's ``CLIP(**get_model_config(name))``, in
    ``named_parameters()`` order, written out without open_clip (ViT-B/32: 302 tensors, 151,277,313
    parameters; ViT-L/14: 446, 427,616,513). ``tests/test_gpu_check.py`` checks it against open_clip."""
    cfg = CLIP_CONFIGS[name]
    embed, vis, txt = cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"]
    vw, tw, patch = vis["width"], txt["width"], vis["patch_size"]
    grid = vis["image_size"] // patch
    spec = [("positional_embedding", (txt["context_length"], tw)), ("text_projection", (tw, embed)),
            ("logit_scale", ()),
            ("visual.class_embedding", (vw,)), ("visual.positional_embedding", (grid * grid + 1, vw)),
            ("visual.proj", (vw, embed)), ("visual.conv1.weight", (vw, 3, patch, patch)),
            ("visual.ln_pre.weight", (vw,)), ("visual.ln_pre.bias", (vw,))]
    for i in range(vis["layers"]):
        spec += _block(f"visual.transformer.resblocks.{i}.", vw)
    spec += [("visual.ln_post.weight", (vw,)), ("visual.ln_post.bias", (vw,))]
    for i in range(txt["layers"]):
        spec += _block(f"transformer.resblocks.{i}.", tw)
    spec += [("token_embedding.weight", (txt["vocab_size"], tw)), ("ln_final.weight", (tw,)), ("ln_final.bias", (tw,))]
    return spec


def clip_parameter_shapes(name: str) -> list:
    """The shapes of :func:`clip_parameter_spec` as ``torch.Size`` (bench_ema's ``clip_parameter_shapes``)."""
    import torch

    return [torch.Size(shape) for _, shape in clip_parameter_spec(name)]


# --- commands ------------------------------------------------------------------------------------

def test_gpu_command(python: str, *, dry_run: bool, args: str = "", kernel_tests: str | None = None) -> list[str]:
    """``make test-gpu`` with this run's python and arguments (no venv set-up: ``GPU_SETUP=``)."""
    cmd = ["make", "--no-print-directory", "-C", str(ROOT), "test-gpu", f"PYTHON={python}", "GPU_SETUP=",
           f"DRY_RUN={'1' if dry_run else ''}", f"TEST_GPU_ARGS={args}"]
    if kernel_tests is not None:
        cmd.append(f"KERNEL_TESTS={kernel_tests}")
    return cmd


#: The module each carried wheel provides: a wheel is installed only where its module is missing
#: (py-cpuinfo2 and an image's py-cpuinfo both provide ``cpuinfo``; one is enough).
WHEEL_MODULES = {"pytest": "pytest", "pluggy": "pluggy", "iniconfig": "iniconfig", "packaging": "packaging",
                 "pygments": "pygments", "pytest-benchmark": "pytest_benchmark", "py-cpuinfo2": "cpuinfo",
                 "pytest-timeout": "pytest_timeout", "pytest-xdist": "xdist", "execnet": "execnet",
                 "wcwidth": "wcwidth", "ftfy": "ftfy",
                 "tqdm": "tqdm", "regex": "regex", "open_clip_torch": "open_clip"}


def pip_install_command(python: str, wheels: Path) -> list[str]:
    """``pip install`` from the carried wheels only: no index, no dependencies, no cache."""
    return [python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-cache-dir",
            "--disable-pip-version-check", "--find-links", str(wheels)]


# The project is not pip-installed on the GPU machine: :func:`install_project` writes a .pth file
# and a small import finder into the interpreter's site-packages. Why not pip: the checkout has
# no pyproject.toml, so pip older than 25.3 (23.2.1, 24.0, 25.2 tried) makes an editable install
# with ``setup.py develop`` whenever setuptools and wheel are importable, and setuptools >= 80's
# ``develop`` runs a nested ``pip install -e . --use-pep517`` that drops ``--no-index`` and
# ``--find-links`` and asks the index (no network there: the install fails, and every stage after
# it). A non-editable ``pip wheel``/``pip install .`` builds too, either in an isolated
# environment (which must be fed setuptools and wheel from the carried folder, in a way each pip
# version spells differently) or without isolation, where setuptools runs the image's own
# ``egg_info.writers`` hooks (Hugging Face's ``kernels`` registers one that this checkout's
# ``kernels/`` folder shadows: ModuleNotFoundError). Writing two files needs no build, no
# setuptools and no pip at all, so it behaves the same under every pip; the finder reproduces
# setup.py's ``package_dir`` (``kernels/`` -> ``degla_fast.kernels``), read from setup.py itself,
# and does not put the checkout's root on sys.path (its ``kernels/`` would shadow that package).
#: The module and the .pth file (``import`` line) that :func:`install_project` writes.
CHECKOUT_FINDER = "_degla_fast_checkout"
CHECKOUT_PTH = "degla_fast_checkout.pth"
_FINDER_SOURCE = '''"""Written by benchmarks/gpu_check.py --install-only: the degla-fast checkout at
{root} imported as setup.py installs it (package -> folder: {packages}), with
no build. Remove this file and {pth} to undo it."""
import importlib.machinery
import importlib.util
import os
import sys

ROOT = {root!r}
PACKAGES = {packages!r}


class CheckoutFinder:
    """Finds the mapped packages in the checkout; their submodules are then found in the
    package's folder by Python's own path finder."""

    def find_spec(self, name, path=None, target=None):
        folder = PACKAGES.get(name)
        if folder is None:
            return None
        folder = os.path.join(ROOT, folder)
        init = os.path.join(folder, "__init__.py")
        if os.path.isfile(init):
            return importlib.util.spec_from_file_location(name, init, submodule_search_locations=[folder])
        spec = importlib.machinery.ModuleSpec(name, None, is_package=True)  # a data folder (no __init__.py)
        spec.submodule_search_locations = [folder]
        return spec


if not any(type(f).__name__ == "CheckoutFinder" for f in sys.meta_path):
    sys.meta_path.insert(0, CheckoutFinder())
'''


def project_packages(root: Path = ROOT) -> dict[str, str]:
    """Package -> folder (relative to ``root``) as ``setup.py`` installs them: ``degla_fast`` and
    setup()'s ``package_dir`` (read from setup.py's source, which stays their one owner)."""
    import ast

    tree = ast.parse((root / "setup.py").read_text(encoding="utf-8"))
    package_dir = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup":
            package_dir = next((ast.literal_eval(kw.value) for kw in node.keywords if kw.arg == "package_dir"), {})
    return {"degla_fast": "degla_fast", **package_dir}


def install_project(root: Path = ROOT, site: Path | None = None) -> Path:
    """Make the checkout at ``root`` importable by this interpreter (see the comment above):
    the finder module and the .pth file that imports it, into ``site`` (this interpreter's
    site-packages). Returns the .pth file's path."""
    import sysconfig

    site = Path(sysconfig.get_paths()["purelib"]) if site is None else site
    site.mkdir(parents=True, exist_ok=True)
    source = _FINDER_SOURCE.format(root=str(root.resolve()), packages=project_packages(root), pth=CHECKOUT_PTH)
    for name, text in ((f"{CHECKOUT_FINDER}.py", source), (CHECKOUT_PTH, f"import {CHECKOUT_FINDER}\n")):
        tmp = site / (name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, site / name)
    return site / CHECKOUT_PTH


#: Run in a fresh process after the install: where ``degla_fast.kernels`` comes from.
_CHECK_PROJECT = ("import importlib.util, degla_fast.kernels; "
                  "print(importlib.util.find_spec('degla_fast.kernels.configs').origin)")


def install_only(wheels: Path | None = None, python: str = sys.executable, root: Path = ROOT) -> int:
    """``gpu_check.py --install-only``: the carried wheels whose module this interpreter lacks,
    from ``wheels`` (:data:`WHEELS_DIR`) with no index, then the project (:func:`install_project`),
    then ``import degla_fast.kernels`` in a fresh process from outside the checkout. The standard
    library and pip only (no torch). Prints one line per action; 0 when the project imports."""
    wheels = WHEELS_DIR if wheels is None else wheels
    missing = [w for w in WHEELS if not _installed(w)]
    if missing:
        found = {w: carried_wheel(w, wheels) for w in missing}
        absent = [w + (f" ({wheel_tag()} manylinux x86_64)" if w in BINARY_WHEELS else "")
                  for w, path in found.items() if path is None]
        if absent:
            print(f"install: missing here and not in {wheels}/: {', '.join(absent)} (run `make gpu-wheels` on a "
                  f"machine with pip access and carry the folder)", flush=True)
            return 1
        # The wheel files themselves, in WHEELS' order (each one's needs first), none of their deps:
        # installing a wheel builds nothing, so no pip version asks an index for it.
        cmd = pip_install_command(python, wheels) + [str(found[w]) for w in missing]
        print("install: + " + shlex.join(cmd), flush=True)
        done = subprocess.run(cmd)
        if done.returncode:
            print(f"install: pip install of {' '.join(missing)} exited {done.returncode}", flush=True)
            return 1
    print(f"install: carried wheels installed: {' '.join(missing) or 'none (all present)'}", flush=True)
    pth = install_project(root)
    print(f"install: project {root} importable through {pth}", flush=True)
    done = subprocess.run([python, "-c", _CHECK_PROJECT], capture_output=True, text=True, cwd=tempfile.gettempdir())
    origin = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    if done.returncode or Path(origin).resolve() != (root / "kernels" / "configs.py").resolve():
        why = (done.stderr.strip().splitlines() or [f"degla_fast.kernels comes from {origin!r}"])[-1]
        print(f"install: degla_fast.kernels does not import from {root}: {why}", flush=True)
        return 1
    print(f"install: degla_fast.kernels imports from {Path(origin).parent}", flush=True)
    return 0


def _installed(requirement: str) -> bool:
    return importlib.util.find_spec(WHEEL_MODULES[requirement.split("==")[0]]) is not None


def _wheel_stem(requirement: str) -> str:
    """``name-version`` as a wheel's file name starts (``-`` and ``.`` in the name become ``_``)."""
    name, version = requirement.split("==")
    return f"{name.replace('-', '_').replace('.', '_')}-{version}"


def wheel_tag() -> str:
    """This interpreter's CPython wheel tag, e.g. ``cp312``."""
    return f"cp{sys.version_info.major}{sys.version_info.minor}"


def carried_wheel(requirement: str, folder: Path | None = None) -> Path | None:
    """The wheel of ``requirement`` in ``folder`` (:data:`WHEELS_DIR`) that this machine can
    install, or None."""
    import platform

    folder = WHEELS_DIR if folder is None else folder

    stem = _wheel_stem(requirement).lower()
    tag = wheel_tag()
    for p in sorted(folder.glob("*.whl")) if folder.is_dir() else []:
        name = p.name.lower()
        if requirement not in BINARY_WHEELS:
            if name.startswith(stem + "-") and name.endswith("-none-any.whl"):
                return p
        elif name.startswith(f"{stem}-{tag}-{tag}-") and "manylinux" in name and platform.machine() in name:
            return p
    return None


def download_commands(dest: Path) -> list[list[str]]:
    """The ``pip download --no-deps`` calls of ``make gpu-wheels``: the pure-Python wheels in one,
    then each compiled one once per CPython of :data:`BINARY_WHEELS`."""
    pip = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(dest)]
    pure = [w for w in WHEELS if w not in BINARY_WHEELS]
    cmds = [pip + ["--python-version", "3.12", "--implementation", "py", "--abi", "none", "--platform", "any", *pure]]
    for req, versions in BINARY_WHEELS.items():
        plats = [a for p in BINARY_PLATFORMS for a in ("--platform", p)]
        cmds += [pip + ["--python-version", v, "--implementation", "cp", *plats, req] for v in versions]
    return cmds


def download_wheels(dest: Path) -> int:
    """``make gpu-wheels``: ``pip download --no-deps`` of exactly :data:`WHEELS` into ``dest``."""
    names = [w.split("==")[0] for w in WHEELS]
    assert not any(n.startswith(NEVER_CARRIED) for n in names) and set(names) == set(WHEEL_MODULES)
    assert set(BINARY_WHEELS) <= set(WHEELS)
    dest.mkdir(parents=True, exist_ok=True)
    for cmd in download_commands(dest):
        print("+ " + shlex.join(cmd), flush=True)
        done = subprocess.run(cmd)
        if done.returncode:
            return done.returncode
    files = sorted(dest.glob("*.whl"))
    wanted = {_wheel_stem(w).lower() for w in WHEELS}
    stray = [f.name for f in files if "-".join(f.name.split("-")[:2]).lower() not in wanted]
    for f in files:
        print(f"{f.stat().st_size / 1e3:8.0f} kB  {f.name}")
    print(f"{sum(f.stat().st_size for f in files) / 1e6:.2f} MB in {len(files)} wheels in {dest}"
          + (f"; not in WHEELS (remove them): {stray}" if stray else ""))
    return 0


# --- the parent: steps with time limits ------------------------------------------------------------

class Run:
    """One gpu-check run: where it writes, its deadline, its log and the step records."""

    def __init__(self, out: Path, dry_run: bool, total_s: float, install: bool = False, copy_to: Path | None = None):
        self.out, self.dry_run, self.install, self.copy_to = out, dry_run, install, copy_to
        self.probe: dict = {}
        self.results = out / "results" / "gpu-check"
        self.results.mkdir(parents=True, exist_ok=True)
        self.log_path = self.results / "gpu_check.log"
        self.log = open(self.log_path, "w", encoding="utf-8")
        self.start = time.monotonic()
        self.deadline = self.start + total_s
        self.limits = DRY_STEP_LIMIT_S if dry_run else STEP_LIMIT_S
        self.minimums = DRY_STEP_MIN_S if dry_run else STEP_MIN_S
        self.steps: list[dict] = []
        self.cache = tempfile.mkdtemp(prefix="gpu-check-triton-cache-")
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                        TRITON_CACHE_DIR=self.cache, TRITON_INTERPRET="1" if dry_run else "0",
                        DEGLA_GPU_DRY_RUN="1" if dry_run else "")
        self.env.pop("TRITON_ALLOW_NON_CONSTEXPR_GLOBALS", None)  # it hides compile errors

    def say(self, text: str) -> None:
        print(text, flush=True)
        self.log.write(text + "\n")
        self.log.flush()

    def limit(self, step: str) -> float:
        """``step``'s time limit now: its own, cut to what is left of the whole after the time
        kept for the steps after it (their :data:`STEP_MIN_S`) and the time stopping it may take
        (:data:`STOP_GRACE_S`), so even a stopped step ends before the later steps' share."""
        later = STEPS[STEPS.index(step) + 1:]
        reserve = sum(self.minimums[s] for s in later)
        left = self.deadline - time.monotonic() - reserve - sum(STOP_GRACE_S.values())
        return max(0.0, min(self.limits[step], left))

    def call(self, step: str, cmd: list[str], timeout: float, cwd: Path = ROOT) -> tuple[int | None, float]:
        """Run ``cmd`` (its own process group), its output to the console and the log; returns
        (exit status or None when stopped at ``timeout``, seconds)."""
        self.say(f"\n=== {step} (limit {timeout:.0f} s): {shlex.join(cmd)}")
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=cwd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace", start_new_session=True)

        self.last_output = []

        def pump():
            for line in proc.stdout:
                sys.stdout.write(line)
                self.log.write(line)
                self.last_output.append(line.rstrip("\n"))
                del self.last_output[:-200]
            sys.stdout.flush()

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            rc = proc.wait(timeout=max(timeout, 1.0))
        except subprocess.TimeoutExpired:
            rc = None
            # SIGINT first: pytest then still writes its JUnit file and summary.
            for sig, grace in STOP_GRACE_S.items():
                try:
                    os.killpg(proc.pid, sig)  # the group this call started, nothing else
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
        reader.join(timeout=10)
        self.log.flush()
        return rc, time.monotonic() - t0

    def log_tail(self) -> list[str]:
        """The last lines (up to 200) the last :meth:`call` printed."""
        return list(getattr(self, "last_output", []))

    def record(self, step: str, status: str, seconds: float, **detail) -> dict:
        row = {"name": "gpu_check", "impl": step, "status": status, "seconds": round(seconds, 1), **detail}
        self.steps.append(row)
        self.say(f"--- {step}: {status} in {seconds:.1f} s" + (f" ({detail})" if detail else ""))
        self.copy()
        return row

    def copy(self) -> None:
        """Everything written so far into ``copy_to`` (``$OUT`` on the GPU machine), if set: a
        run stopped from outside has sent what it had."""
        if self.copy_to is not None:
            try:
                copy_out(self, self.copy_to)
            except OSError as err:  # a full or missing folder must not end the run
                print(f"gpu-check: cannot copy to {self.copy_to}: {err}", file=sys.stderr)

    def worker(self, task: str, *extra: str) -> list[str]:
        return [sys.executable, str(Path(__file__).resolve()), "--worker", task, "--results", str(self.results),
                *(["--dry-run"] if self.dry_run else []), *extra]


def _probe(run: Run, open_clip: bool = False) -> dict:
    """torch/triton versions, the device and whether ``degla_fast.kernels`` imports from outside
    the checkout (an install, not the cwd), from one fresh process; {} when torch is missing.
    ``open_clip``: also its version, or why it cannot be imported (a few seconds more)."""
    code = ("import json, torch, triton\n"
            "try:\n import degla_fast.kernels, degla_fast.loss.module, degla_fast.optim_ema\n ok = True\n"
            "except Exception:\n ok = False\n"
            "oc = None\n"
            + ("try:\n import open_clip\n oc = open_clip.__version__\n"
               "except Exception as err:\n oc = 'cannot be imported: %s: %s' % (type(err).__name__, err)\n"
               if open_clip else "") +
            "print(json.dumps({'torch': torch.__version__, 'triton': triton.__version__, "
            "'cuda': torch.cuda.is_available() and torch.cuda.get_device_name(0), 'project': ok, "
            "'open_clip': oc}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=run.env,
                          cwd=tempfile.gettempdir())
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    return json.loads(lines[-1]) if done.returncode == 0 and lines else {}


def step_install(run: Run) -> bool:
    """Torch, triton and a GPU checked; then ``gpu_check.py --install-only`` (:func:`install_only`:
    the carried wheels for what is missing, then the project) in its own process."""
    t0 = time.monotonic()
    probe = _probe(run)
    if not probe:
        run.record("install", "failed", time.monotonic() - t0, detail=f"{sys.executable} cannot import torch and triton")
        return False
    if not run.dry_run and not probe.get("cuda"):
        run.record("install", "failed", time.monotonic() - t0,
                   detail="no CUDA device: on a machine without a GPU run `make gpu-check DRY_RUN=1`")
        return False
    run.probe = probe
    missing = [w for w in WHEELS if not _installed(w)]
    project = probe["project"]
    if run.dry_run and not run.install:
        run.record("install", "skipped", time.monotonic() - t0,
                   detail=f"dry run: this venv ({'project importable' if project else 'PROJECT NOT IMPORTABLE'}); "
                          f"a GPU run would install {len(missing)} carried wheels: {' '.join(missing) or 'none'}")
        return project
    rc, _ = run.call("install", [sys.executable, str(Path(__file__).resolve()), "--install-only",
                                 "--wheels", str(WHEELS_DIR)], run.limit("install"))
    if rc != 0:  # install_only's last line says why (not its "+ command" lines)
        lines = [ln[len("install: "):] for ln in run.log_tail() if ln.startswith("install: ")
                 and not ln.startswith("install: + ")]
        why = "timed out" if rc is None else (lines[-1] if lines else f"exited {rc}")
        run.record("install", "failed", time.monotonic() - t0, detail=why)
        return False
    # Imported for real (torchvision and numpy come from the image; a wheel may not fit it).
    run.probe = probe = {**probe, "open_clip": _probe(run, open_clip=True).get("open_clip")}
    # open_clip is bench_step's alone: without it the kernels are still tested and benchmarked.
    run.record("install", "passed", time.monotonic() - t0, torch=probe["torch"], triton=probe["triton"],
               device=probe.get("cuda") or "cpu", open_clip=probe.get("open_clip"),
               wheels_installed=" ".join(missing) or "none")
    return True


def _junit_counts(path: Path) -> dict:
    if not path.exists():
        return {}
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed = [f"{c.get('classname', '').rsplit('.', 1)[-1]}::{c.get('name')}" for c in root.iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None]
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    if failed:
        counts["first_failures"] = "; ".join(failed[:8]) + (f" (+{len(failed) - 8} more)" if len(failed) > 8 else "")
    return counts


def step_test_gpu(run: Run) -> None:
    xml = run.results / "test-gpu.xml"
    xml.unlink(missing_ok=True)
    args = [f"--junitxml={xml}", "-p", "no:cacheprovider", "-rf", "--durations=10"]
    importlib.invalidate_caches()  # the install step may just have added pytest-timeout and xdist
    if importlib.util.find_spec("pytest_timeout"):
        args.append("--timeout=150")
    if not run.dry_run and importlib.util.find_spec("xdist"):
        args += ["-n", str(min(8, os.cpu_count() or 1))]  # kernel compiles dominate: in parallel processes
    # Dry run: the float64 tests of the kernel suites already run in `make test` at these sizes.
    kernel_tests = "" if run.dry_run else None
    timeout = run.limit("test-gpu")
    if shutil.which("make"):
        cmd = test_gpu_command(sys.executable, dry_run=run.dry_run, args=" ".join(args), kernel_tests=kernel_tests)
    else:  # the same command as the target (tests/test_gpu_check.py keeps them equal)
        cmd = fallback_test_gpu_command(sys.executable, args, kernel_tests)
    rc, seconds = run.call("test-gpu", cmd, timeout)
    counts = _junit_counts(xml)
    status = "timed out" if rc is None else ("passed" if rc == 0 else "failed")
    run.record("test-gpu", status, seconds, **counts)


#: What ``make test-gpu`` runs (for a machine without make).
TEST_GPU_KERNEL_TESTS = "tests/test_losses.py tests/test_ema.py tests/test_adamw_ema.py"
TEST_GPU_SELECT = "float64 or kernels_gpu"


def fallback_test_gpu_command(python: str, args: list[str], kernel_tests: str | None) -> list[str]:
    tests = (TEST_GPU_KERNEL_TESTS if kernel_tests is None else kernel_tests).split()
    return [python, "-m", "pytest", "-q", *args, "tests/test_kernels_gpu.py", *tests, "-k", TEST_GPU_SELECT]


#: bench_step's worker exits with this when open_clip cannot be imported (its JSON says why).
NO_OPEN_CLIP = 3


def step_bench(run: Run, name: str) -> None:
    limit = run.limit(name)
    extra = []
    if name == "bench_step":  # its cases fit themselves into the limit (less the worker's margin)
        extra = ["--deadline", f"{time.time() + limit - BENCH_STEP_MARGIN_S:.1f}"]
    json_path = run.results / f"{name}{'_quick' if run.dry_run else ''}.json"
    json_path.unlink(missing_ok=True)  # an earlier run's is no result of this one
    rc, seconds = run.call(name, run.worker(name, *extra), limit)
    data = json.loads(json_path.read_text()) if json_path.exists() else None
    if rc in (0, NO_OPEN_CLIP) and data and not data.get("partial"):
        rows = data["rows"]
        if rc == NO_OPEN_CLIP:
            run.record(name, "skipped", seconds, detail=rows[0].get("skipped"))
            return
        skipped = [r for r in rows if r.get("skipped")]
        failed = [r for r in skipped if str(r["skipped"]).startswith("case failed")]
        detail = {}
        if name == "bench_step":  # which cases the budget left out, and any that broke
            detail = {"not_run": sum(1 for r in skipped if str(r["skipped"]).startswith(("not run", "timed out"))),
                      "failed_cases": len(failed)}
        run.record(name, "failed" if failed else "passed", seconds, rows=len(rows), skipped_rows=len(skipped),
                   **detail)
        return
    # Stopped or failed: keep what it measured, with the ratios (bench_loss and bench_step rewrite
    # their JSON after every row), and say why the rest is missing.
    reason = f"timed out after {seconds:.0f} s" if rc is None else f"exited {rc}"
    env_path = run.results / f"{name}.env.json"
    if data is None:
        data = {"benchmark": json_path.stem, "env": json.loads(env_path.read_text()) if env_path.exists() else {},
                "rows": []}
    data.pop("partial", None)
    rows = data["rows"]
    rows.append({"name": name, "impl": "(rest of the benchmark)", "skipped": f"not run: {reason}"})
    _write_json(json_path, data)
    run.record(name, "timed out" if rc is None else "failed", seconds, rows=len(rows) - 1)


def step_report(run: Run) -> None:
    rc, seconds = run.call("report", run.worker("report", "--out", str(run.out)), run.limit("report") + 15)
    ok = rc == 0 and (run.out / "RESULTS.md").exists()
    run.record("report", "passed" if ok else ("timed out" if rc is None else "failed"), seconds)


def _write_json(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str))
    os.replace(tmp, path)


def write_summary(run: Run, env: dict, targets: list[dict] | None = None) -> Path:
    payload = {"benchmark": "gpu_check" + ("_dry_run" if run.dry_run else ""), "env": env, "rows": run.steps,
               "dry_run": run.dry_run, "total_seconds": round(time.monotonic() - run.start, 1),
               "finished": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               **({"targets": targets} if targets is not None else {})}
    path = run.results / "gpu_check.json"
    _write_json(path, payload)
    return path


# --- the targets (issue 26): the one-screen summary printed last --------------------------------

#: The shapes the targets are judged at (K, D, dtype, and the three batch sizes); the dry run's
#: are its own tiny CPU ones, so the summary's code runs there too (its verdicts mean nothing).
TARGET_SHAPES = {
    "gpu": {"K": 4, "D": 512, "dtype": "bfloat16", "B": 4096, "B_small": 256, "B_large": 65536},
    "dry": {"K": 4, "D": 64, "dtype": "float32", "B": 64, "B_small": 256, "B_large": 256},
}
#: The loss backends the targets compare (bench_loss's impl names): the fused ones, and torch.
FUSED_IMPLS = ("gemm", "triton", "triton, recomputed")
BACKEND_IMPLS = (*FUSED_IMPLS, "torch")
RELEASE_IMPL = "reference"  # the release's structure
PURE_FLOOR_IMPL, GEMM_FLOOR_IMPL = "pure gemm floor", "gemm floor"
MAX_X_FLOOR = 1.25  # the fastest backend's p50 against the pure floor's, at B
MAX_EXTRA_BYTES = 300e6  # its peak extra memory at B
MAX_LARGE_BYTES = 40e9  # at B_large, the peak of a fused backend that runs


def _ms(row: dict | None) -> str:
    return f"{row['p50_ms']:.3g} ms" if row and row.get("p50_ms") else "not measured"


def _mb(n) -> str:
    return f"{n / 1e6:,.0f} MB" if n is not None else "?"


def evaluate_targets(rows: list[dict], shape: dict) -> list[dict]:
    """Each target of issue 26 from bench_loss's rows: ``{"target", "figure", "met"}`` (``met``
    None where the rows needed are missing, or the line only reports a figure)."""
    def row(impl, batch):
        return next((r for r in rows if r.get("impl") == impl and r.get("B") == batch and r.get("K") == shape["K"]
                     and r.get("D") == shape["D"] and r.get("dtype") == shape["dtype"]), None)

    def measured(impls, batch):
        return [r for r in (row(i, batch) for i in impls) if r and not r.get("skipped") and r.get("p50_ms")]

    big, small, large = shape["B"], shape["B_small"], shape["B_large"]
    out = []
    pure, floor = row(PURE_FLOOR_IMPL, big), row(GEMM_FLOOR_IMPL, big)
    ran = measured(BACKEND_IMPLS, big)
    fastest = min(ran, key=lambda r: r["p50_ms"]) if ran else None
    name = f"B={big}: fastest backend <= {MAX_X_FLOOR}x the pure GEMM floor"
    if fastest and fastest.get("x_floor"):
        out.append({"target": name, "met": fastest["x_floor"] <= MAX_X_FLOOR,
                    "figure": f"{fastest['impl']} {_ms(fastest)} = {fastest['x_floor']:.2f}x pure floor "
                              f"({_ms(pure)}); gemm floor {_ms(floor)}"
                              + (f" ({fastest['x_gemm_floor']:.2f}x)" if fastest.get("x_gemm_floor") else "")})
    else:
        out.append({"target": name, "met": None, "figure": f"fastest {_ms(fastest)}, pure floor {_ms(pure)}"})
    name = f"B={big}: its peak extra memory <= {_mb(MAX_EXTRA_BYTES)}"
    peak = fastest.get("peak_mem_bytes") if fastest else None
    out.append({"target": name, "met": None if peak is None else peak <= MAX_EXTRA_BYTES,
                "figure": f"{fastest['impl']} {_mb(peak)}" if fastest else "not measured"})
    fused = measured(FUSED_IMPLS, small)
    best = min(fused, key=lambda r: r["p50_ms"]) if fused else None
    others = [row(RELEASE_IMPL, small), row("torch", small)]
    name = f"B={small}: fastest fused backend faster than the release structure and torch"
    if best and all(o and o.get("p50_ms") for o in others):
        out.append({"target": name, "met": all(best["p50_ms"] < o["p50_ms"] for o in others),
                    "figure": f"{best['impl']} {_ms(best)}: " + ", ".join(
                        f"{o['p50_ms'] / best['p50_ms']:.2f}x {o['impl']} ({_ms(o)})" for o in others)})
    else:
        out.append({"target": name, "met": None, "figure": f"fused {_ms(best)}, " + ", ".join(
            f"{impl} {_ms(o)}" for impl, o in zip((RELEASE_IMPL, "torch"), others))})
    name = f"B={large}: a fused backend runs within {MAX_LARGE_BYTES / 1e9:.0f} GB"
    tried = [r for r in (row(i, large) for i in FUSED_IMPLS) if r]
    fits = [r for r in tried if not r.get("skipped") and r.get("peak_mem_bytes") is not None
            and r["peak_mem_bytes"] <= MAX_LARGE_BYTES]
    out.append({"target": name, "met": bool(fits) if tried else None,
                "figure": "; ".join(f"{r['impl']} " + (r["skipped"][:40] if r.get("skipped") else
                                                        f"{_mb(r.get('peak_mem_bytes'))}, {_ms(r)}")
                                    for r in tried) or "not measured"})
    errs = [(r["impl"], max(r.get(f"grad_err_{k}", 0.0) for k in ("image", "text", "scale")))
            for r in measured((*BACKEND_IMPLS, RELEASE_IMPL), small) if "grad_err_image" in r]
    out.append({"target": f"B={small}: gradient error vs float64 (max |err| / max |ref|, worst input)", "met": None,
                "figure": ", ".join(f"{impl} {err:.2g}" for impl, err in errs) or "not measured"})
    return out


def summary_text(run: Run, targets: list[dict], total_s: float) -> str:
    """The one-screen summary: each step's status, then each target, its figure, met or not."""
    shape = TARGET_SHAPES["dry" if run.dry_run else "gpu"]
    lines = [f"=== gpu-check summary ({'DRY RUN: CPU sizes, the verdicts mean nothing' if run.dry_run else 'GPU'}"
             f"; {total_s:.0f} s; K={shape['K']} D={shape['D']} {shape['dtype']}) ==="]
    for s in run.steps:
        extra = f" ({s['passed']} passed, {s.get('failures', 0)} failed)" if "passed" in s else ""
        lines.append(f"  {s['impl']:<16} {s['status']:<10} {s['seconds']:>6.1f} s{extra}")
    for t in targets:
        verdict = {True: "MET", False: "NOT MET", None: "-"}[t["met"]]
        lines.append(f"[{verdict:^7}] {t['target']}: {t['figure']}")
    return "\n".join(lines)


def summarize(run: Run) -> tuple[list[dict], str]:
    """The targets from this run's bench_loss JSON, and the summary written to ``summary.md``."""
    path = run.results / f"bench_loss{'_quick' if run.dry_run else ''}.json"
    rows = json.loads(path.read_text())["rows"] if path.exists() else []
    targets = evaluate_targets(rows, TARGET_SHAPES["dry" if run.dry_run else "gpu"])
    text = summary_text(run, targets, time.monotonic() - run.start)
    (run.results / "summary.md").write_text(text + "\n", encoding="utf-8")
    return targets, text


#: What ``--copy-to`` copies as plain files (the rest, and these too, go into one tar.gz); the
#: benchmarks' JSON under the dry run's names too (``_quick``).
COPIED = ("RESULTS.md", "summary.md", "gpu_check.json", "gpu_check.log", "bench_loss.json", "bench_step.json",
          "auto_backends.json")


def copy_out(run: Run, dest: Path) -> None:
    """RESULTS.md, the summary, the step record, the log, the loss and step JSON and the auto
    table as files, and everything (``results/gpu-check/``: every JSON, the JUnit file, the log;
    ``plots/``; RESULTS.md) in ``gpu-check.tar.gz``: 8 files at most, the device tool's limit.
    Called after every step, so a run stopped from outside has sent what it had."""
    dest.mkdir(parents=True, exist_ok=True)
    run.log.flush()
    for name in COPIED:
        src = run.out / name if name == "RESULTS.md" else run.results / name
        if not src.exists() and run.dry_run:
            src = src.with_name(src.stem + "_quick" + src.suffix)
        if src.exists():
            shutil.copy2(src, dest / name)
    tmp = dest / "gpu-check.tar.gz.tmp"
    with tarfile.open(tmp, "w:gz") as tar:
        for path, arcname in ((run.out / "RESULTS.md", "RESULTS.md"), (run.results, "results/gpu-check"),
                              (run.out / "plots", "plots")):
            if path.exists():
                tar.add(path, arcname=arcname)
    os.replace(tmp, dest / "gpu-check.tar.gz")


def main_parent(args) -> int:
    out = Path(args.out) if args.out else (DRY_OUT if args.dry_run else BENCH)
    run = Run(out.resolve(), args.dry_run, args.total_s or (DRY_TOTAL_S if args.dry_run else TOTAL_S),
              install=args.install, copy_to=Path(args.copy_to).resolve() if args.copy_to else None)
    run.say(f"gpu-check{' (dry run: CPU, tiny sizes, Triton interpreter)' if args.dry_run else ''}: python "
            f"{sys.executable}, writing {run.out}"
            + (f" (and copying it to {run.copy_to})" if run.copy_to else "")
            + f", limit {run.deadline - run.start:.0f} s, TRITON_CACHE_DIR={run.cache}")
    try:
        if step_install(run):
            step_test_gpu(run)
            for name in BENCHES:
                step_bench(run, name)
        else:
            for step in ("test-gpu", *BENCHES):
                run.record(step, "skipped", 0.0, detail="install failed")
        env_path = run.results / "bench_loss.env.json"
        env = (json.loads(env_path.read_text()) if env_path.exists() else
               {"device": run.probe.get("cuda") or "unknown", "torch": run.probe.get("torch"),
                "triton": run.probe.get("triton"), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d")})
        targets, _ = summarize(run)
        write_summary(run, env, targets)
        step_report(run)
    finally:
        shutil.rmtree(run.cache, ignore_errors=True)
    for env_file in run.results.glob("*.env.json"):
        env_file.unlink()
    targets, text = summarize(run)
    summary = write_summary(run, env, targets)
    run.say(f"gpu-check finished in {time.monotonic() - run.start:.0f} s; {summary}, {run.out / 'RESULTS.md'}"
            + (f"; copied to {run.copy_to}" if run.copy_to else ""))
    run.say("\n" + text)
    run.copy()
    run.log.close()
    ok = all(s["status"] in ("passed", "skipped") for s in run.steps) and not any(
        s["impl"] == "install" and s["status"] == "failed" for s in run.steps)
    return 0 if ok else 1


# --- workers (one process each) -------------------------------------------------------------------

def _bench_module(name: str):
    """Import the one benchmark this worker runs (a stage imports only what it needs), the EMA
    ones with the parameter shapes from :func:`clip_parameter_shapes` (open_clip is not on a bare
    GPU machine; the shapes are the same, see the tests). A worker is this file run as a script
    (:meth:`Run.worker`), so benchmarks/ is first on sys.path and the benchmark imports by name."""
    mod = importlib.import_module(name)
    if name in ("bench_ema", "bench_adamw_ema"):
        mod.clip_parameter_shapes = clip_parameter_shapes
    return mod


def _loss_rows(mod, quick: bool, results: Path, name: str) -> list[dict]:
    """bench_loss's cases one by one, in its own order (what the targets need first; a failing
    case becomes a skipped row); after each, ``<name>.json`` with every row so far and their
    ratios, so a stage stopped at its limit keeps both."""
    import torch
    from common import write_results

    rows = []
    for case in mod.cases(quick):
        fields = {k: case[k] for k in ("impl", "B", "K", "D", "dtype")}
        reason = mod.skip_reason(case["impl"], torch.device(case["device"]))
        t0 = time.monotonic()
        if reason:
            row = {"name": "degla_loss", **fields, "skipped": reason}
        else:
            try:
                row = mod.run_case(case)
            except Exception as err:  # noqa: BLE001 - a failing implementation is a result
                row = {"name": "degla_loss", **fields,
                       "skipped": f"failed: {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"}
                if case["device"] == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.empty_cache()
        print(f"[{time.monotonic() - t0:6.1f} s] {json.dumps(row, default=str)}", flush=True)
        rows.append(row)
        write_results(name, mod.finish_rows([dict(r) for r in rows]), results, partial=True)
    return mod.finish_rows(rows)


def main_worker(args) -> int:
    quick = args.dry_run
    results = Path(args.results)
    if args.worker == "report":
        write_auto_table(results, dry_run=quick)
        return _report(results, Path(args.out))
    mod = _bench_module(args.worker)
    from common import env_info, write_results

    import torch

    if not quick and not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    _write_json(results / f"{args.worker}.env.json", env_info())
    if args.worker == "bench_step":
        return _step_worker(mod, quick, results, args.deadline)
    name = args.worker + ("_quick" if quick else "")
    rows = _loss_rows(mod, quick, results, name) if args.worker == "bench_loss" else mod.run(quick)
    path = write_results(name, rows, results)
    print(f"wrote {path} ({len(rows)} rows)")
    return 0


def _step_worker(mod, quick: bool, results: Path, deadline: float | None) -> int:
    """bench_step's cases in the time to ``deadline`` (epoch seconds): each row written as it
    comes (kept if the stage is stopped), then ``bench_step[_quick].json``."""
    from common import write_results

    name = "bench_step" + ("_quick" if quick else "")
    try:
        import open_clip  # noqa: F401 - every case builds its model with it
    except Exception as err:  # noqa: BLE001 - a missing or broken install is this stage's result
        reason = f"not run: open_clip cannot be imported ({type(err).__name__}: {err}); see the install step"
        write_results(name, [{"name": "train_step", "impl": "(every variant)", "skipped": reason}], results)
        print(reason, file=sys.stderr)
        return NO_OPEN_CLIP
    # SIGTERM from the parent at the stage's limit: an exit, so the running case's group ends too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    budget = None if deadline is None else max(0.0, deadline - time.time())
    print(f"bench_step: {budget:.0f} s for its cases" if budget is not None else "bench_step: no budget", flush=True)
    so_far = []

    def on_row(row):  # every row so far, with their ratios, kept if the stage is stopped
        print(f"[{row.get('case_s', 0):6.1f} s] {json.dumps(row, default=str)}", flush=True)
        so_far.append(dict(row))
        write_results(name, mod.finish_rows([dict(r) for r in so_far]), results, partial=True)

    rows = mod.run(quick, budget_s=budget, on_row=on_row)
    path = write_results(name, rows, results)
    print(f"wrote {path} ({len(rows)} rows)")
    return 0


#: Where a GPU run leaves the loss's auto table: the package (committed from the run) and beside the JSON.
AUTO_TABLE = ROOT / "degla_fast" / "auto_backends.json"


def write_auto_table(results: Path, dry_run: bool) -> Path | None:
    """The loss's ``auto`` table from bench_loss's JSON (the fastest of torch, gemm and triton
    per dtype and B on this GPU), beside it and, unless ``dry_run``, in the package. The dry run
    reads ``bench_loss_quick.json`` and writes its CPU rows beside it only, under capability
    0.0 (no GPU has it), so the path is exercised."""
    path = results / f"bench_loss{'_quick' if dry_run else ''}.json"
    if not path.exists():
        print(f"auto table: no {path.name}: not written")
        return None
    data = json.loads(path.read_text())
    capability = data["env"].get("capability") or ("0.0" if dry_run else None)
    if not capability:
        print(f"auto table: no compute capability in {path.name} (a CPU run): not written")
        return None
    from degla_fast.loss.auto import write_auto_table as write

    cap = tuple(int(v) for v in capability.split("."))
    targets = [results / "auto_backends.json"] + ([] if dry_run else [AUTO_TABLE])
    for target in targets:
        table = write(data["rows"], data["env"], cap, target)
    print(f"auto table: {len(table['entries'])} entries for {data['env'].get('device')} -> "
          + ", ".join(str(t) for t in targets))
    return targets[0]


def _report(results: Path, out: Path) -> int:
    """report.py's RESULTS.md and plots; without matplotlib the same tables, no plots."""
    import report

    if importlib.util.find_spec("matplotlib"):
        return report.main([str(results), "--out", str(out)])
    from degla_fast.io import write_text_atomic

    data = report.load_results(results)
    if not data:
        print(f"no benchmark JSON in {results}", file=sys.stderr)
        return 2
    write_text_atomic(out / "RESULTS.md", report.render(data, {}, out))
    print(f"wrote {out / 'RESULTS.md'} (matplotlib is not installed: no plots)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, Triton interpreter, this venv")
    parser.add_argument("--out", default=None,
                        help="where RESULTS.md, plots/ and results/gpu-check/ go (default benchmarks/; dry run: "
                             "runs/gpu-check-dry)")
    parser.add_argument("--install", action="store_true",
                        help="with --dry-run: run the install step too (into this python), as on the GPU machine")
    parser.add_argument("--copy-to", default=None,
                        help="after every step, copy what was written so far here (8 files: the report, the "
                             "summary, the JSON, the log, the auto table, and all of it in one tar.gz)")
    parser.add_argument("--total-s", type=float, default=None,
                        help=f"time limit of the whole run's steps (default {TOTAL_S}; dry {DRY_TOTAL_S})")
    parser.add_argument("--download-wheels", metavar="DIR", default=None, help="make gpu-wheels: download WHEELS to DIR")
    parser.add_argument("--install-only", action="store_true",
                        help="only install the carried wheels (where missing) and the project into this python, "
                             "with no index; then exit")
    parser.add_argument("--wheels", metavar="DIR", default=None,
                        help=f"the carried wheels (default {WHEELS_DIR.name}/ in the checkout)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--results", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)  # bench_step's, epoch s
    args = parser.parse_args(argv)
    if args.download_wheels:
        return download_wheels(Path(args.download_wheels))
    if args.install_only:
        return install_only(Path(args.wheels) if args.wheels else None)
    if args.worker:
        try:
            return main_worker(args)
        except Exception:
            traceback.print_exc()
            return 1
    return main_parent(args)


if __name__ == "__main__":
    sys.exit(main())
