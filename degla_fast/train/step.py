"""One DeGLA training step, and the pieces it needs (loss choice, autocast, timing).

``train_step`` reads as the step's outline in one function (35 lines): student forward
on images and ``[positives; negatives]``, teacher forward without grad, the loss, backward,
optimiser and schedule, ``logit_scale`` clamp, EMA update (or, with ``optim.fused_ema``, an
optimiser whose step moves the teacher); the forwards, the backward and the optimiser step
(loss scaler, clipping, the device-side skip; the image tower on a thread of its own with
``tower_thread``) are helpers below it. The trainer and
``benchmarks/bench_step.py`` both call it, so what is benchmarked is what trains.
"""
from __future__ import annotations

from concurrent.futures import wait
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..compat.torch_amp import found_inf_flags
from ..compat.torch_optim import found_inf_set
from ..ema import Teacher
from ..loss import LossOutput
from ..model import clip_features, encode_image, text_side
from ..profiling import PhaseClock
from .optim import MAX_LOGIT_SCALE, skips_on_device


@dataclass
class StepParts:
    """What one step touches, and the run's one owner of these parts (the trainer's ``Run``
    holds this object, not copies of its fields). ``model`` is the student (or the DeepSpeed engine around it);
    ``engine`` is that engine or None; ``teacher`` an ``EMATeacher`` or None (plain CLIP);
    ``scaler`` a ``torch.amp.GradScaler`` for fp16 or None; ``clamp_logit_scale`` a callable
    that keeps the student's ``logit_scale <= ln 100`` (see :func:`clamp_logit_scale_`);
    ``autocast_dtype`` / ``teacher_autocast_dtype``: the forwards' autocast (None: off);
    ``scheduler`` is stepped once per call, skipped steps included (the trainer's
    :class:`~.step_account.StepAccount` takes those back when it reads the skip counters);
    ``all_finite(loss) -> 0-d bool tensor`` on the device, the same on every rank (an
    all-reduce, never a host read); ``optimizer_moves_teacher``: the optimiser is an
    ``AdamWEMA`` of ``teacher`` (its step is the EMA update); ``sync``: called at each phase
    lap (e.g. ``torch.cuda.synchronize`` with ``profile_phases``; None: laps are host times);
    ``tower_pool``: the image tower's thread (``tower_thread``: a plain CPU model, no engine,
    scaler or DDP), None to run both towers on this thread."""

    model: torch.nn.Module
    loss_fn: Callable[..., LossOutput]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    clamp_logit_scale: Callable[[], None]
    teacher: Teacher | None = None
    engine: Any = None
    scaler: Any = None
    autocast_dtype: torch.dtype | None = None
    teacher_autocast_dtype: torch.dtype | None = None
    max_grad_norm: float = 0.0
    sync: Callable[[], None] | None = None
    all_finite: Callable[[torch.Tensor], torch.Tensor] = field(default=lambda t: torch.isfinite(t))
    optimizer_moves_teacher: bool = False
    tower_pool: Any = None  # config.tower_thread: the image tower's thread (a 1-thread executor), else None

    @property
    def fused_ema(self) -> bool:
        """The optimiser's step is the EMA update (an ``AdamWEMA`` of ``teacher``)."""
        return self.teacher is not None and self.optimizer_moves_teacher

    @property
    def skip_on_device(self) -> bool:
        """A non-finite step is skipped on the device (the fused AdamW's ``found_inf``); otherwise
        the step reads the finiteness flag on the host."""
        return not self.fused_ema and skips_on_device(self.optimizer)


@dataclass
class StepResult:
    """A step's detached losses (``LossOutput`` of 0-d tensors), ``applied`` (a 0-d bool tensor
    on the device: False when the loss was non-finite and the step was skipped, or the loss
    scaler skipped it; reading it is a host sync, which the trainer does only every
    ``log_every`` steps), the ``logit_scale`` used (exp applied) and phase times in seconds."""

    losses: LossOutput
    applied: torch.Tensor
    logit_scale: torch.Tensor
    times: dict[str, float]


def train_step(parts: StepParts, images: torch.Tensor, tokens: torch.Tensor) -> StepResult:
    """One optimiser step on ``images [B,3,H,W]`` and ``tokens [B*(1+K), L]`` (already on the device).

    No host sync: a non-finite loss is found on the device and the step skipped there (the
    fused AdamW's ``found_inf``, as GradScaler passes it; the EMA's ``apply``), on every rank
    alike. Optimisers without a device-side skip (``optim.fused: false``, AdamWEMA) read the
    flag on the host instead, once per step.
    """
    clock = PhaseClock(parts.sync)
    image, text, scale, t_image, t_text = _forwards(parts, clock, images, tokens)
    # The features reach the loss in the forward's dtype (bf16 under bf16 autocast; the normalisation
    # may have left them fp32): the kernels read 16-bit features and accumulate in fp32.
    dtype = parts.autocast_dtype or torch.float32
    with clock.phase("loss"):
        out = parts.loss_fn(image.to(dtype), text.to(dtype), scale.float(), _to(t_image, dtype), _to(t_text, dtype))
    finite = parts.all_finite(out.total.detach())
    on_device = parts.skip_on_device
    if not on_device and not bool(finite):  # host read: this optimiser cannot skip on the device
        # Every rank skips together (all_finite agrees across ranks): no collective is left hanging.
        # The schedule steps as on the device path: the trainer takes skipped steps back at its read.
        parts.optimizer.zero_grad(set_to_none=True)
        parts.scheduler.step()
        return StepResult(_detach(out), finite, scale.detach(), clock.times)
    found_inf = (~finite).float()  # 1.0: skip this step (optimiser, schedule correction, EMA)
    with clock.phase("backward"):
        _backward(parts, out.total, (image, text, scale))
    with clock.phase("optimizer", key="optim"):
        found_inf, teacher_moved = _optimizer_step(parts, found_inf, on_device)
        parts.scheduler.step()  # a skipped step is taken back when the host next reads the counters
        parts.clamp_logit_scale()  # (AdamWEMA clamped already, before it moved the teacher: a no-op then)
    with clock.phase("ema"):
        if parts.teacher is not None and not teacher_moved:  # (fused: the scaler skipped the step;
            # the EMA still follows, as unfused)
            parts.teacher.update(_student_module(parts), apply=1.0 - found_inf if on_device else None)
    return StepResult(_detach(out), found_inf == 0, scale.detach(), clock.times)


def _forwards(parts: StepParts, clock: PhaseClock, images: torch.Tensor, tokens: torch.Tensor):
    """``(image, text, logit_scale_exp, teacher_image, teacher_text)``: the student's forward (phase
    "forward") and the teacher's without grad ("teacher_forward"; None, None without a teacher).
    With ``tower_pool`` all of it is one "forward" phase ("teacher_forward" 0): the image tower's
    thread runs the student's image forward, then the teacher's, while this thread runs the text side."""
    device_type = images.device.type
    student_amp = dict(device_type=device_type, dtype=parts.autocast_dtype, enabled=parts.autocast_dtype is not None)
    teacher_amp = dict(device_type=device_type, dtype=parts.teacher_autocast_dtype,
                       enabled=parts.teacher_autocast_dtype is not None)
    if parts.tower_pool is not None:
        with clock.phase("forward"):
            image_side = parts.tower_pool.submit(_image_side, parts, images, student_amp, teacher_amp,
                                                 torch.is_grad_enabled())
            with torch.autocast(**student_amp):
                text, scale = text_side(parts.model, tokens)
            t_text = None
            if parts.teacher is not None:
                with torch.no_grad(), torch.autocast(**teacher_amp):
                    t_text, _ = text_side(parts.teacher.module, tokens)
            image, t_image = image_side.result()
        clock.times["teacher_forward"] = 0.0  # (inside "forward": every phase keeps its key)
        return image, text, scale, t_image, t_text
    with clock.phase("forward"), torch.autocast(**student_amp):
        image, text, scale = clip_features(parts.model, images, tokens)
    t_image = t_text = None
    with clock.phase("teacher_forward"):
        if parts.teacher is not None:
            with torch.no_grad(), torch.autocast(**teacher_amp):
                t_image, t_text, _ = clip_features(parts.teacher.module, images, tokens)
    return image, text, scale, t_image, t_text


def _image_side(parts: StepParts, images: torch.Tensor, student_amp: dict, teacher_amp: dict, grad: bool):
    """The image tower's thread: ``(image features, the teacher's or None)``. Grad mode and
    autocast are per thread: the caller's are set again here."""
    with torch.set_grad_enabled(grad), torch.autocast(**student_amp):
        image = encode_image(parts.model, images)
    t_image = None
    if parts.teacher is not None:
        with torch.no_grad(), torch.autocast(**teacher_amp):
            t_image = encode_image(parts.teacher.module, images)
    return image, t_image


def _backward(parts: StepParts, loss: torch.Tensor, roots: tuple) -> None:
    """``loss.backward()`` (through the engine or the loss scaler where there is one); with
    ``tower_pool`` (neither), :func:`_backward_in_threads` from ``roots`` = (image, text, scale)."""
    if parts.engine is not None:
        parts.engine.backward(loss)
    elif parts.tower_pool is not None:
        _backward_in_threads(parts.tower_pool, loss, *roots)
    else:
        (parts.scaler.scale(loss) if parts.scaler is not None else loss).backward()


def _backward_in_threads(pool, loss: torch.Tensor, image: torch.Tensor, text: torch.Tensor,
                         scale: torch.Tensor) -> None:
    """``loss.backward()`` in disjoint parts: the loss's own graph down to the features and the
    scale, then the image tower on ``pool``'s thread while this one runs the text tower and the
    scale. The towers share no node and each one's nodes run in the one-pass order (autograd
    orders ready nodes by creation), so every gradient is the same bit for bit (tested)."""
    grads = torch.autograd.grad(loss, (image, text, scale), allow_unused=True)
    image_done = pool.submit(torch.autograd.backward, image, grads[0]) if grads[0] is not None else None
    rest = [(root, grad) for root, grad in zip((text, scale), grads[1:]) if grad is not None]
    try:
        if rest:
            torch.autograd.backward([root for root, _ in rest], [grad for _, grad in rest])
    except BaseException:
        if image_done is not None:  # the thread finishes its pass before this error goes up
            wait([image_done])
        raise
    if image_done is not None:
        image_done.result()  # (its error, if any, goes up from here)


def _optimizer_step(parts: StepParts, found_inf: torch.Tensor, on_device: bool) -> tuple[torch.Tensor, bool]:
    """Step the optimiser (skipping on ``found_inf`` where it can) and clear the gradients.
    Returns the step's skip flag (the scaler's inf/NaN gradients included) and whether the
    optimiser moved the teacher (AdamWEMA). ``on_device``: ``parts.skip_on_device``, asked once per step."""
    if parts.engine is not None:
        # The engine's step goes through this optimiser's step for its partitions: it skips too.
        with found_inf_set(parts.optimizer, found_inf):
            parts.engine.step()
        return found_inf, False
    fused, teacher_moved = parts.fused_ema, False
    if parts.scaler is not None:
        parts.scaler.unscale_(parts.optimizer)  # records its own found_inf (inf/NaN gradients)
    if parts.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(parts.model.parameters(), parts.max_grad_norm)
    if parts.scaler is not None:
        if on_device:  # the loss's flag joins the gradients' in the scaler's found_inf
            found_inf = _join_scaler_found_inf(parts.scaler, parts.optimizer, found_inf)
        loss_scale = parts.scaler.get_scale() if fused else 0.0
        parts.scaler.step(parts.optimizer)
        parts.scaler.update()
        # The scaler skips the optimiser step on inf/NaN gradients, then lowers its scale.
        teacher_moved = fused and parts.scaler.get_scale() >= loss_scale
    elif on_device:  # the fused AdamW skips on found_inf, on the device
        with found_inf_set(parts.optimizer, found_inf):
            parts.optimizer.step()
    else:
        parts.optimizer.step()
        teacher_moved = fused
    parts.optimizer.zero_grad(set_to_none=True)
    return found_inf, teacher_moved


def _join_scaler_found_inf(scaler, optimizer, found_inf: torch.Tensor) -> torch.Tensor:
    """Join the loss's ``found_inf`` into the scaler's per-device flags for ``optimizer`` (after
    ``unscale_``, so that ``scaler.step`` skips on either) and return the joined flag on the
    loss's device. GradScaler has no public way to add a flag: compat reads its per-optimiser state."""
    flags = found_inf_flags(scaler, optimizer)
    for flag in flags:
        torch.maximum(flag, found_inf.to(flag.device), out=flag)
    total = sum(f.to(found_inf.device) for f in flags)
    return (total > 0).float()


def clamp_logit_scale_(model: torch.nn.Module) -> None:
    """``model.logit_scale <= ln 100`` in place (a plain, non-DeepSpeed model)."""
    with torch.no_grad():
        model.logit_scale.clamp_(max=MAX_LOGIT_SCALE)


def _student_module(parts: StepParts) -> torch.nn.Module:
    return parts.engine.module if parts.engine is not None else parts.model


def _to(t, dtype: torch.dtype):
    return None if t is None else t.to(dtype)


def _detach(out: LossOutput) -> LossOutput:
    return LossOutput(**{k: getattr(out, k).detach() for k in ("total", "clip", "igc", "tgc", "distill")})
