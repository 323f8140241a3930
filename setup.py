"""degla-fast: fused DeGLA losses, EMA teacher and trainer for open_clip models."""
from setuptools import find_packages, setup

# The Triton kernels live in the top-level ``kernels/`` folder but are installed as
# ``degla_fast.kernels``: a top-level module named ``kernels`` already exists on PyPI.
packages = find_packages(include=["degla_fast", "degla_fast.*"]) + ["degla_fast.kernels"]
# The LLM prompts stay in configs/negatives/ where users edit them; a non-editable install
# carries a copy as degla_fast/negatives/prompts/.
packages.append("degla_fast.negatives.prompts")

# DALI's wheel is built per CUDA major version: "dali" (CUDA 13, NVIDIA driver >= 580) for a CUDA 13
# torch, "dali-cuda120" (driver >= 525) for a CUDA 12 one; `make setup` picks by torch.version.cuda.
extras = {
    "dali": ["nvidia-dali-cuda130"],
    "dali-cuda120": ["nvidia-dali-cuda120"],
    "deepspeed": ["deepspeed>=0.16,<0.20"],  # the versions degla_fast/compat/deepspeed.py was written for
    "eval": ["clip-benchmark>=1.6", "matplotlib>=3.7"],
    "logging": ["tensorboard>=2.14"],
    "bench": ["pytest-benchmark>=4.0", "matplotlib>=3.7"],
    # degla_fast.integrations.transformers: CLIPModel under transformers' Trainer (which needs accelerate).
    "transformers": ["transformers>=4.46", "accelerate>=1.1"],
}
# pandas: open_clip_train's CSV reader, for the tests of degla_fast.integrations.open_clip.
extras["test"] = sorted(
    {"pytest>=7.4", "pytest-benchmark>=4.0", "pytest-timeout>=2.2", "pandas>=1.5"}
    | set(extras["deepspeed"]) | set(extras["eval"]) | set(extras["logging"]) | set(extras["transformers"])
)
extras["all"] = sorted({dep for name, group in extras.items() if name != "dali-cuda120" for dep in group})

setup(
    name="degla-fast",
    version="0.1.0",
    description="Fast, trustworthy DeGLA fine-tuning for CLIP: fused Triton losses, EMA teacher, DeepSpeed ZeRO.",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"degla_fast.kernels": "kernels", "degla_fast.negatives.prompts": "configs/negatives"},
    package_data={"degla_fast": ["model_configs/*.json", "auto_backends.json"], "degla_fast.negatives.prompts": ["*.yaml"]},
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "numpy>=1.24",
        "open_clip_torch>=2.24",
        "pyyaml>=6.0",
        "tqdm>=4.66",
        "pillow>=10.0",
        "webdataset>=0.2.86",
    ],
    extras_require=extras,
    entry_points={"console_scripts": ["degla-fast=degla_fast.cli:main"]},
)
