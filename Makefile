# One-command set-up, tests, the demo training run and the benchmarks.
# Every target installs what it needs first, so a fresh clone only ever needs `make <target>`.
PY ?= python3
VENV ?= .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# No wheel cache: the CUDA torch build alone is over 5 GB in the venv, and a second copy under
# ~/.cache/pip is what ran a CI disk out of space once (ENOSPC during the editable install).
export PIP_NO_CACHE_DIR := 1

.PHONY: setup test test-gpu gpu-check gpu-wheels train bench bench-quick experiment clean

setup: $(STAMP)

# DS_BUILD_OPS=0: DeepSpeed's CUDA ops are compiled just in time where a GPU exists, never at install.
# A torch that is already there is kept: when $(PY) imports torch (a GPU image's CUDA build) the venv
# sees it (--system-site-packages), and when the venv imports torch, pip is held to that version
# ($(VENV)/keep-torch.txt) instead of constraints.txt, whose CPU-CI pins apply only where torch is
# absent (a fresh clone on CI). The DALI extra follows torch.version.cuda: 12.x -> dali-cuda120
# (drivers >= 525), else dali (cuda130, drivers >= 580; its CPU pipeline runs anywhere).
# Last, what every command needs is imported once: a broken install (a CUDA library torch cannot
# load) fails here and not minutes into a run, and the first cold read of torch's libraries from
# disk (7-11 s on a fresh clone) is not the first `make train`'s.
KEEP_TORCH := $(VENV)/keep-torch.txt
$(STAMP): setup.py constraints.txt
	test -x $(PYTHON) || $(PY) -m venv $$($(PY) -c "import torch" >/dev/null 2>&1 && echo --system-site-packages) $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip setuptools wheel
	if $(PYTHON) -c "import torch" >/dev/null 2>&1; then \
	  $(PYTHON) -c "import importlib.metadata as m; [print(f'{d}=={m.version(d)}') for d in ('torch', 'torchvision') if any(x.metadata['Name'] == d for x in m.distributions())]" > $(KEEP_TORCH); \
	  echo "setup: keeping the installed $$(tr '\n' ' ' < $(KEEP_TORCH))(CUDA $$($(PYTHON) -c 'import torch; print(torch.version.cuda)'))"; \
	  pins=$(KEEP_TORCH); \
	else pins=constraints.txt; fi; \
	dali=$$($(PYTHON) -c "import torch; print('dali-cuda120' if (torch.version.cuda or '').startswith('12.') else 'dali')" 2>/dev/null || echo dali); \
	DS_BUILD_OPS=0 $(PYTHON) -m pip install -q -c $$pins -e ".[test,$$dali]"
	@$(PYTHON) -c "import torch, open_clip, degla_fast, degla_fast.model; print(f'setup: torch {torch.__version__} (CUDA {torch.version.cuda}, GPU {\"yes\" if torch.cuda.is_available() else \"no\"}), open_clip {open_clip.__version__}, degla-fast {degla_fast.__version__} import')"
	touch $@

# Triton kernels run through the interpreter on the CPU (TRITON_INTERPRET=1) in tests,
# after the compile gate (check-kernels) has compiled them with the real compiler.
test: setup check-kernels
	TRITON_INTERPRET=1 $(PYTHON) -m pytest -q tests

# The kernel compile gate (docs/kernels.md, "Compile gate"): every configuration a launcher can
# pick, compiled by Triton's real compiler for sm_80 and sm_90 without a GPU, once with the
# pinned Triton and once with Triton 3.6 (installed once into $(TRITON_36)); fails on compile
# errors, shared memory above the block limit and register spills. Each run prints one line per
# kernel and every failure in full; the table of every variant goes to
# benchmarks/results/compile_gate-triton<version>.txt (and .json).
TRITON_36 := $(VENV)/triton-3.6
.PHONY: check-kernels
# Both runs always run; the target fails if either did.
check-kernels: setup $(TRITON_36)/.installed-stamp
	status=0; \
	TRITON_INTERPRET=0 $(PYTHON) -m degla_fast.compile_gate || status=1; \
	TRITON_INTERPRET=0 PYTHONPATH=$(TRITON_36)$${PYTHONPATH:+:$$PYTHONPATH} $(PYTHON) -m degla_fast.compile_gate --expect-triton 3.6.0 || status=1; \
	exit $$status

$(TRITON_36)/.installed-stamp: | $(STAMP)
	$(PYTHON) -m pip install -q --no-deps --target $(TRITON_36) triton==3.6.0
	touch $@

# On a GPU machine: the kernel tests against their float64 expectations with the compiled
# kernels on CUDA tensors (TRITON_INTERPRET=0), not through the interpreter: GPU sizes in
# tests/test_kernels_gpu.py, the float64 tests of the kernel suites. DRY_RUN=1: CPU tensors
# through the interpreter at tiny sizes. gpu-check runs it with GPU_SETUP= (no pinned venv).
KERNEL_TESTS = tests/test_losses.py tests/test_ema.py tests/test_adamw_ema.py
GPU_SETUP ?= setup
TEST_GPU_ARGS ?=
test-gpu: $(GPU_SETUP)
	TRITON_INTERPRET=$(if $(DRY_RUN),1,0) DEGLA_GPU_DRY_RUN=$(DRY_RUN) $(PYTHON) -m pytest -q $(TEST_GPU_ARGS) tests/test_kernels_gpu.py $(KERNEL_TESTS) -k "float64 or kernels_gpu"

# One H100/H200 with only torch + triton, no network, at most 7 minutes: `gpu_check.py --install-only`
# (the carried .gpu-wheels for what is missing, then this checkout through a .pth file: no build,
# so no pip version asks an index), test-gpu, bench_loss (the rows the targets need first),
# bench_atomics/bench_ema/bench_adamw_ema, bench_step (train_step at ViT-B-32, as much as its
# budget allows), benchmarks/RESULTS.md and benchmarks/results/gpu-check/*.json, and last a
# one-screen summary of the targets (docs/benchmarks.md, "GPU check"). With OUT set (the device
# tool sets it) everything it writes is also copied into $(OUT) after every step: 8 files
# (RESULTS.md, summary.md, the JSON, the log, the auto table, gpu-check.tar.gz with all of it).
# DRY_RUN=1: the same on the CPU with tiny sizes, written under runs/gpu-check-dry
# (GPU_CHECK_OUT), in this venv; OUT=DIR copies there too.
GPU_CHECK_OUT ?=
GPU_PYTHON ?= python3
gpu-check: $(if $(DRY_RUN),$(GPU_SETUP))
	$(if $(DRY_RUN),$(PYTHON),$(GPU_PYTHON)) benchmarks/gpu_check.py $(if $(DRY_RUN),--dry-run) $(if $(GPU_CHECK_OUT),--out $(GPU_CHECK_OUT)) $(if $(OUT),--copy-to "$(OUT)")

# The wheels gpu-check installs where missing (benchmarks/gpu_check.py: WHEELS: pytest's stack and
# open_clip_torch's; pure Python but regex, carried for CPython 3.11-3.13 manylinux x86_64), into
# .gpu-wheels/ (ignored: name it in the device tool's carry so it travels with the working tree).
# Run it here, where pip reaches the index; the GPU machine reaches none.
gpu-wheels: setup
	$(PYTHON) benchmarks/gpu_check.py --download-wheels .gpu-wheels

# The DeGLA story on the synthetic world (docs/synthetic.md): pre-train, NegCLIP and DeGLA fine-tunes,
# one table + runs/demo/results.png; a second run reuses finished stages.
train: setup
	$(PYTHON) -m degla_fast.demo

# The local ablation (docs/experiment.md): 5 variants x 5 seeds, paired 95 % CIs. QUICK=1: the
# seconds-long smoke run (runs/experiment-quick); EXPERIMENT_ARGS: more flags (e.g. --split val).
experiment: setup
	$(PYTHON) -m degla_fast experiment $(if $(QUICK),--quick --output runs/experiment-quick,--output runs/experiment) $(EXPERIMENT_ARGS)

# The benchmark suite: full sizes on a GPU, small CPU sizes elsewhere; then RESULTS.md and plots.
BENCH_JSON = benchmarks/results/pytest-benchmark-$$(hostname).json
bench: setup
	mkdir -p benchmarks/results
	$(PYTHON) -m pytest -q -p no:cacheprovider benchmarks --benchmark-json=$(BENCH_JSON)
	$(PYTHON) benchmarks/report.py benchmarks/results

# Small CPU sizes on any machine: proves every benchmark runs and writes its files.
bench-quick: setup
	mkdir -p benchmarks/results
	$(PYTHON) -m pytest -q -p no:cacheprovider benchmarks --bench-quick --benchmark-json=$(BENCH_JSON)
	$(PYTHON) benchmarks/report.py benchmarks/results

clean:
	rm -rf build *.egg-info .pytest_cache runs
