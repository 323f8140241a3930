"""The replicated EMA teacher: :class:`EMATeacher`, a full copy of the student on this process.

Its parameters are views of one flat fp32 buffer (the EMA state), and with ``forward_dtype``
the module's weights are a second, 16-bit flat buffer written by the same pass. For a
DeepSpeed engine, :meth:`EMATeacher.from_deepspeed` builds this replica under ZeRO-0/1/2 and a
:class:`~degla_fast.ema.sharded.ShardedEMATeacher` under ZeRO-3.
"""
from __future__ import annotations

import copy
import weakref

import torch

from ..checkpoint import cpu_copy
from ..compat.deepspeed import is_partitioned
from ..compat.torch_nn import drop_compiled_forward
from ..errors import ConfigError, ShapeError
from .sharded import ShardedEMATeacher
from .state import flat_views, teacher_settings
from .update import Launch, Updater, validate_pairs


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

    A "bf16 teacher" is this: the EMA state is always fp32 (:attr:`dtype`; a 16-bit state does
    not move at decay 0.9996, :mod:`degla_fast.ema.state`), with a bf16 ``forward_dtype`` copy.
    """

    #: The EMA state's dtype: always fp32.
    dtype = torch.float32

    def __init__(self, student_module: torch.nn.Module, decay: float = 0.9996, backend: str = "auto", *,
                 forward_dtype: torch.dtype | None = None):
        self.decay, self.backend, forward_dtype = teacher_settings(decay, backend, forward_dtype)
        #: The dtype of the module's weights, a copy of the state (None: the weights are the state).
        self.forward_dtype = forward_dtype
        params = list(student_module.parameters())
        if any(is_partitioned(p) for p in params):
            raise ConfigError("EMATeacher: the student's parameters are ZeRO-3 partitions; use "
                              "EMATeacher.from_deepspeed(engine, teacher_module)")
        devices = {p.device for p in params}
        if len(devices) > 1:
            raise ConfigError(f"EMATeacher needs a student on one device; got {sorted(map(str, devices))}")
        device = devices.pop() if devices else torch.device("cpu")
        self._flat, views = flat_views([p.shape for p in params], self.dtype, device)
        if params:
            with torch.no_grad():
                torch._foreach_copy_(views, [p.detach() for p in params])
        self._forward_flat, module_views = self._flat, views
        if forward_dtype is not None:
            # Same shapes, so the same element offsets: the kernel writes both with one table.
            self._forward_flat, module_views = flat_views([p.shape for p in params], forward_dtype, device)
            self._forward_flat.copy_(self._flat)
        # Deep-copy the structure with the teacher's own parameters pre-seeded, so the
        # student's parameters (and their gradients or hooks) are never copied.
        memo = {id(p): torch.nn.Parameter(v, requires_grad=False) for p, v in zip(params, module_views)}
        self.module = copy.deepcopy(student_module, memo)
        drop_compiled_forward(self.module)  # an in-place ``compile()`` would call the *student*
        self.module.eval()
        self._params = views
        self._names = [name for name, _ in student_module.named_parameters()]
        self._updater = Updater(self.backend)
        self._student = None
        self._student_params: list[torch.Tensor] = []
        self._student_ptrs: list[int] = []
        self._jobs: list[Launch] = []

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

    def _prepared(self, student_module: torch.nn.Module) -> list[Launch]:
        """The update's launches, re-planned (and re-checked) only when the module or its storage changed."""
        cached = self._student() if self._student is not None else None
        if cached is student_module and [p.data_ptr() for p in self._student_params] == self._student_ptrs:
            return self._jobs
        params = list(student_module.parameters())
        if len(params) != len(self._params):
            raise ShapeError(f"EMATeacher.update: student has {len(params)} parameters, teacher {len(self._params)}")
        validate_pairs(self._params, params)
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
                       backend: str = "auto", forward_dtype: torch.dtype | None = None):
        """The teacher of a DeepSpeed engine's model.

        ZeRO-0/1/2: an :class:`EMATeacher` replica of ``engine.module`` (``teacher_module`` unused).
        ZeRO-3: a :class:`ShardedEMATeacher` (fp32 EMA shards; with ``forward_dtype`` bf16/fp16
        the module is partitioned, gathered and run in that dtype); ``teacher_module`` is
        required: a freshly built, unpartitioned model of the same architecture (its weights are
        overwritten). ``forward_dtype`` as for EMATeacher in both. Every rank calls this.
        """
        if engine.zero_optimization_stage() < 3:
            return EMATeacher(engine.module, decay=decay, backend=backend, forward_dtype=forward_dtype)
        if teacher_module is None:
            raise ConfigError("EMATeacher.from_deepspeed: ZeRO-3 needs teacher_module= (a freshly built model of the "
                              "student's architecture, not partitioned)")
        return ShardedEMATeacher(engine, teacher_module, decay=decay, backend=backend, forward_dtype=forward_dtype)
