"""open_clip's trainer with our loss: :func:`use_degla_loss` and :func:`restore`.

``open_clip_train`` (shipped in the ``open_clip_torch`` wheel) builds its loss once per run with
``create_loss(args)`` and calls it as ``loss(**model_out, output_dict=True)``; ``DeGLALoss``
takes that call as it is. After :func:`use_degla_loss`, ``create_loss`` returns a
:class:`~degla_fast.losses.DeGLALoss` built from ``args`` (``local_loss``, ``gather_with_grad``,
``rank``, ``world_size``) and the keywords given here: by default plain CLIP (``num_negatives=0``,
the same values and gradients as open_clip's ``ClipLoss``) through our memory-lean backends::

    from degla_fast.integrations.open_clip import use_degla_loss
    use_degla_loss()                     # or use_degla_loss(backend="triton", dot_precision="ieee")
    from open_clip_train.main import main
    main(["--train-data", "train.csv", ...])

``python -m degla_fast.integrations.open_clip_train ARGS...`` does exactly that.

This module is the only place that touches open_clip's internals: the names under which
``create_loss`` is found (:data:`BINDINGS`) and, for the launcher's first log line,
``open_clip_train.main.setup_logging``. Where the installed version no longer has them, the
functions here stop with one line (a :class:`~degla_fast.errors.ConfigError`) instead of
training silently with open_clip's own loss.
"""
from __future__ import annotations

import inspect
import logging
import sys

from ..errors import ConfigError, first_line
from ..losses import DeGLALoss

#: Where ``create_loss`` lives: its definition, the package's re-export, and the name
#: ``open_clip_train.main`` imports (``from open_clip import ..., create_loss``) and calls in
#: ``main()``. A module imported later binds the replacement by itself (it imports the patched name).
BINDINGS = ("open_clip.factory", "open_clip", "open_clip_train.main")
TRAINER = "open_clip_train.main"
#: The open_clip_torch release this integration was checked against (tests/test_open_clip.py).
TESTED_WITH = "3.3.0"
#: DeGLALoss arguments that come from open_clip_train's ``args``, never from ``use_degla_loss``.
FROM_ARGS = ("local_loss", "gather_with_grad", "rank", "world_size")
#: Defaults for open_clip_train: its batches hold no hard negatives (plain CLIP), and its loss
#: reads nothing back to the host (ClipLoss does not check its inputs either).
DEFAULTS = {"num_negatives": 0, "check_finite": False}

_state: dict = {"original": None, "replacement": None, "kwargs": None}


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("open_clip_torch")
    except Exception:  # an unusual install (a source tree on sys.path): the message says so
        return "unknown"


def _mismatch(what: str) -> ConfigError:
    return ConfigError(f"{what} (open_clip_torch {_version()}); degla_fast.integrations.open_clip was written "
                       f"against open_clip_torch {TESTED_WITH}: use that version or update the integration")


def loss_kwargs_checked(loss_kwargs: dict) -> dict:
    """``DEFAULTS`` updated with ``loss_kwargs``, checked the way the loss will be built; a
    ConfigError names an unknown or open_clip-owned keyword, a bad value, or a loss that needs
    the EMA teacher open_clip_train does not have."""
    allowed = [p for p in inspect.signature(DeGLALoss).parameters if p not in FROM_ARGS]
    for key in loss_kwargs:
        if key in FROM_ARGS:
            raise ConfigError(f"use_degla_loss: {key} comes from open_clip_train's own arguments (--local-loss, "
                              "--gather-with-grad, the launcher's rank and world size); do not pass it here")
        if key not in allowed:
            raise ConfigError(f"use_degla_loss: unknown DeGLALoss argument {key!r} (allowed: {', '.join(allowed)})")
    kwargs = {**DEFAULTS, **loss_kwargs}
    if DeGLALoss(**kwargs).needs_teacher:  # builds it once: a bad value is an error now, not at step 1
        raise ConfigError("use_degla_loss: open_clip_train has no EMA teacher; with num_negatives > 0 set "
                          "tgc_weight=0 and distill_weight=0 (NegCLIP, + IGC), or train DeGLA itself with "
                          "`degla-fast train` (docs/open_clip.md)")
    return kwargs


def degla_loss_from_args(args, **loss_kwargs) -> DeGLALoss:
    """The :class:`DeGLALoss` for open_clip_train's parsed ``args``: its distribution settings and
    ``loss_kwargs``. Configurations whose loss is not a softmax CLIP loss are refused by name."""
    refused = [("siglip", "--siglip: the DeGLA loss is softmax-based; SigLIP's sigmoid loss is not supported"),
               ("distill", "--distill: open_clip's distillation from another model is not supported with the "
                           "DeGLA loss"),
               ("horovod", "--horovod: the DeGLA loss gathers with torch.distributed only")]
    for flag, message in refused:
        if getattr(args, flag, False):
            raise ConfigError(message)
    if "coca" in str(getattr(args, "model", "")).lower():
        raise ConfigError(f"--model {args.model}: CoCa's captioning loss is not supported with the DeGLA loss")
    return DeGLALoss(local_loss=bool(args.local_loss), gather_with_grad=bool(args.gather_with_grad),
                     rank=int(args.rank), world_size=int(args.world_size), **loss_kwargs)


def use_degla_loss(**loss_kwargs) -> None:
    """From now on open_clip's ``create_loss(args)`` returns a :class:`DeGLALoss` (see the module doc).

    ``loss_kwargs``: DeGLALoss arguments (``num_negatives`` default 0, ``backend``, ``dot_precision``,
    the weights, ``check_finite`` default False) except the four that come from ``args``
    (:data:`FROM_ARGS`). Calling it again replaces the keywords; :func:`restore` undoes it.
    """
    kwargs = loss_kwargs_checked(loss_kwargs)
    import open_clip  # noqa: F401  (open_clip.factory is imported with it)

    original = _state["original"]
    if original is None:
        original = getattr(sys.modules["open_clip.factory"], "create_loss", None)
        if not callable(original):
            raise _mismatch("open_clip.factory has no create_loss")

    def create_loss(args):
        """degla_fast.integrations.open_clip: the DeGLA loss in place of open_clip's create_loss."""
        return degla_loss_from_args(args, **kwargs)

    # Every binding checked before any is replaced: a mismatch leaves open_clip as it was.
    modules = [sys.modules[name] for name in BINDINGS if name in sys.modules]  # one imported later binds ours itself
    for module in modules:
        if getattr(module, "create_loss", None) not in (original, _state["replacement"]):
            raise _mismatch(f"{module.__name__}.create_loss is not open_clip's create_loss")
    for module in modules:
        module.create_loss = create_loss
    _state.update(original=original, replacement=create_loss, kwargs=kwargs)


def restore() -> None:
    """open_clip's own ``create_loss`` back everywhere :func:`use_degla_loss` put ours (a no-op without it)."""
    original, replacement = _state["original"], _state["replacement"]
    if original is None:
        return
    for name in BINDINGS:
        module = sys.modules.get(name)
        if module is not None and getattr(module, "create_loss", None) is replacement:
            module.create_loss = original
    _state.update(original=None, replacement=None, kwargs=None)


def _calls(function, name: str) -> bool:
    """Whether ``function``'s own code refers to the global ``name`` (how it reaches a binding we replace)."""
    code = getattr(function, "__code__", None)
    return code is not None and name in code.co_names


def _trainer():
    """``open_clip_train.main``, checked: its ``main()`` still calls the ``create_loss`` we replaced."""
    try:
        import open_clip_train.main as trainer
    except ImportError as err:
        raise ConfigError(f"cannot import open_clip_train ({first_line(err)}); it ships in the open_clip_torch "
                          "wheel, and its data loading needs pandas (pip install pandas)") from None
    if not _calls(getattr(trainer, "main", None), "create_loss"):
        raise _mismatch(f"{TRAINER}.main() no longer calls create_loss")
    if trainer.create_loss is not _state["replacement"]:
        raise _mismatch(f"{TRAINER}.create_loss is not the name use_degla_loss replaced")
    return trainer


def announcement(kwargs: dict) -> str:
    """The first log line of an open_clip_train run with our loss."""
    settings = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    return (f"degla-fast: open_clip_train runs with the DeGLA loss in place of open_clip's create_loss "
            f"(degla_fast.integrations.open_clip: DeGLALoss({settings}), local_loss, gather_with_grad, rank and "
            f"world_size from the arguments)")


def run_open_clip_train(argv: list[str], **loss_kwargs):
    """open_clip_train's own ``main(argv)`` with :func:`use_degla_loss` applied (undone afterwards);
    its first log line says so. Returns what ``main`` returns."""
    use_degla_loss(**loss_kwargs)
    try:
        trainer = _trainer()
        line = announcement(_state["kwargs"])
        real_setup = getattr(trainer, "setup_logging", None)
        if callable(real_setup) and _calls(trainer.main, "setup_logging"):
            def setup_logging(*args, **kwargs):  # open_clip_train's handlers first, then our line through them
                result = real_setup(*args, **kwargs)
                logging.info(line)
                return result

            trainer.setup_logging = setup_logging
        else:  # no logging set-up to follow: the line goes first on stderr, where its log goes
            print(line, file=sys.stderr, flush=True)
        try:
            return trainer.main(list(argv))
        finally:
            if real_setup is not None:
                trainer.setup_logging = real_setup
    finally:
        restore()
