"""The training configuration: one dataclass tree, read from YAML and overridden by flags.

Every field carries a one-line doc (``metadata["doc"]``) that ``degla-fast train --help-config``
prints. :func:`load_config` is the only place a configuration is built and validated; the rest
of the trainer reads the resulting :class:`TrainConfig` and passes plain values further down.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from ..backends import EMA_BACKENDS
from ..data import PIPELINES
from ..errors import ConfigError
from ..fields import doc_field as _f
from ..fields import check_value, yaml_value
from ..io import read_config_mapping
from ..loss.spec import LossSpec
from ..precision import PRECISIONS

REPORTERS = ("none", "tensorboard", "wandb")
EMA_DTYPES = ("same", "fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")
TOWER_THREADS = ("none", "normal", "idle")


@dataclass
class DataConfig:
    """Where the training pairs come from and how they are batched."""

    path: str = _f("", "training data: a DeGLA .json, a .csv/.tsv, or WebDataset shards ('shards-{000..009}.tar')", flag='data')
    image_root: str | None = _f(None, "folder that relative image paths start from; null = the data file's folder", flag=True)
    batch_size: int = _f(32, "images per process per step (the global batch is this times the number of processes)",
                         minimum=1, flag=True)
    num_workers: int = _f(2, "data-loading worker processes per training process", minimum=0, flag=True)
    pipeline: str = _f("auto", "image pipeline: DALI on the GPU or torch", PIPELINES)
    skip_bad_images: bool = _f(False, "skip unreadable images (counted) instead of stopping with an error")
    sample_with_replacement: bool = _f(False, "pick negatives with replacement when a caption has fewer than K")
    trim_text: bool = _f(True, "trim each token batch to its longest caption (exact for CLIP's text tower)")
    image_cache_mib: int = _f(256, "with num_workers 0 (torch pipeline), keep decoded images in memory up to this "
                                   "many MiB of pixels instead of decoding each step (exact); 0 = off", minimum=0)


@dataclass
class ModelConfig:
    """The CLIP model being fine-tuned."""

    name: str = _f("ViT-B-32-quickgelu", "open_clip model name, e.g. 'ViT-B-32-quickgelu' or 'degla-tiny'", flag='model')
    pretrained: str | None = _f("openai", "open_clip pretrained tag, a state-dict file or a degla-fast checkpoint; "
                                          "null (or none) for random weights", flag=True)
    compile: bool = _f(False, "torch.compile the student's towers (GPU; first steps are slow while it compiles)", flag=True)
    grad_checkpointing: bool = _f(False, "activation checkpointing in both towers: less memory, one more forward", flag=True)


def _trainer_loss() -> LossSpec:
    """The ``loss:`` section's defaults: the loss's own spec (:class:`~degla_fast.loss.LossSpec`,
    whose field docs and checks the section uses) with one stated override."""
    # LossSpec defaults local_loss and gather_with_grad to False, as open_clip's ClipLoss does; the
    # trainer has always trained with both on (each process's samples are anchors against every
    # gathered feature, gathered with autograd: the exact global gradient at O(B * world) logits).
    return LossSpec(local_loss=True, gather_with_grad=True)


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule."""

    lr: float = _f(1e-6, "peak learning rate", minimum=0.0, flag=True)
    weight_decay: float = _f(0.1, "AdamW weight decay (never applied to gains, biases or logit_scale)", minimum=0.0)
    beta1: float = _f(0.9, "AdamW beta1", minimum=0.0)
    beta2: float = _f(0.98, "AdamW beta2", minimum=0.0)
    eps: float = _f(1e-6, "AdamW epsilon", minimum=0.0)
    warmup_steps: int = _f(50, "linear warm-up steps before the cosine decay", minimum=0)
    min_lr_ratio: float = _f(0.0, "learning rate at the end of the cosine, as a fraction of lr", minimum=0.0)
    max_grad_norm: float = _f(0.0, "clip the gradient norm to this value; 0 disables clipping", minimum=0.0)
    fused: bool = _f(True, "fused AdamW kernel where the device supports it")
    fused_ema: bool = _f(False, "one pass for AdamW and the EMA teacher update (AdamWEMA, backend ema.backend); "
                                "not with DeepSpeed or without a teacher", flag=True)


@dataclass
class EMAConfig:
    """The EMA teacher."""

    decay: float = _f(0.9996, "teacher = decay * teacher + (1 - decay) * student after every step", minimum=0.0)
    backend: str = _f("auto", "EMA update implementation", EMA_BACKENDS)
    dtype: str = _f("same", "teacher forward weights: 'same' = the forward's autocast dtype (a bf16 copy with "
                            "precision bf16, the fp32 EMA state with fp32); 'fp32' = the fp32 EMA state (autocast "
                            "casts it every step); 'bf16' = a bf16 copy. A copy is written by the EMA update itself "
                            "(the EMA state stays fp32: a bf16 state would not move at decay 0.9996); under ZeRO-3 "
                            "the forward runs under autocast instead", EMA_DTYPES)


@dataclass
class TrainConfig:
    """Everything a training run needs; YAML sections map to the nested dataclasses."""

    data: DataConfig = field(default_factory=DataConfig, metadata={"doc": "training data"})
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"doc": "the model"})
    loss: LossSpec = field(default_factory=_trainer_loss, metadata={"doc": "the loss"})
    optim: OptimConfig = field(default_factory=OptimConfig, metadata={"doc": "optimiser and schedule"})
    ema: EMAConfig = field(default_factory=EMAConfig, metadata={"doc": "the EMA teacher"})
    output: str = _f("runs/train", "output folder: metrics.jsonl, checkpoints/, tensorboard/", flag=True)
    epochs: int = _f(5, "passes over the data; the run length unless max_steps is set", minimum=1, flag=True)
    max_steps: int = _f(0, "run length in optimiser steps (overrides epochs; the schedule spans it); 0 = epochs",
                        minimum=0, flag=True)
    seed: int = _f(42, "seed of the model-independent randomness: data order, negatives, augmentation", flag=True)
    precision: str = _f("bf16", "bf16 = bf16 autocast over fp32 weights, bf16 features into the loss (which "
                                "accumulates in fp32) and a bf16 teacher forward copy; fp32; amp = fp16 autocast + "
                                "loss scaling on CUDA (bf16 autocast elsewhere)", PRECISIONS, flag=True)
    device: str = _f("auto", "cuda when available, else cpu", DEVICES, flag=True)
    threads: int | None = _f(None, "CPU threads per process (torch's intra-op threads); null = OMP_NUM_THREADS when "
                                   "set, else the cores this process may use divided by the processes on this node "
                                   "(LOCAL_WORLD_SIZE)", minimum=1, flag=True)
    tower_thread: str = _f("none", "CPU: a second thread for the image tower (the student's, then the teacher's "
                                   "forward), beside the text tower, forward and backward; every op computes as on "
                                   "one thread, so the numbers are the same bit for bit, sooner where a core is "
                                   "spare. normal = at this process's priority; idle = at the lowest (nice 19): it "
                                   "takes a core only when nothing else wants one (a run beside other runs); none = "
                                   "one thread. Not with deepspeed, several processes, a GPU or dropout",
                           TOWER_THREADS, flag=True)
    overwrite: bool = _f(False, "start a new run in an output folder that holds one: its files are moved to "
                                "OUTPUT/previous/<time>/ first (without it such a folder is refused unless resuming)",
                         flag=True)
    resume: str | None = _f(None, "'latest' (this output's newest checkpoint, or a fresh start) or a checkpoint path", flag=True)
    deepspeed: str | None = _f(None, "DeepSpeed JSON config (ZeRO stage, offload); null trains without DeepSpeed", flag=True)
    report_to: str = _f("none", "where metrics also go besides metrics.jsonl", REPORTERS, flag=True)
    progress: bool = _f(True, "progress bar on rank 0 (also off when stderr is not a terminal)")
    log_lines: bool | None = _f(None, "plain lines on stdout on rank 0 (a start line, one per log_every steps, one "
                                      "per checkpoint): null = when stdout is not a terminal (a job's log file)")
    log_every: int = _f(50, "write a metrics row every this many steps; also how often the host reads the device "
                            "(losses, skipped steps, stop signals): the only host sync between those steps",
                        minimum=1, flag=True)
    save_every: int = _f(500, "checkpoint every this many steps (and always at the end); 0 = only at the end",
                         minimum=0, flag=True)
    keep_last: int = _f(3, "checkpoints kept on disk (older ones are deleted)", minimum=1)
    max_nonfinite_steps: int = _f(5, "consecutive non-finite losses tolerated before saving and stopping",
                                  minimum=1)
    profile_phases: bool = _f(False, "synchronise the device between phases so that the data/forward/backward/EMA "
                                     "times cover the device's work (a host sync at each phase: for profiling only)", flag=True)


# ---------------------------------------------------------------- building and validating


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_section(tp) -> bool:
    return dataclasses.is_dataclass(tp)


def _keys(obj) -> list[dataclasses.Field]:
    """The fields of a section (a class or an instance) that are configuration keys: all but those
    declared ``in_config=False`` (a loss setting the trainer fixes itself, such as ``check_finite``)."""
    return [f for f in dataclasses.fields(obj) if f.metadata.get("in_config", True)]


def _base_type(tp):
    """(python type, allows None) of a field annotation such as ``str | None``."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _coerce(name: str, value: Any, tp, meta: dict) -> Any:
    """``value`` as the field's type, or a ConfigError naming the field and what it accepts: the
    strings of flags and YAML read as their type, then :func:`~degla_fast.fields.check_value`."""
    base, optional = _base_type(tp)
    if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~") and optional):
        if optional:
            return None
        raise ConfigError(f"{name}: must be a {base.__name__}, got null")
    if isinstance(value, str) and base is bool and value.lower() in ("true", "yes", "1", "on", "false", "no", "0",
                                                                     "off"):
        value = value.lower() in ("true", "yes", "1", "on")
    elif isinstance(value, str) and base in (int, float):
        try:
            value = base(value) if base is float else int(value)
        except ValueError:
            pass  # left a string: check_value names what the field accepts
    elif base is int and isinstance(value, float) and value.is_integer():
        value = int(value)  # YAML's ``4.0``
    elif base is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)  # YAML reads ``name: 123`` as a number
    return check_value(name, value, base, meta)


def _fill(obj, values: dict, prefix: str = ""):
    """``obj`` with its fields set from a nested dict, checking every key and value. A frozen
    section (the loss's :class:`LossSpec`) is replaced by a new one, which checks itself once."""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: must be a mapping, got {values!r}")
    hints = _hints(type(obj))
    fields = {f.name: f for f in _keys(obj)}
    changes = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(f"{name}: unknown configuration key (allowed here: {', '.join(fields)})")
        if _is_section(hints[key]):
            changes[key] = _fill(getattr(obj, key), value if value is not None else {}, f"{name}.")
        else:
            changes[key] = _coerce(name, value, hints[key], fields[key].metadata)
    if type(obj).__dataclass_params__.frozen:
        try:
            return dataclasses.replace(obj, **changes)
        except ConfigError as err:  # a rule across fields; each field's own bounds were checked above
            raise ConfigError(f"{prefix}{err}") from None
    for key, value in changes.items():
        setattr(obj, key, value)
    return obj


def set_field(config: TrainConfig, dotted: str, value: Any) -> None:
    """Set ``config``'s field named ``dotted`` (``"loss.igc_weight"``) from a string or value."""
    head, *rest = dotted.split(".")
    nested: Any = value
    for part in reversed(rest):
        nested = {part: nested}
    _fill(config, {head: nested})


def load_config(path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """A validated :class:`TrainConfig`: defaults, then the YAML file ``path``, then ``overrides``.

    ``overrides`` maps dotted field names (``"data.batch_size"``) to values; ``None`` values are
    skipped (a flag that was not given). Raises :class:`ConfigError` naming the field for unknown
    keys and bad values, and for a missing or unreadable YAML file.
    """
    config = TrainConfig()
    if path is not None:
        values = read_config_mapping(path, "--config")
        try:
            _fill(config, values)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None
    for dotted, value in (overrides or {}).items():
        if value is not None:
            set_field(config, dotted, value)
    _check(config)
    return config


def _check(config: TrainConfig) -> None:
    """Cross-field rules that no single field can express."""
    if not config.data.path:
        raise ConfigError("data.path: required (a training .json/.csv/.tsv file or WebDataset shards; flag --data)")
    if config.ema.decay > 1.0:
        raise ConfigError(f"ema.decay: must be in [0, 1], got {config.ema.decay}")
    if not 0 <= config.optim.beta1 < 1 or not 0 <= config.optim.beta2 < 1:
        raise ConfigError(f"optim.beta1/beta2: must be in [0, 1), got {config.optim.beta1}, {config.optim.beta2}")
    if config.optim.min_lr_ratio > 1:
        raise ConfigError(f"optim.min_lr_ratio: must be in [0, 1], got {config.optim.min_lr_ratio}")
    if config.tower_thread != "none" and config.deepspeed is not None:
        raise ConfigError("tower_thread: not available with deepspeed (its engine runs the forward and backward); "
                          "use --tower-thread none or drop --deepspeed")
    if config.optim.fused_ema:
        if config.deepspeed is not None:
            raise ConfigError("optim.fused_ema: not available with deepspeed (ZeRO steps its own flat partitions, "
                              "which AdamWEMA cannot map to the teacher); drop --fused-ema or --deepspeed")
        if not config.loss.needs_teacher:
            raise ConfigError("optim.fused_ema: this run has no EMA teacher to move (loss.num_negatives is 0, or "
                              "loss.tgc_weight and loss.distill_weight are both 0); drop --fused-ema")


# ---------------------------------------------------------------- command-line flags


def _flag_fields(cls=TrainConfig, prefix: str = ""):
    """(flag name, dotted field, type, metadata) of every field declared with ``flag``."""
    hints = _hints(cls)
    for f in _keys(cls):
        if _is_section(hints[f.name]):
            yield from _flag_fields(hints[f.name], f"{prefix}{f.name}.")
        elif f.metadata.get("flag"):
            flag = f.metadata["flag"]
            yield (f.name if flag is True else flag).replace("_", "-"), f"{prefix}{f.name}", hints[f.name], f.metadata


def _default_words(value: Any) -> str:
    """A field's default as its flag's help says it: YAML (:func:`~degla_fast.fields.yaml_value`);
    an empty string is no default at all (a required field, such as ``data.path``)."""
    return "required" if value == "" else f"default: {yaml_value(value)}"


def add_flags(parser) -> None:
    """One ``argparse`` flag per field declared with ``flag`` (its doc is the help, with the field's
    name and default; a bool field is a switch that sets it true). :func:`flag_overrides` reads
    them back."""
    defaults = field_docs()
    sections = {f.name: f.metadata["doc"] for f in _keys(TrainConfig) if _is_section(_hints(TrainConfig)[f.name])}
    groups: dict = {}  # the flags grouped by YAML section, as --help-config groups the fields
    for flag, dotted, tp, meta in _flag_fields():
        base, _ = _base_type(tp)
        section = dotted.rpartition(".")[0]
        if section not in groups:
            groups[section] = parser.add_argument_group(f"{section} ({sections[section]})" if section else
                                                        "the run (top-level fields)")
        choices = f" [{', '.join(meta['choices'])}]" if meta.get("choices") else ""
        help_text = f"{meta['doc']}{choices} ({dotted}; {_default_words(defaults[dotted][0])})".replace("%", "%%")
        if base is bool:
            groups[section].add_argument(f"--{flag}", dest=dotted, action="store_const", const=True, help=help_text)
        else:  # values are checked by load_config, which names the field
            groups[section].add_argument(f"--{flag}", dest=dotted, metavar=dotted.rsplit(".", 1)[-1].upper(),
                                         help=help_text)


def flag_overrides(args) -> dict[str, Any]:
    """dotted field -> value of every flag :func:`add_flags` declared (None: not given)."""
    return {dotted: getattr(args, dotted, None) for _, dotted, _, _ in _flag_fields()}


def to_dict(config: TrainConfig) -> dict:
    """The configuration as a plain nested dict (what checkpoints and ``config.yaml`` hold): its
    keys, sections as nested dicts."""
    return {f.name: to_dict(value) if _is_section(value := getattr(config, f.name))
            else copy.deepcopy(value)
            for f in _keys(config)}


def field_docs(defaults=None, prefix: str = "") -> dict[str, tuple[Any, str, tuple | None]]:
    """dotted name -> ``(default, doc, allowed values or None)`` of every key, in the file's order;
    the defaults are those of ``defaults`` (a section instance; a fresh :class:`TrainConfig` when None)."""
    defaults = TrainConfig() if defaults is None else defaults
    docs = {}
    for f in _keys(defaults):
        default = getattr(defaults, f.name)
        if _is_section(default):
            docs.update(field_docs(default, f"{prefix}{f.name}."))
        else:
            docs[f"{prefix}{f.name}"] = (default, f.metadata["doc"], f.metadata.get("choices"))
    return docs


def describe(width: int | None = None) -> list[str]:
    """``--help-config``: every key grouped by YAML section (the top-level keys first), one entry
    ``name (default: VALUE): doc [allowed values]`` with VALUE as YAML writes it, wrapped to
    ``width`` columns (None: the terminal's, 80 when there is none)."""
    import shutil
    import textwrap

    width = width or shutil.get_terminal_size((80, 24)).columns
    sections = {f.name: f.metadata["doc"] for f in _keys(TrainConfig) if _is_section(_hints(TrainConfig)[f.name])}
    groups: dict[str, list[str]] = {"": []}
    for dotted, (default, doc, choices) in field_docs().items():
        section, _, name = dotted.rpartition(".")
        allowed = f" [{', '.join(choices)}]" if choices else ""
        groups.setdefault(section, []).append(f"{name} ({_default_words(default)}): {doc}{allowed}")
    lines = textwrap.wrap("Configuration fields, by YAML section; set them in the --config file, with a flag "
                          "(--help) or with --set SECTION.FIELD=VALUE.", width=max(40, width - 1))
    for section, entries in groups.items():
        lines += ["", f"{section}: ({sections[section]})" if section else "top level:"]
        for entry in entries:
            lines += textwrap.wrap(entry, width=max(40, width - 1), initial_indent="  ", subsequent_indent="      ",
                                   break_on_hyphens=False)
    return lines
