"""The DeGLA trainer: configuration, the training step, checkpoints, logging, distributed set-up.

Entry points: ``degla_fast.train.main.main(argv)`` (``degla-fast train``), ``train(config)`` in
the same module (which runs :mod:`.loop`, imported only then), and ``degla_fast.train.step.train_step`` (what ``benchmarks/bench_step.py`` times).
"""
