"""open_clip's trainer with our loss: :func:`use_degla_loss` and :func:`restore`.

``open_clip_train`` (shipped in the ``open_clip_torch`` wheel) builds its loss once per run with
``create_loss(args)`` and calls it as ``loss(**model_out, output_dict=True)``; ``DeGLALoss``
takes that call as it is. After :func:`use_degla_loss`, ``create_loss`` returns a
:class:`~degla_fast.loss.DeGLALoss` built from ``args`` (``local_loss``, ``gather_with_grad``,
``rank``, ``world_size``) and the keywords given here: by default plain CLIP (``num_negatives=0``,
the same values and gradients as open_clip's ``ClipLoss``) through our memory-lean backends::

    from degla_fast.integrations.open_clip import use_degla_loss
    use_degla_loss()                     # or use_degla_loss(backend="triton", dot_precision="ieee")
    from open_clip_train.main import main
    main(["--train-data", "train.csv", ...])

``python -m degla_fast.integrations.open_clip_train ARGS...`` does exactly that; with
``--num-negatives K`` (K > 0) it trains DeGLA itself inside open_clip_train
(:func:`run_open_clip_train`): a CSV column of hard negatives, the EMA teacher, its checkpoints.

This module is the only place that touches open_clip's internals: the names under which
``create_loss`` is found (:data:`BINDINGS`), for the launcher's first log line
``open_clip_train.main.setup_logging``, and, with negatives (:data:`DEGLA_HOOKS`), the names
``open_clip_train.main`` calls for its resume checkpoint (``pt_load``) and its epochs
(``train_one_epoch``) and the CSV reader ``open_clip_train.data.get_csv_dataset``. Where the
installed version no longer has them, the functions here stop with one line (a
:class:`~degla_fast.errors.ConfigError`) instead of training silently with open_clip's own loss.
"""
from __future__ import annotations

import inspect
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import unwrap
from ..errors import ConfigError, DataError, first_line
from ..loss import DeGLALoss

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


def loss_kwargs_checked(loss_kwargs: dict, *, with_teacher: bool = False) -> dict:
    """``DEFAULTS`` updated with ``loss_kwargs``, checked the way the loss will be built; a
    ConfigError names an unknown or open_clip-owned keyword, a bad value, or (unless
    ``with_teacher``: the launcher's run, which adds one) a loss that needs the EMA teacher
    open_clip_train does not have."""
    allowed = [p for p in inspect.signature(DeGLALoss).parameters if p not in FROM_ARGS]
    for key in loss_kwargs:
        if key in FROM_ARGS:
            raise ConfigError(f"use_degla_loss: {key} comes from open_clip_train's own arguments (--local-loss, "
                              "--gather-with-grad, the launcher's rank and world size); do not pass it here")
        if key not in allowed:
            raise ConfigError(f"use_degla_loss: unknown DeGLALoss argument {key!r} (allowed: {', '.join(allowed)})")
    kwargs = {**DEFAULTS, **loss_kwargs}
    if DeGLALoss(**kwargs).needs_teacher and not with_teacher:  # built once: a bad value is an error now
        raise ConfigError("use_degla_loss: open_clip_train has no EMA teacher; with num_negatives > 0 set "
                          "tgc_weight=0 and distill_weight=0 (NegCLIP, + IGC), or train DeGLA itself with "
                          "`python -m degla_fast.integrations.open_clip_train --num-negatives K ...`, which adds "
                          "the negatives and the teacher, or `degla-fast train` (docs/open_clip.md)")
    return kwargs


def degla_loss_from_args(args, **loss_kwargs) -> DeGLALoss:
    """The :class:`DeGLALoss` for open_clip_train's parsed ``args``: its distribution settings and
    ``loss_kwargs``. Configurations whose loss is not a softmax CLIP loss are refused by name."""
    for flag, message in REFUSED.items():
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
    _use_degla_loss(loss_kwargs_checked(loss_kwargs))


def _use_degla_loss(kwargs: dict) -> None:
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


def announcement(kwargs: dict, options: DeglaOptions | None = None) -> str:
    """The first log line of an open_clip_train run with our loss."""
    settings = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    line = (f"degla-fast: open_clip_train runs with the DeGLA loss in place of open_clip's create_loss "
            f"(degla_fast.integrations.open_clip: DeGLALoss({settings}), local_loss, gather_with_grad, rank and "
            f"world_size from the arguments)")
    if options is not None and kwargs.get("num_negatives", 0) > 0:
        line += (f"; {kwargs['num_negatives']} hard negatives per caption from the column "
                 f"{options.hard_captions_key!r} (joined by {options.negatives_separator!r})")
        if DeGLALoss(**kwargs).needs_teacher:
            line += f"; EMA teacher, decay {options.ema_decay}, saved in the checkpoints' optimizer['{TEACHER_KEY}']"
    return line


# ---------------------------------------------------------------- DeGLA by flags: negatives and the EMA teacher

#: The names a run with negatives replaces for its duration (each checked before any is replaced):
#: open_clip_train's CSV reader (looked up in its module by ``get_data`` at call time), and the
#: resume loader and epoch loop that ``open_clip_train.main`` imported under these names.
DEGLA_HOOKS = (("open_clip_train.data", "get_csv_dataset"), (TRAINER, "pt_load"), (TRAINER, "train_one_epoch"))
#: Where the teacher travels in open_clip_train's checkpoints: a key of the optimizer's state dict
#: (``checkpoint["optimizer"]["degla_teacher"]``), the one part of the checkpoint it builds from an
#: object with public save/load hooks; ``checkpoint["state_dict"]`` stays a plain open_clip model.
TEACHER_KEY = "degla_teacher"


def _ema_decay_default() -> float:
    from ..train.config import EMAConfig

    return EMAConfig.decay  # the trainer's ema.decay default: one owner


@dataclass(frozen=True)
class DeglaOptions:
    """What a run with negatives needs besides the loss: the CSV column of hard negatives, its
    separator, and the EMA teacher's decay (``ema.decay`` of ``degla-fast train``)."""

    hard_captions_key: str | None = None
    negatives_separator: str = "|"
    ema_decay: float = field(default_factory=_ema_decay_default)


def collate_negatives(items):
    """``(images [B, ...], tokens [B*(1+K), L])`` from items ``(image, tokens [1+K, L])``: the loss's
    text layout, B positives then the B*K negatives sample-major."""
    images = torch.stack([image for image, _ in items])
    tokens = torch.stack([t for _, t in items])
    return images, torch.cat([tokens[:, 0], tokens[:, 1:].flatten(0, 1)])


class NegativesCsvDataset(torch.utils.data.Dataset):
    """open_clip_train's CSV rows with each caption's K hard negatives, read and checked by this
    project's CSV reader (docs/data.md); item ``i``: ``(image, tokens [1+K, context])``, the K
    negatives drawn for ``(seed, epoch, i)`` as in ``degla-fast train``. Image paths are read as
    open_clip_train reads them (relative to the working folder)."""

    def __init__(self, path: str, transforms, tokenizer, *, img_key: str, caption_key: str, separator: str,
                 options: DeglaOptions, num_negatives: int, seed: int, shared_epoch):
        from ..data.sampling import check_negatives
        from ..data.sources import load_csv

        if not Path(path).is_file():
            raise DataError(f"--train-data {path}: no such file")
        self.records = load_csv(Path(path), Path(""), img_key=img_key, caption_key=caption_key,
                                negatives_key=options.hard_captions_key, separator=separator,
                                negatives_separator=options.negatives_separator)
        check_negatives(self.records, num_negatives, source=path, with_replacement=False, replacement_hint=False)
        self.transforms, self.tokenizer = transforms, tokenizer
        self.num_negatives, self.seed, self.shared_epoch = num_negatives, seed, shared_epoch

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        from ..data.sampling import choose_negatives
        from ..data.sources import open_rgb_image, read_image_file
        from ..data.text import tokenize_captions

        record = self.records[index]
        image = open_rgb_image(lambda: read_image_file(record.image), f"{record.where}: {record.image}")
        image = self.transforms(image)
        negatives = choose_negatives(record, index, self.num_negatives, seed=self.seed,
                                     epoch=self.shared_epoch.get_value())
        # Untrimmed (open_clip_train's context length): its models and its val/zero-shot code see the same shape.
        return image, tokenize_captions(self.tokenizer, [record.caption], [negatives], trim=False)


class _DeglaRun:
    """The hooks of one open_clip_train run with negatives: its CSV reader, the teacher's restore
    from the resume checkpoint, and, at the first epoch, the EMA teacher with its forward, update
    and save hooks on the student and the optimiser (public torch hooks, removed by :meth:`close`)."""

    def __init__(self, loss_kwargs: dict, options: DeglaOptions):
        self.num_negatives = loss_kwargs["num_negatives"]
        self.needs_teacher = DeGLALoss(**loss_kwargs).needs_teacher
        self.options = options
        self.teacher = None
        self.student = None
        self.restored: tuple[dict, str] | None = None
        self.resumed_from: str | None = None
        self.handles: list = []
        self.replaced: list[tuple[object, str, object]] = []

    # -- the replaced names
    def install(self) -> None:
        import importlib

        targets = [(importlib.import_module(module), name) for module, name in DEGLA_HOOKS]
        for module, name in targets:
            if not callable(getattr(module, name, None)):
                raise _mismatch(f"{module.__name__}.{name} is gone")
        trainer = sys.modules[TRAINER]
        for name in ("pt_load", "train_one_epoch"):
            if not _calls(trainer.main, name):
                raise _mismatch(f"{TRAINER}.main() no longer calls {name}")
        wrappers = {"get_csv_dataset": self.csv_dataset, "pt_load": self.pt_load,
                    "train_one_epoch": self.train_one_epoch}
        for module, name in targets:
            original = getattr(module, name)
            self.replaced.append((module, name, original))
            setattr(module, name, wrappers[name](original))

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        for module, name, original in reversed(self.replaced):
            setattr(module, name, original)
        self.handles, self.replaced = [], []

    def csv_dataset(self, original):
        def get_csv_dataset(args, preprocess_fn, is_train, epoch=0, tokenizer=None):
            """degla_fast.integrations.open_clip: the training CSV with its hard negatives."""
            if not is_train:  # validation: open_clip_train's own (its evaluate() computes a plain CLIP loss)
                return original(args, preprocess_fn, is_train, epoch=epoch, tokenizer=tokenizer)
            from open_clip_train.data import DataInfo, SharedEpoch
            from torch.utils.data import DataLoader
            from torch.utils.data.distributed import DistributedSampler

            shared_epoch = SharedEpoch(epoch)
            dataset = NegativesCsvDataset(args.train_data, preprocess_fn, tokenizer, img_key=args.csv_img_key,
                                          caption_key=args.csv_caption_key, separator=args.csv_separator,
                                          options=self.options, num_negatives=self.num_negatives, seed=args.seed,
                                          shared_epoch=shared_epoch)
            sampler = DistributedSampler(dataset) if args.distributed else None
            # The loader open_clip_train builds for a CSV, plus the collate of the loss's text layout.
            loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=sampler is None,
                                num_workers=args.workers, pin_memory=True, sampler=sampler, drop_last=True,
                                collate_fn=collate_negatives)
            loader.num_samples = len(dataset)
            loader.num_batches = len(loader)
            return DataInfo(loader, sampler, shared_epoch)

        return get_csv_dataset

    def pt_load(self, original):
        def pt_load(path, *args, **kwargs):
            """degla_fast.integrations.open_clip: the checkpoint, with the teacher set aside for the run."""
            checkpoint = original(path, *args, **kwargs)
            optimizer_state = checkpoint.get("optimizer") if isinstance(checkpoint, dict) else None
            if isinstance(optimizer_state, dict) and TEACHER_KEY in optimizer_state:
                self.restored = (optimizer_state.pop(TEACHER_KEY), str(path))
            else:
                self.resumed_from = str(path)
            return checkpoint

        return pt_load

    def train_one_epoch(self, original):
        def train_one_epoch(model, data, loss, epoch, optimizer, *args, **kwargs):
            """degla_fast.integrations.open_clip: open_clip_train's epoch with the EMA teacher attached."""
            if self.needs_teacher and self.teacher is None:
                self.attach_teacher(unwrap(model), optimizer)
            return original(model, data, loss, epoch, optimizer, *args, **kwargs)

        return train_one_epoch

    # -- the teacher
    def attach_teacher(self, student, optimizer) -> None:
        from ..ema import EMATeacher

        # Built before the hooks exist: the teacher is a deep copy of the student, hooks and all. A
        # student cast to 16 bits (--precision pure_bf16/pure_fp16) gets a teacher whose forward
        # weights are in that dtype too (its inputs are); the EMA state stays fp32.
        dtype = next(student.parameters()).dtype
        forward_dtype = dtype if dtype in (torch.bfloat16, torch.float16) else None
        self.teacher = EMATeacher(student, decay=self.options.ema_decay, forward_dtype=forward_dtype)
        self.student = student
        if self.restored is not None:
            state, path = self.restored
            self.teacher.load_state_dict(state)
            logging.info(f"degla-fast: EMA teacher restored from {path}")
        elif self.resumed_from is not None:
            logging.info(f"degla-fast: {self.resumed_from} holds no EMA teacher; the teacher starts from the "
                         "resumed student")
        self.handles = [student.register_forward_hook(self.teacher_features, with_kwargs=True),
                        optimizer.register_step_post_hook(self.update_teacher),
                        optimizer.register_state_dict_post_hook(self.save_teacher)]

    def teacher_features(self, module, args, kwargs, output):
        """After the student's training forward: the teacher's features of the same batch, as the
        keywords ``DeGLALoss`` reads (open_clip_train passes the model's output dict to its loss)."""
        if not module.training or not isinstance(output, dict):  # evaluation: nothing to add
            return None
        with torch.no_grad():
            out = self.teacher.module(*args, **kwargs)
        return {**output, "teacher_image_features": out["image_features"],
                "teacher_text_features": out["text_features"]}

    def update_teacher(self, optimizer, args, kwargs) -> None:
        self.teacher.update(self.student)  # after every optimiser step (a step GradScaler skips is not one)

    def save_teacher(self, optimizer, state: dict) -> dict:
        state[TEACHER_KEY] = self.teacher.state_dict()
        return state


def check_open_clip_args(argv: list[str], num_negatives: int, options: DeglaOptions) -> None:
    """One ConfigError line for what the DeGLA loss cannot combine with, from open_clip_train's own
    parse of ``argv``, before anything is built: SigLIP, CoCa, ``--distill`` (open_clip's
    distillation from another model, ``--distill-model``/``--distill-pretrained``), horovod, and
    with negatives what carries none (webdataset, synthetic) or would reorder them."""
    if "-h" in argv or "--help" in argv:  # open_clip_train's main() prints its help and exits
        return
    for token in argv:  # before argparse, which calls "--distill" an ambiguous abbreviation
        name = token.split("=", 1)[0]
        if name == "--distill":
            raise ConfigError(REFUSED["distill"])
    from open_clip_train.params import parse_args

    args = parse_args(list(argv))
    if args.siglip:
        raise ConfigError(REFUSED["siglip"])
    if args.distill_model is not None or args.distill_pretrained is not None:
        raise ConfigError(REFUSED["distill"])
    if args.horovod:
        raise ConfigError(REFUSED["horovod"])
    if "coca" in str(args.model).lower():
        raise ConfigError(f"--model {args.model}: CoCa's captioning loss is not supported with the DeGLA loss")
    if num_negatives <= 0:
        return
    k = f"--num-negatives {num_negatives}"
    kind = args.dataset_type
    if kind == "auto" and args.train_data:
        kind = "webdataset" if args.train_data.split(".")[-1] == "tar" else "csv"
    if kind in ("webdataset", "synthetic"):
        raise ConfigError(f"--dataset-type {kind}: open_clip_train's {kind} batches carry no hard negatives; with "
                          f"{k} use a CSV (--dataset-type csv --csv-hard-captions-key COL), or `degla-fast train` "
                          "for WebDataset shards with negatives")
    if not args.train_data:
        raise ConfigError(f"{k}: needs --train-data, a CSV with a column of hard negatives")
    if not options.hard_captions_key:
        raise ConfigError(f"{k}: needs --csv-hard-captions-key COL, the CSV column of hard negatives "
                          f"(joined by {options.negatives_separator!r})")
    if args.accum_freq > 1:
        raise ConfigError(f"--accum-freq {args.accum_freq}: open_clip_train's accumulation concatenates cached "
                          f"features across batches, which breaks the [positives; negatives] layout; not with {k}")
    if args.torchcompile:
        raise ConfigError(f"--torchcompile: not supported with {k} (the EMA teacher's forward runs in a hook on the "
                          "student, untested under torch.compile)")


#: The one-line refusals (docs/open_clip.md lists them).
REFUSED = {
    "siglip": "--siglip: the DeGLA loss is softmax-based; SigLIP's sigmoid loss is not supported",
    "distill": "--distill: open_clip's distillation from another model (--distill-model, --distill-pretrained) is "
               "not supported with the DeGLA loss; DeGLA's own self-distillation toward the EMA teacher is "
               "--distill-weight",
    "horovod": "--horovod: the DeGLA loss gathers with torch.distributed only",
}


def run_open_clip_train(argv: list[str], *, options: DeglaOptions | None = None, **loss_kwargs):
    """open_clip_train's own ``main(argv)`` with :func:`use_degla_loss` applied (undone afterwards);
    its first log line says so. Returns what ``main`` returns.

    With ``num_negatives`` K > 0 (``options`` names the CSV column of hard negatives): the training
    CSV's batches carry each caption's K negatives, and where the loss needs it an EMA teacher
    follows the student after every optimiser step, feeds the loss and is saved in (and restored
    from) open_clip_train's checkpoints. What cannot combine is refused first
    (:func:`check_open_clip_args`)."""
    options = options or DeglaOptions()
    kwargs = loss_kwargs_checked(loss_kwargs, with_teacher=True)
    check_open_clip_args(argv, kwargs["num_negatives"], options)
    if options.ema_decay is not None:
        from ..ema import check_decay

        try:
            check_decay(options.ema_decay)
        except ConfigError as err:
            raise ConfigError(f"--ema-decay: {err}") from None
    run = _DeglaRun(kwargs, options) if kwargs["num_negatives"] > 0 else None
    _use_degla_loss(kwargs)
    try:
        trainer = _trainer()
        if run is not None:
            run.install()
        line = announcement(_state["kwargs"], options)
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
        if run is not None:
            run.close()
        restore()
