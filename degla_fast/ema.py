"""EMA teacher of the DeGLA self-distillation: ``teacher += (1 - decay) * (student - teacher)``.

:func:`ema_update_` updates lists of tensors in place in one pass over memory; :class:`EMATeacher`
keeps a teacher copy of a student module whose parameters are views of one flat buffer;
:meth:`EMATeacher.from_deepspeed` builds the teacher for a DeepSpeed engine (a full replica for
ZeRO-0/1/2, a :class:`ShardedEMATeacher` partitioned like the student for ZeRO-3: fp32 EMA
shards, a 16-bit forward copy that DeepSpeed gathers, small parameters kept gathered and
refreshed after every update). Both teachers satisfy :class:`degla_fast.teacher.Teacher`, all the
trainer and its checkpoint use of them; the DeepSpeed internals the sharded one needs are reached
through :mod:`degla_fast.compat.deepspeed`.

Backends: ``triton`` (one kernel launch for all tensors, ``degla_fast.kernels.ema``; CUDA, or
CPU tensors under ``TRITON_INTERPRET=1``), ``torch`` (``torch._foreach_lerp_``), ``auto``
(triton on CUDA when Triton is importable, torch otherwise: :mod:`degla_fast.backends`).
Arithmetic is fp32 in both.

The EMA state is always fp32. With decay 0.9996 the step ``4e-4 * (s - t)`` is below half a
bf16 ulp of ``t`` for almost every element, so a bf16 state would stay where it started
(measured: 0.33 % of the elements had changed after 2,000 updates). 16-bit teacher weights are
therefore only a forward copy of the fp32 state (``forward_dtype``), written by the same pass.
"""
from __future__ import annotations

import copy
import functools
import weakref
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from .backends import EMA_BACKENDS, check_backend, resolve_backend
from .checkpoint import cpu_copy
from .compat.deepspeed import allgather_stream
from .compat.deepspeed import release_zero3_module  # noqa: F401 (the trainer's name for it)
from .compat.torch_nn import drop_compiled_forward
from .errors import ConfigError, ShapeError
from .plan_cache import PlanCache

#: Teacher parameters start on multiples of this many elements in the flat buffer (128 bytes
#: in fp32): every view is aligned for vector loads whatever the preceding tensor's size.
_FLAT_ALIGN = 32
_PLAN_CACHE_SIZE = 4


def check_decay(decay: float) -> float:
    """``decay`` as a float, or a ConfigError unless it is in [0, 1]."""
    decay = float(decay)
    if not 0.0 <= decay <= 1.0:  # also rejects NaN
        raise ConfigError(f"decay must be in [0, 1]; got {decay}")
    return decay


_FORWARD_DTYPES = (torch.bfloat16, torch.float16)


def _teacher_settings(decay: float, backend: str, dtype: torch.dtype | None,
                      forward_dtype: torch.dtype | None = None) -> tuple[float, str, torch.dtype | None]:
    """Checked (decay, backend, forward copy dtype or None) of a teacher whose state is fp32.

    ``dtype``: None or fp32, or a 16-bit dtype meaning "a 16-bit teacher": fp32 state plus a
    forward copy of that dtype (the same as ``forward_dtype=dtype``).
    """
    if dtype is not None and dtype != torch.float32:
        if dtype not in _FORWARD_DTYPES:
            raise ConfigError(f"dtype: the EMA state is fp32 (a 16-bit teacher is an fp32 state plus a bf16/fp16 "
                              f"forward copy); got {dtype}")
        if forward_dtype is not None and forward_dtype != dtype:
            raise ConfigError(f"dtype={dtype} means forward_dtype={dtype} (the EMA state stays fp32); got "
                              f"forward_dtype={forward_dtype} as well")
        forward_dtype = dtype
    if forward_dtype == torch.float32:
        forward_dtype = None
    if forward_dtype is not None and forward_dtype not in _FORWARD_DTYPES:
        raise ConfigError(f"forward_dtype must be torch.bfloat16, torch.float16 or None; got {forward_dtype}")
    return check_decay(decay), check_backend(backend), forward_dtype


def _validate(teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor]) -> None:
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
class _Launch:
    """One prepared update: the (teacher, student) pairs of one (device, dtypes) group and how
    they are run."""

    plan: object | None  # the Triton kernel's block table; None: the torch path
    teachers: list[torch.Tensor]
    students: list[torch.Tensor]
    copies: list[torch.Tensor] | None  # the forward copy's views, written with the teachers; or None


class _Updater:
    """Grouped updates with one backend: :meth:`prepare` sorts pairs into launches once (Triton
    block tables cached by tensor addresses), :meth:`run` replays them with no Python per tensor."""

    def __init__(self, backend: str):
        self.backend = backend
        self._plans = PlanCache(_PLAN_CACHE_SIZE)

    def prepare(self, teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor],
                copy_of: tuple[torch.Tensor, torch.Tensor] | None = None) -> list[_Launch]:
        """One :class:`_Launch` per (device, dtypes) group.

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
            jobs.append(_Launch(plan, ts, ss, copies))
        return jobs

    def _plan(self, ts: list[torch.Tensor], ss: list[torch.Tensor], copy_base: torch.Tensor | None):
        from .kernels import ema as kernel
        from .kernels.multi_tensor import VECTOR_BYTES, addressable

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
    def run(jobs: list[_Launch], weight: float, apply: torch.Tensor | None = None) -> None:
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
                    from .kernels import ema as kernel

                    kernel.launch(plan, ts[0], ss[0], w if apply is None else w.reshape(1),
                                  copy_base=None if copies is None else copies[0])


@functools.lru_cache(maxsize=16)
def _device_weight(weight: float, device: torch.device) -> torch.Tensor:
    """``weight`` as one fp32 element on ``device``, made once (never written: kernels only read it)."""
    return torch.full((1,), weight, dtype=torch.float32, device=device)


_UPDATERS = {name: _Updater(name) for name in EMA_BACKENDS}


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
    _validate(teacher, student)
    updater = _UPDATERS[backend]
    updater.run(updater.prepare(teacher, student), 1.0 - decay)


def _flat_views(shapes: Sequence[torch.Size], dtype: torch.dtype, device) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One zeroed buffer and a view of it per shape, each starting on a multiple of ``_FLAT_ALIGN``."""
    starts, total = [], 0
    for shape in shapes:
        starts.append(total)
        total += -(-shape.numel() // _FLAT_ALIGN) * _FLAT_ALIGN
    flat = torch.zeros(total, dtype=dtype, device=device)
    return flat, [flat.narrow(0, start, shape.numel()).view(shape) for start, shape in zip(starts, shapes)]


class EMATeacher:
    """An EMA copy of ``student_module`` (a full replica on this process).

    ``module``: a copy of the student in eval mode whose parameters (requires_grad False, never
    in an optimiser) are views of one flat fp32 buffer (the EMA state); buffers are copied once
    here and never averaged. ``update(student_module)`` moves every parameter toward the
    student's: ``t += (1 - decay) * (s - t)``, one pass over memory.

    ``forward_dtype`` (``torch.bfloat16`` or ``torch.float16``): ``module``'s parameters become
    a second flat buffer of that dtype, written by the same pass that updates the fp32 EMA
    state, so a teacher forward under autocast casts no weight. ``state_dict`` and
    ``load_state_dict`` still hold the fp32 EMA state.

    ``dtype``: the EMA state is always fp32 (a 16-bit state does not move at decay 0.9996).
    None or ``torch.float32``; ``torch.bfloat16``/``torch.float16`` ask for a 16-bit teacher and
    mean exactly ``forward_dtype=`` that dtype over an fp32 state (``self.dtype`` stays fp32).
    """

    def __init__(self, student_module: torch.nn.Module, decay: float = 0.9996, backend: str = "auto",
                 dtype: torch.dtype | None = None, *, forward_dtype: torch.dtype | None = None):
        self.decay, self.backend, forward_dtype = _teacher_settings(decay, backend, dtype, forward_dtype)
        #: The EMA state's dtype: always fp32. ``forward_dtype``: the module's weights (None: the state).
        self.dtype, self.forward_dtype = torch.float32, forward_dtype
        params = list(student_module.parameters())
        if any(hasattr(p, "ds_tensor") for p in params):
            raise ConfigError("EMATeacher: the student's parameters are ZeRO-3 partitions; use "
                              "EMATeacher.from_deepspeed(engine, teacher_module)")
        devices = {p.device for p in params}
        if len(devices) > 1:
            raise ConfigError(f"EMATeacher needs a student on one device; got {sorted(map(str, devices))}")
        device = devices.pop() if devices else torch.device("cpu")
        self._flat, views = _flat_views([p.shape for p in params], self.dtype, device)
        if params:
            with torch.no_grad():
                torch._foreach_copy_(views, [p.detach() for p in params])
        self._forward_flat, module_views = self._flat, views
        if forward_dtype is not None:
            # Same shapes, so the same element offsets: the kernel writes both with one table.
            self._forward_flat, module_views = _flat_views([p.shape for p in params], forward_dtype, device)
            self._forward_flat.copy_(self._flat)
        # Deep-copy the structure with the teacher's own parameters pre-seeded, so the
        # student's parameters (and their gradients or hooks) are never copied.
        memo = {id(p): torch.nn.Parameter(v, requires_grad=False) for p, v in zip(params, module_views)}
        self.module = copy.deepcopy(student_module, memo)
        drop_compiled_forward(self.module)  # an in-place ``compile()`` would call the *student*
        self.module.eval()
        self._params = views
        self._names = [name for name, _ in student_module.named_parameters()]
        self._updater = _Updater(backend)
        self._student = None
        self._student_params: list[torch.Tensor] = []
        self._student_ptrs: list[int] = []
        self._jobs: list[_Launch] = []

    def parameter_views(self) -> tuple[list[str], list[torch.Tensor], list[torch.Tensor] | None]:
        """``(names, states, forwards)`` in parameter order: the EMA state of each parameter (views
        of :attr:`flat`, fp32) and, with a separate ``forward_dtype`` buffer, the module's
        parameters that mirror it (else None: the module's parameters are the states)."""
        forwards = [p.detach() for p in self.module.parameters()] if self._forward_flat is not self._flat else None
        return list(self._names), list(self._params), forwards

    @property
    def flat(self) -> torch.Tensor:
        """The 1-D buffer all teacher parameters are views of (padding between them)."""
        return self._flat

    def _prepared(self, student_module: torch.nn.Module) -> list[_Launch]:
        """The update's launches, re-planned (and re-checked) only when the module or its storage changed."""
        cached = self._student() if self._student is not None else None
        if cached is student_module and [p.data_ptr() for p in self._student_params] == self._student_ptrs:
            return self._jobs
        params = list(student_module.parameters())
        if len(params) != len(self._params):
            raise ShapeError(f"EMATeacher.update: student has {len(params)} parameters, teacher {len(self._params)}")
        _validate(self._params, params)
        self._student = weakref.ref(student_module)
        self._student_params = params
        self._student_ptrs = [p.data_ptr() for p in params]
        copy_of = (self._flat, self._forward_flat) if self._forward_flat is not self._flat else None
        self._jobs = self._updater.prepare(self._params, params, copy_of=copy_of)
        return self._jobs

    def update(self, student_module: torch.nn.Module, apply: torch.Tensor | None = None) -> None:
        """Move every teacher parameter toward ``student_module``'s (same architecture) in place.

        ``apply``: optional 0-d device tensor, 1 = update, 0 = leave the teacher unchanged (a step
        skipped on the device, decided without a host read)."""
        self._updater.run(self._prepared(student_module), 1.0 - self.decay, apply)

    def state_dict(self) -> dict:
        """The teacher module's state dict (its keys: no non-persistent buffers), parameters from
        the fp32 EMA state, buffers as copied; copies on the CPU (what a checkpoint stores)."""
        state = self.module.state_dict()
        state.update({name: view for name, view in zip(self._names, self._params)})
        return cpu_copy(state)

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict written by :meth:`state_dict` (copied into the flat buffers' views)."""
        self.module.load_state_dict(state_dict)  # checks the keys and shapes, loads the buffers
        with torch.no_grad():
            for name, view in zip(self._names, self._params):
                view.copy_(state_dict[name])
            if self._forward_flat is not self._flat:
                self._forward_flat.copy_(self._flat)

    def close(self) -> None:
        """Nothing to release: a replica holds only its tensors (the :class:`Teacher` protocol)."""

    @staticmethod
    def from_deepspeed(engine, teacher_module: torch.nn.Module | None = None, *, decay: float = 0.9996,
                       backend: str = "auto", dtype: torch.dtype | None = None,
                       forward_dtype: torch.dtype | None = None):
        """The teacher of a DeepSpeed engine's model.

        ZeRO-0/1/2: an :class:`EMATeacher` replica of ``engine.module`` (``teacher_module`` unused).
        ZeRO-3: a :class:`ShardedEMATeacher` (fp32 EMA shards; with ``forward_dtype`` bf16/fp16
        the module is partitioned, gathered and run in that dtype); ``teacher_module`` is
        required: a freshly built, unpartitioned model of the same architecture (its weights are
        overwritten). ``dtype``/``forward_dtype`` as for EMATeacher in both. Every rank calls this.
        """
        if engine.zero_optimization_stage() < 3:
            return EMATeacher(engine.module, decay=decay, backend=backend, dtype=dtype, forward_dtype=forward_dtype)
        if teacher_module is None:
            raise ConfigError("EMATeacher.from_deepspeed: ZeRO-3 needs teacher_module= (a freshly built model of the "
                              "student's architecture, not partitioned)")
        return ShardedEMATeacher(engine, teacher_module, decay=decay, backend=backend, dtype=dtype,
                                 forward_dtype=forward_dtype)


def _master_partitions(engine) -> tuple:
    """``(optimizer, fp32 master partitions)`` of a ZeRO-3 engine, or a ConfigError."""
    optimizer = getattr(engine, "optimizer", None)
    masters = getattr(optimizer, "fp32_partitioned_groups_flat", None)
    if masters is None:
        raise ConfigError("ShardedEMATeacher needs a ZeRO-3 engine with an optimizer (fp32 master partitions)")
    if any(m.numel() == 0 for m in masters) or getattr(optimizer, "offload_optimizer", False):
        raise ConfigError("ShardedEMATeacher: optimizer offload (cpu/nvme) is not supported; the fp32 master "
                          "partitions must live on the model's device")
    return optimizer, masters


def _check_same_parameters(student: torch.nn.Module, teacher_module: torch.nn.Module) -> None:
    """A ShapeError unless ``teacher_module`` has the (partitioned) student's parameter names and full shapes."""
    student_params = dict(student.named_parameters())
    teacher_params = dict(teacher_module.named_parameters())
    if set(teacher_params) != set(student_params):
        raise ShapeError(f"ShardedEMATeacher: teacher_module parameters differ from the student's: "
                         f"{sorted(set(teacher_params) ^ set(student_params))[:5]}")
    for name, p in teacher_params.items():
        if tuple(p.shape) != tuple(student_params[name].ds_shape):
            raise ShapeError(f"ShardedEMATeacher: {name}: teacher shape {tuple(p.shape)} != student shape "
                             f"{tuple(student_params[name].ds_shape)}")


def _place(teacher_module: torch.nn.Module, student: torch.nn.Module, device, *, gather_dtype: torch.dtype) -> None:
    """The unpartitioned teacher on ``device``, frozen, in eval mode, its parameters in the dtype
    they are partitioned (and so gathered) in, its buffers copies of the student's."""
    teacher_module.to(device=device).requires_grad_(False).eval()
    with torch.no_grad():
        for p in teacher_module.parameters():  # partitioned (and so gathered) in the forward's dtype;
            p.data = p.data.to(gather_dtype)   # buffers stay as the student's, as in EMATeacher
        for (_, t_buf), (_, s_buf) in zip(teacher_module.named_buffers(), student.named_buffers()):
            t_buf.data = s_buf.detach().clone()


def _partition_like_student(engine, teacher_module: torch.nn.Module):
    """Partition the teacher like the student (same world size and shapes give the same shards)
    and register DeepSpeed's gather/release hooks for its forward, with the engine's own ZeRO-3
    gather settings. Returns the ``DeepSpeedZeRoOffload`` that holds the hooks."""
    from deepspeed.runtime.zero.parameter_offload import DeepSpeedZeRoOffload
    from deepspeed.utils.timer import NoopTimer

    return DeepSpeedZeRoOffload(
        teacher_module, timers=NoopTimer(), ds_config=engine.config, overlap_comm=engine.zero_overlap_comm(),
        prefetch_bucket_size=engine.zero_prefetch_bucket_size(),
        max_reuse_distance=engine.zero_max_reuse_distance(),
        max_live_parameters=engine.zero_max_live_parameters(),
        param_persistence_threshold=engine.zero_param_persistence_threshold(),
        model_persistence_threshold=engine.zero_model_persistence_threshold(), mpu=engine.mpu)


class ShardedEMATeacher:
    """ZeRO-3 EMA teacher: partitioned exactly like the student, its EMA with no communication.

    Each rank keeps, per optimiser parameter group, an fp32 teacher shard laid out like the
    engine's fp32 master partition of that group (:attr:`shards`, the EMA state); ``update()``
    lerps the one toward the other in one pass. With ``forward_dtype`` (bf16/fp16) the same pass
    also writes a 16-bit copy of each shard (:attr:`forward_shards`), and the module's ZeRO-3
    partitions (``param.ds_tensor``) are views of those copies: DeepSpeed's hooks gather the
    teacher's weights for its forward in 16 bits (half the bytes of fp32) and the forward reads
    them as they are, as :class:`EMATeacher`'s forward copy. Without ``forward_dtype`` the
    partitions are the fp32 shards themselves.

    The gather follows the engine's ZeRO-3 settings (``overlap_comm``, prefetch bucket, live and
    reuse limits, ``stage3_param_persistence_threshold``). Parameters at or below the persistence
    threshold (biases, LayerNorm gains, ``logit_scale``, ...) stay gathered between forwards, so
    ``update()`` ends by refreshing them from the new shards: one coalesced all-gather in the
    partitions' dtype (what DeepSpeed's own optimiser step does for the student's persisted
    parameters), and the forward never reads a stale value. ``state_dict()`` (a collective)
    returns the fp32 EMA state as full tensors on every rank.
    """

    def __init__(self, engine, teacher_module: torch.nn.Module, *, decay: float = 0.9996, backend: str = "auto",
                 dtype: torch.dtype | None = None, forward_dtype: torch.dtype | None = None):
        self.decay, self.backend, self.forward_dtype = _teacher_settings(decay, backend, dtype, forward_dtype)
        self.dtype = torch.float32
        optimizer, masters = _master_partitions(engine)
        student = engine.module
        _check_same_parameters(student, teacher_module)
        device = masters[0].device
        _place(teacher_module, student, device, gather_dtype=self.forward_dtype or self.dtype)
        self._offload = _partition_like_student(engine, teacher_module)
        self.module = teacher_module
        #: The parameters kept gathered between forwards (refreshed by every update), in ds_id order.
        self.persisted = sorted((p for p in teacher_module.parameters() if getattr(p, "ds_persist", False)),
                                key=lambda p: p.ds_id)
        # One fp32 buffer for the EMA state of all groups and, with a forward dtype, one of that
        # dtype with the same layout: the update writes both with one table.
        sizes = [torch.Size([m.numel()]) for m in masters]
        self._flat, self._shards = _flat_views(sizes, self.dtype, device)
        self._forward_flat, self._forward_shards = self._flat, self._shards
        if self.forward_dtype is not None:
            self._forward_flat, self._forward_shards = _flat_views(sizes, self.forward_dtype, device)
        self._names = self._seed_shards(optimizer, masters, student)
        self._optimizer, self._updater = optimizer, _Updater(backend)
        self._jobs = self._prepare()

    def _seed_shards(self, optimizer, masters: list[torch.Tensor], student: torch.nn.Module) -> dict:
        """Copy the engine's fp32 masters into the shards (and forward copies), make the teacher's
        partitions views of the forward shards and copy frozen student partitions as they are.
        Returns ``{teacher parameter name: (group index, offset, partition numel)}`` (for state_dict)."""
        names = {id(p): n for n, p in student.named_parameters()}
        teacher_params = dict(self.module.named_parameters())
        layout = {}
        with torch.no_grad():
            for g, (group, master) in enumerate(zip(optimizer.fp16_groups, masters)):
                self._shards[g].copy_(master.detach())
                if self._forward_flat is not self._flat:
                    self._forward_shards[g].copy_(self._shards[g])
                offset = 0
                for p in group:
                    t = teacher_params[names[id(p)]]
                    n = p.partition_numel()
                    if t.ds_tensor.numel() != n:
                        raise ShapeError(f"ShardedEMATeacher: {names[id(p)]}: teacher shard {t.ds_tensor.numel()} "
                                         f"elements, student shard {n}")
                    t.ds_tensor.data = self._forward_shards[g].narrow(0, offset, n)
                    layout[names[id(p)]] = (g, offset, n)
                    offset += n
            grouped = {id(p) for group in optimizer.fp16_groups for p in group}
            for name, p in student.named_parameters():  # frozen student parameters: a constant EMA
                if id(p) not in grouped:
                    teacher_params[name].ds_tensor.copy_(p.ds_tensor)
        return layout

    @property
    def shards(self) -> list[torch.Tensor]:
        """This rank's fp32 EMA state, one flat shard per optimiser group (laid out like the engine's masters)."""
        return list(self._shards)

    @property
    def forward_shards(self) -> list[torch.Tensor]:
        """The shards the module's partitions are views of: 16-bit copies of :attr:`shards`
        with ``forward_dtype``, else :attr:`shards` themselves."""
        return list(self._forward_shards)

    def _prepare(self) -> list[_Launch]:
        # Re-read each step: a checkpoint load may swap the engine's master tensors.
        self._masters = list(self._optimizer.fp32_partitioned_groups_flat)
        self._master_ptrs = [m.data_ptr() for m in self._masters]
        _validate(self._shards, self._masters)
        copy_of = (self._flat, self._forward_flat) if self._forward_flat is not self._flat else None
        return self._updater.prepare(self._shards, self._masters, copy_of=copy_of)

    def update(self, student_module: torch.nn.Module | None = None, apply: torch.Tensor | None = None) -> None:
        """Lerp this rank's teacher shards toward its fp32 master shards (``student_module`` is not
        read), writing the forward copy in the same pass, then refresh the persisted parameters
        (a collective when some are persisted: every rank calls it).
        ``apply``: as for :meth:`EMATeacher.update` (0 leaves the shards unchanged)."""
        if [m.data_ptr() for m in self._optimizer.fp32_partitioned_groups_flat] != self._master_ptrs:
            self._jobs = self._prepare()
        _Updater.run(self._jobs, 1.0 - self.decay, apply)
        self._order_gathers_after_writes()  # first: the refresh below may gather on that stream too
        self.refresh_persisted()

    def _order_gathers_after_writes(self) -> None:
        """With ``overlap_comm`` on CUDA, DeepSpeed gathers (and prefetches) on its own stream:
        make that stream wait, on the device, for the shard writes just queued on this one (no
        host sync). The stream is DeepSpeed's private attribute (compat); without it nothing is done."""
        stream = allgather_stream(self._offload.get_param_coordinator())
        if stream is not None and self._flat.is_cuda:
            stream.wait_stream(torch.cuda.current_stream(self._flat.device))

    def refresh_persisted(self) -> None:
        """Re-gather the persisted parameters from the current shards (one coalesced all-gather
        of all of them, the same list on every rank; nothing when none are persisted). A
        collective: every rank calls it."""
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        if not self.persisted:
            return
        for p in self.persisted:  # a prefetch still in flight (overlap_comm on an accelerator)
            registry = self.module.ds_inflight_param_registry
            if p in registry:
                registry.pop(p).wait()
        available = [p for p in self.persisted if p.ds_status == ZeroParamStatus.AVAILABLE]
        with torch.no_grad():
            if available:  # drop the stale gathered copies; the shards hold the new values
                available[0].partition(param_list=available, has_been_updated=False)
            self.persisted[0].all_gather_coalesced(self.persisted).wait()

    def close(self) -> None:
        """Remove the gather/release hooks from the teacher's modules (the engine's ``destroy`` for
        its own): they close over the partitioned parameters and their process groups."""
        self._offload.destroy()
        release_zero3_module(self.module)

    def state_dict(self) -> dict:
        """Full teacher parameters from the fp32 EMA state, and persistent buffers (the keys of
        ``module.state_dict()``), on the CPU on every rank; a collective (one all-gather per
        optimiser group): every rank calls it."""
        import torch.distributed as dist

        params = dict(self.module.named_parameters())
        group = next(iter(params.values())).ds_process_group if params else None
        world = dist.get_world_size(group=group)
        gathered = []
        for shard in self._shards:
            parts = [torch.empty_like(shard) for _ in range(world)]
            dist.all_gather(parts, shard.contiguous(), group=group)
            gathered.append(parts)
        state = {}
        for name, p in params.items():
            if name in self._names:
                g, offset, n = self._names[name]
                full = torch.cat([part.narrow(0, offset, n) for part in gathered[g]])
            else:  # frozen: its partitions (in the forward dtype) hold the constant student value
                parts = [torch.empty_like(p.ds_tensor) for _ in range(world)]
                dist.all_gather(parts, p.ds_tensor.contiguous(), group=group)
                full = torch.cat(parts).to(self.dtype)
            state[name] = full[: p.ds_numel].reshape(p.ds_shape)  # cpu_copy below copies it once
        state.update(self.module.named_buffers())
        keys = self.module.state_dict().keys()  # what open_clip saves: no non-persistent buffers
        return cpu_copy({k: v for k, v in state.items() if k in keys})

    def load_state_dict(self, state_dict: dict) -> None:
        """Load full tensors (as :meth:`state_dict` writes): each rank keeps its own slice of the
        fp32 state (and its forward copy), then the persisted parameters are refreshed (a
        collective when some are persisted: every rank calls it). Non-persistent buffers, which
        :meth:`state_dict` leaves out, keep their values."""
        with torch.no_grad():
            for name, p in self.module.named_parameters():
                if name in self._names:
                    g, offset, n = self._names[name]
                    target = self._shards[g].narrow(0, offset, n)
                else:
                    target = p.ds_tensor
                    n = target.numel()
                full = state_dict[name].reshape(-1).to(device=target.device, dtype=target.dtype)
                rank = p.ds_zero_partition_rank
                part = full[rank * n: (rank + 1) * n]
                target.zero_()
                target[: part.numel()].copy_(part)
            if self._forward_flat is not self._flat:
                self._forward_flat.copy_(self._flat)
            for name, buf in self.module.named_buffers():
                if name in state_dict:  # the persistent ones
                    buf.copy_(state_dict[name])
        self._order_gathers_after_writes()  # first, as in update(): then the refresh
        self.refresh_persisted()
