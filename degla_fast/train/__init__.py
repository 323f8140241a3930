"""The DeGLA trainer: configuration, the training step, checkpoints, logging, distributed set-up.

Entry points: ``degla_fast.train.main.main(argv)`` (``degla-fast train``), ``train(config)`` in
the same module, and ``degla_fast.train.step.train_step`` (what ``benchmarks/bench_step.py`` times).
"""
