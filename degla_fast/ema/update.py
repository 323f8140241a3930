"""The EMA update: ``teacher += (1 - decay) * (student - teacher)`` over lists of tensors, in place.

:func:`ema_update_` is the public form; :class:`Updater` prepares the grouped launches once
(Triton block tables cached by tensor addresses) and replays them, which both teachers
(:mod:`.replicated`, :mod:`.sharded`) do every step.

Backends: ``triton`` (one kernel launch for all tensors, ``degla_fast.kernels.ema``; CUDA, or
CPU tensors under ``TRITON_INTERPRET=1``), ``torch`` (``torch._foreach_lerp_``), ``auto``
(triton on CUDA when Triton is importable, torch otherwise: :mod:`degla_fast.backends`).
Arithmetic is fp32 in both; the teacher (the EMA state) is fp32 (:mod:`.state` says why).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from ..backends import EMA_BACKENDS, check_backend, resolve_backend
from ..errors import ConfigError, ShapeError
from ..plan_cache import PlanCache

_PLAN_CACHE_SIZE = 4


def check_decay(decay: float) -> float:
    """``decay`` as a float, or a ConfigError unless it is in [0, 1]."""
    decay = float(decay)
    if not 0.0 <= decay <= 1.0:  # also rejects NaN
        raise ConfigError(f"decay must be in [0, 1]; got {decay}")
    return decay


def validate_pairs(teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor]) -> None:
    if len(teacher) != len(student):
        raise ShapeError(f"ema_update_: {len(teacher)} teacher tensors but {len(student)} student tensors")
    for i, (t, s) in enumerate(zip(teacher, student)):
        if t.shape != s.shape:
            raise ShapeError(f"ema_update_: tensor {i}: teacher shape {tuple(t.shape)} != student shape {tuple(s.shape)}")
        if t.device != s.device:
            raise ShapeError(f"ema_update_: tensor {i}: teacher on {t.device} but student on {s.device}")
        if not (t.is_floating_point() and s.is_floating_point()):
            raise ShapeError(f"ema_update_: tensor {i}: needs floating dtypes; got teacher {t.dtype}, student {s.dtype}")
        if t.dtype != torch.float32:
            raise ShapeError(f"ema_update_: tensor {i}: the teacher (EMA state) must be float32, got {t.dtype}: a "
                             f"16-bit state does not move at decay near 1; keep fp32 and cast a copy for the forward")


def _group(teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor]) -> dict:
    """{(device, teacher dtype, student dtype): ([teacher tensors], [student tensors])}, empty tensors left out."""
    groups: dict = {}
    for t, s in zip(teacher, student):
        if t.numel():
            ts, ss = groups.setdefault((t.device, t.dtype, s.dtype), ([], []))
            ts.append(t)
            ss.append(s.detach())
    return groups


def torch_lerp_(teacher: list[torch.Tensor], student: list[torch.Tensor], weight: float | torch.Tensor) -> None:
    """One group (fp32 teacher) through ``torch._foreach_lerp_``, the student cast to fp32 if it
    is not: the torch backend's EMA step (``weight`` = 1 - decay, a float or a 0-d tensor)."""
    if teacher[0].dtype != student[0].dtype:
        student = [s.to(teacher[0].dtype) for s in student]
    if isinstance(weight, torch.Tensor):
        # A device weight goes in as a list of tensors: the Scalar overload would read it on the
        # host (a device sync per step), and there is no single-tensor overload.
        weight = [weight] * len(teacher)
    torch._foreach_lerp_(teacher, student, weight)


@dataclass(frozen=True)
class Launch:
    """One prepared update: the (teacher, student) pairs of one (device, dtypes) group and how
    they are run."""

    plan: object | None  # the Triton kernel's block table; None: the torch path
    teachers: list[torch.Tensor]
    students: list[torch.Tensor]
    copies: list[torch.Tensor] | None  # the forward copy's views, written with the teachers; or None


class Updater:
    """Grouped updates with one backend: :meth:`prepare` sorts pairs into launches once (Triton
    block tables cached by tensor addresses), :meth:`run` replays them with no Python per tensor."""

    def __init__(self, backend: str):
        self.backend = backend
        self._plans = PlanCache(_PLAN_CACHE_SIZE)

    def prepare(self, teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor],
                copy_of: tuple[torch.Tensor, torch.Tensor] | None = None) -> list[Launch]:
        """One :class:`Launch` per (device, dtypes) group.

        copy_of: optional (flat, copy_flat): the teacher tensors are views of ``flat`` and each
        also gets its new values written, in ``copy_flat``'s dtype, at the same offset of ``copy_flat``.
        """
        jobs = []
        for (device, _, _), (ts, ss) in _group(teacher, student).items():
            copies = None
            if copy_of is not None:
                flat, copy_flat = copy_of
                copies = [copy_flat.narrow(0, (t.data_ptr() - flat.data_ptr()) // t.element_size(), t.numel()).view_as(t)
                          for t in ts]
            triton = resolve_backend(self.backend, device) == "triton"
            plan = self._plan(ts, ss, None if copies is None else copies[0]) if triton else None
            jobs.append(Launch(plan, ts, ss, copies))
        return jobs

    def _plan(self, ts: list[torch.Tensor], ss: list[torch.Tensor], copy_base: torch.Tensor | None):
        from ..kernels import ema as kernel
        from ..kernels.multi_tensor import VECTOR_BYTES, addressable

        copy_dtype = None if copy_base is None else copy_base.dtype
        if not kernel.supported(ts[0].dtype, ss[0].dtype, copy_dtype) or not addressable(ts, ss):
            # Dtypes the kernel is not compiled for (e.g. a float64 student) or non-contiguous
            # tensors: the torch path handles any dtype and layout.
            return None
        key = ((ts[0].dtype, ss[0].dtype) + tuple(t.data_ptr() for t in ts) + tuple(s.data_ptr() for s in ss)
               + tuple(t.numel() for t in ts))
        plan = self._plans.get(key, lambda: kernel.build_plan(ts, ss))
        if plan.t_align > 1 and copy_base is not None and copy_base.data_ptr() % VECTOR_BYTES:
            return None  # a forward copy off 16 bytes with an aligned plan: not a gated variant
        return plan

    @staticmethod
    def run(jobs: list[Launch], weight: float, apply: torch.Tensor | None = None) -> None:
        """``t += weight * (s - t)`` for every prepared pair.

        ``apply``: optional 0-d tensor on the teachers' device, 1 to update and 0 to leave every
        teacher as it is (a step skipped on the device: nothing is read on the host). The weight
        becomes the tensor ``weight * apply``, which the Triton kernel reads from device memory
        and the torch path takes as a tensor weight.
        """
        with torch.no_grad():
            for job in jobs:
                plan, ts, ss, copies = job.plan, job.teachers, job.students, job.copies
                if apply is not None:
                    w = apply.to(device=ts[0].device, dtype=torch.float32) * weight
                else:  # the kernel reads the weight from device memory: one cached tensor, no fill per step
                    w = weight if plan is None else _device_weight(float(weight), ts[0].device)
                if plan is None:
                    torch_lerp_(ts, ss, w)
                    if copies is not None:
                        torch._foreach_copy_(copies, ts)
                else:
                    from ..kernels import ema as kernel

                    kernel.launch(plan, ts[0], ss[0], w if apply is None else w.reshape(1),
                                  copy_base=None if copies is None else copies[0])


@functools.lru_cache(maxsize=16)
def _device_weight(weight: float, device: torch.device) -> torch.Tensor:
    """``weight`` as one fp32 element on ``device``, made once (never written: kernels only read it)."""
    return torch.full((1,), weight, dtype=torch.float32, device=device)


_UPDATERS = {name: Updater(name) for name in EMA_BACKENDS}


def ema_update_(teacher_tensors: Iterable[torch.Tensor], student_tensors: Iterable[torch.Tensor], decay: float,
                backend: str = "auto") -> None:
    """In place, for every pair: ``t += (1 - decay) * (s - t)`` with fp32 arithmetic.

    teacher_tensors: float32 tensors (the EMA state) updated in place; student_tensors:
    floating tensors of the same shapes and devices (any floating dtype; the Triton kernel
    takes fp32, bf16 and fp16, others go through torch). decay in [0, 1].
    backend: ``auto``, ``torch`` or ``triton``. Raises ShapeError (a ValueError) on lists of
    different lengths, a shape/device mismatch or a teacher that is not float32 (naming the
    tensor index), ConfigError (a ValueError) on a bad decay or backend.
    """
    teacher, student = list(teacher_tensors), list(student_tensors)
    decay, backend = check_decay(decay), check_backend(backend)
    validate_pairs(teacher, student)
    updater = _UPDATERS[backend]
    updater.run(updater.prepare(teacher, student), 1.0 - decay)
