"""The project's Triton kernels and their launchers, installed as ``degla_fast.kernels``.

This folder is the top-level ``kernels/`` of the project's layout; setup.py's ``package_dir``
installs it under the ``degla_fast`` package (a top-level module named ``kernels`` already exists
on PyPI), so code imports ``degla_fast.kernels.<module>``. Triton only: the autograd Functions
and the PyTorch fallbacks that call these launchers live in :mod:`degla_fast.loss` and
:mod:`degla_fast.ema`.
"""
