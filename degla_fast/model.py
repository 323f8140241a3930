"""open_clip models for DeGLA: creation, checkpoint loading and feature extraction.

Importing this module registers :data:`TINY_MODEL` (``"degla-tiny"``, a 64x64-pixel CLIP small
enough to train on a CPU in minutes) with open_clip, so it can be named anywhere an open_clip
model name is accepted.

Text is encoded *trimmed*: a token batch ``[N, L]`` with ``L`` shorter than the model's context
length (77 for CLIP) runs the text transformer on ``L`` positions only. This is exact for CLIP's
causal text tower with end-of-text pooling: a position never attends to later ones, so padding
after the end-of-text token cannot change the pooled feature. open_clip's own ``encode_text``
adds the full-length positional embedding and so refuses such inputs; the models returned here
use :func:`encode_text`'s path from their ``forward`` too, which keeps DeepSpeed (ZeRO-3
gathers a module's parameters around its ``forward``) and ``model(images, tokens)`` working.
"""
from __future__ import annotations

import contextlib
import logging
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import open_clip
import torch
import torch.nn.functional as F
from open_clip import CLIP

from .checkpoint import check_format, read_checkpoint, resolve_checkpoint
from .compat.open_clip import encode_text_prefix, parse_model_name, trims_exactly
from .data.text import trim_tokens
from .errors import ConfigError, DataError, ShapeError, first_line
from .precision import check_precision
from .vocab import clip_vocabulary_overrides, compact_tokenizer, shrink_token_embedding

TINY_MODEL = "degla-tiny"

_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"

open_clip.add_model_config(_CONFIG_DIR)  # degla-tiny, degla-synth: every CLI command knows them


class TrimmedTextCLIP(CLIP):
    """open_clip's ``CLIP`` whose ``encode_text`` accepts token batches shorter than the context.

    Same parameters, buffers and state-dict keys as ``CLIP``; models from :func:`create_model`
    get this class so that ``model(images, tokens)`` (and a DeepSpeed engine around it) takes
    trimmed batches.
    """

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """tokens ``[N, L]`` with ``L <= context_length`` -> features ``[N, D]``."""
        return _encode_text_trimmed(self, text, normalize=normalize)


@dataclass
class ModelBundle:
    """A model and everything needed to feed it.

    ``tokenizer``: ``list[str] -> LongTensor[N, context_length]`` (zero-padded);
    ``preprocess_train`` / ``preprocess_val``: ``PIL.Image -> FloatTensor[3, image_size, image_size]``
    (normalised with ``mean`` / ``std``); ``pretrained``: where the weights came from (an open_clip
    tag, a state-dict file or a degla-fast checkpoint file), ``None`` for a random initialisation;
    ``precision``: what its forwards run under (``degla_fast.precision.autocast(bundle.precision,
    device)``); the weights are fp32 in every precision.
    """

    model: torch.nn.Module
    name: str
    pretrained: str | None
    tokenizer: Callable
    preprocess_train: Callable
    preprocess_val: Callable
    image_size: int
    mean: tuple
    std: tuple
    context_length: int
    precision: str = "fp32"


def create_model(name: str, pretrained: str | None = None, *, device: str | torch.device = "cpu",
                 precision: str = "fp32") -> ModelBundle:
    """Build an open_clip model with its tokenizer and image transforms.

    ``name``: an open_clip model name (``"ViT-B-32"``, :data:`TINY_MODEL`, ``"hf-hub:..."``);
    ``pretrained``: an open_clip tag (``"openai"``), a local state-dict file, or ``None`` for random
    weights; ``precision``: one of ``degla_fast.precision.PRECISIONS``, recorded on the bundle
    (the autocast its forwards run under; the weights are fp32 in every precision). Raises
    :class:`ConfigError` for unknown names, tags or precisions and :class:`DataError` when the
    weights cannot be read.
    """
    check_precision(precision)
    schema, _ = parse_model_name(name)
    if schema is None and open_clip.get_model_config(name.replace("/", "-")) is None:
        raise ConfigError(f"model: unknown open_clip model {name!r} (e.g. {TINY_MODEL!r}, 'ViT-B-32'; "
                          "see open_clip.list_models())")
    if pretrained is not None and schema is None and not os.path.isfile(pretrained):
        tags = open_clip.list_pretrained_tags_by_model(name.replace("/", "-"))
        if pretrained not in tags:
            raise ConfigError(f"pretrained: {pretrained!r} is neither a file nor an open_clip tag of {name!r} "
                              f"(tags: {', '.join(tags) or 'none'})")
    # A compact-vocabulary model (degla_fast/vocab.py) is built with CLIP's vocabulary, shrunk, and
    # only then given its weights, which have the compact rows.
    compact = compact_tokenizer(name)
    overrides = clip_vocabulary_overrides(name) if compact else {}
    try:
        with _open_clip_logs(random_init=pretrained is None):
            model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
                name, pretrained=None if compact else pretrained, precision="fp32", device=device, **overrides)
            if compact:
                shrink_token_embedding(model, compact)
                if pretrained is not None:
                    open_clip.load_checkpoint(model, pretrained)
    except (RuntimeError, OSError, pickle.UnpicklingError, *_safetensors_error()) as err:
        raise DataError(f"pretrained: cannot load weights {pretrained!r} for {name!r}: {first_line(err)}") from err
    return _bundle(model, name, pretrained, preprocess_train, preprocess_val, precision,
                   compact or open_clip.get_tokenizer(name))


def _safetensors_error() -> tuple[type[BaseException], ...]:
    """``SafetensorError``, what a corrupt .safetensors file raises ("header too large"; not an
    OSError), where safetensors is installed. Imported here, not at the top: only loading
    pretrained weights needs it, and a model with random weights (bench_step on a bare GPU image,
    which has no safetensors) must build without it."""
    try:
        from safetensors import SafetensorError
    except ImportError:
        return ()
    return (SafetensorError,)


@contextlib.contextmanager
def _open_clip_logs(random_init: bool):
    """open_clip's log lines around one model creation. Its "No pretrained weights loaded"
    warning is dropped when random weights were asked for (or a checkpoint's weights are loaded
    right after): it would only mislead. Its error lines are held back: open_clip logs
    "Failed to download weights ..." and then raises the same text, which our one-line error
    carries, so they are dropped when the creation fails and let through when it succeeds."""
    held: list[logging.LogRecord] = []

    def keep(record: logging.LogRecord) -> bool:
        if random_init and record.getMessage().startswith("No pretrained weights loaded"):
            return False
        if record.levelno >= logging.ERROR:
            held.append(record)
            return False
        return True

    loggers = [logging.getLogger(), logging.getLogger("open_clip")]  # open_clip logs through the root logger
    for logger in loggers:
        logger.addFilter(keep)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(keep)
    for record in held:  # reached only when the creation succeeded
        logging.getLogger(record.name).handle(record)


def _bundle(model, name, pretrained, preprocess_train, preprocess_val, precision, tokenizer) -> ModelBundle:
    if type(model) is CLIP:
        # Same state, one overridden method: see TrimmedTextCLIP.
        model.__class__ = TrimmedTextCLIP
    cfg = open_clip.get_model_preprocess_cfg(model)
    size = cfg["size"]
    image_size = int(size if isinstance(size, int) else size[0])
    return ModelBundle(
        model=model, name=name, pretrained=pretrained, tokenizer=tokenizer,
        preprocess_train=preprocess_train, preprocess_val=preprocess_val, image_size=image_size,
        mean=tuple(cfg["mean"]), std=tuple(cfg["std"]), context_length=context_length(model),
        precision=precision)


def load_model(model: str | None, pretrained: str | os.PathLike | None = None, *,
               device: str | torch.device = "cpu", precision: str = "fp32") -> ModelBundle:
    """Like :func:`create_model`, and ``pretrained`` may also be a degla-fast training checkpoint.

    A checkpoint (file, ``checkpoints/`` folder, training output folder or ``latest`` file, see
    :func:`resolve_checkpoint`) loads its ``student`` weights; ``model`` may then be ``None`` to use
    the checkpoint's ``model_name`` (a different name is a :class:`ConfigError`). Anything else goes
    to :func:`create_model`.
    """
    check_precision(precision)
    # open_clip tags are bare words; anything else names a file or folder.
    if pretrained is not None and (Path(pretrained).exists() or Path(pretrained).suffix or os.sep in str(pretrained)):
        path = resolve_checkpoint(pretrained)
        state = None if path.suffix == ".safetensors" else read_checkpoint(path)
        if check_format(path, state):
            return _from_checkpoint(model, path, state, device, precision)
        if state is not None and not isinstance(state, dict):
            raise DataError(f"{path}: holds a {type(state).__name__}, not a state dict or a degla-fast checkpoint")
        if model is None:
            raise ConfigError(f"model: needed to load the plain state dict {path}")
        return create_model(model, str(path), device=device, precision=precision)
    if model is None:
        raise ConfigError("model: needed unless pretrained names a degla-fast checkpoint")
    return create_model(model, None if pretrained is None else str(pretrained), device=device, precision=precision)


def _from_checkpoint(model: str | None, path: Path, state: dict, device, precision) -> ModelBundle:
    for key in ("model_name", "student"):
        if key not in state:
            raise DataError(f"{path}: checkpoint lacks the {key!r} field")
    if model is not None and model != state["model_name"]:
        raise ConfigError(f"model: {model!r} given but {path} holds a {state['model_name']!r} model")
    bundle = create_model(state["model_name"], None, device="cpu", precision="fp32")
    load_student(bundle.model, state["student"], path, state["model_name"])
    bundle.model.to(device)
    bundle.pretrained, bundle.precision = str(path), precision
    return bundle


def load_student(model: torch.nn.Module, weights: dict, where: str | os.PathLike, name: str) -> None:
    """Load a checkpoint's ``student`` state dict (keys with or without DDP's ``module.``) into
    ``model``, the open_clip model ``name``. Weights that do not fit (missing or extra keys, other
    shapes) are one :class:`DataError` naming ``where`` and the first misfit."""
    weights = {k.removeprefix("module."): v for k, v in weights.items()}
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as err:  # other shapes: load_state_dict raises even when not strict
        shapes = [line.strip() for line in str(err).splitlines() if "size mismatch" in line]
        raise DataError(f"{where}: student weights do not fit {name!r} ({len(shapes)} tensors of other shapes; "
                        f"{shapes[0] if shapes else first_line(err)})") from None
    if missing or unexpected:
        raise DataError(f"{where}: student weights do not fit {name!r} "
                        f"(missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]})")


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    # DeepSpeed engines and DistributedDataParallel keep the model as ``.module``.
    while not isinstance(model, (CLIP, open_clip.CustomTextCLIP)) and hasattr(model, "module"):
        model = model.module
    return model


def context_length(model: torch.nn.Module) -> int:
    """The longest token sequence ``model``'s text tower accepts."""
    net = _unwrap(model)
    if isinstance(net, CLIP):
        return int(net.positional_embedding.shape[0])
    return int(getattr(getattr(net, "text", net), "context_length"))


def pad_tokens(tokens: torch.Tensor, length: int, pad_id: int = 0) -> torch.Tensor:
    """``[N, L]`` -> ``[N, length]`` padded on the right with ``pad_id`` (``L <= length``)."""
    if tokens.shape[1] > length:
        raise ShapeError(f"tokens: {tokens.shape[1]} positions, the model's context length is {length}")
    return F.pad(tokens, (0, length - tokens.shape[1]), value=pad_id)


def _encode_text_trimmed(net: CLIP, tokens: torch.Tensor, normalize: bool) -> torch.Tensor:
    if tokens.dim() != 2:
        raise ShapeError(f"tokens: expected [N, L], got {tuple(tokens.shape)}")
    full = int(net.positional_embedding.shape[0])
    if tokens.shape[1] > full:
        raise ShapeError(f"tokens: {tokens.shape[1]} positions, the model's context length is {full}")
    if tokens.device.type == "cpu":
        # Free on the host; on an accelerator it would cost a device sync, and the data
        # pipeline already trims each batch to its longest caption.
        tokens = trim_tokens(tokens)
    if not trims_exactly(net):
        # Non-causal towers or last-position pooling see the padding: run them at full length.
        return CLIP.encode_text(net, pad_tokens(tokens, full), normalize=normalize)
    x = encode_text_prefix(net, tokens)
    return F.normalize(x, dim=-1) if normalize else x


def encode_image(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """images ``[B, 3, H, W]`` (normalised) -> L2-normalised features ``[B, D]``."""
    return _unwrap(model).encode_image(images, normalize=True)


def encode_text(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """tokens ``[N, L]``, ``L <= context_length`` -> L2-normalised features ``[N, D]``.

    CLIP models with the built-in text tower run on ``L`` positions (the same features as
    padding to the context length, to float rounding); other model types are padded.
    Under DeepSpeed ZeRO-3 use :func:`clip_features`, which goes through the engine's forward.
    """
    net = _unwrap(model)
    if isinstance(net, CLIP):
        return _encode_text_trimmed(net, tokens, normalize=True)
    return net.encode_text(pad_tokens(tokens, context_length(net)), normalize=True)


_DROPOUTS = (torch.nn.Dropout, torch.nn.Dropout1d, torch.nn.Dropout2d, torch.nn.Dropout3d, torch.nn.AlphaDropout,
             torch.nn.FeatureAlphaDropout)


def random_modules(model: torch.nn.Module) -> list[str]:
    """Names of ``model``'s modules that draw random numbers in a training forward: dropout with
    p > 0 (attention dropout included) and open_clip's patch dropout."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, _DROPOUTS):
            rate = module.p
        elif isinstance(module, torch.nn.MultiheadAttention):
            rate = module.dropout
        else:
            rate = getattr(module, "prob", 0.0) if type(module).__name__ == "PatchDropout" else 0.0
        if rate:
            found.append(name or type(module).__name__)
    return found


def text_side(model: torch.nn.Module, tokens: torch.Tensor):
    """The text half of :func:`clip_features` on an unwrapped model: ``(text_features [N, D],
    logit_scale_exp)`` by the ops ``model(images, tokens)`` runs for them; with
    :func:`encode_image`, the two towers one at a time (``train.tower_thread``)."""
    net = _unwrap(model)
    if not isinstance(net, TrimmedTextCLIP):
        tokens = pad_tokens(tokens, context_length(net))
    return net.encode_text(tokens, normalize=True), net.logit_scale.exp()


def clip_features(model: torch.nn.Module, images: torch.Tensor, tokens: torch.Tensor):
    """One forward of both towers through ``model`` (an open_clip model or a wrapper of one).

    images ``[B, 3, H, W]``, tokens ``[N, L]`` -> ``(image_features [B, D], text_features [N, D],
    logit_scale_exp)``, features L2-normalised, ``logit_scale_exp`` a scalar tensor (exp applied).
    """
    net = _unwrap(model)
    if not isinstance(net, TrimmedTextCLIP):
        tokens = pad_tokens(tokens, context_length(net))
    out = model(images, tokens)
    if isinstance(out, dict):
        return out["image_features"], out["text_features"], out["logit_scale"]
    return out[0], out[1], out[2]
