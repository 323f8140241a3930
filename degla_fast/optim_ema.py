"""AdamW fused with the EMA teacher update: one pass over each parameter instead of two.

After ``torch.optim.AdamW`` has read and written a parameter, :meth:`EMATeacher.update` reads
it once more to move the teacher. Here the optimiser step writes the new parameter and moves
the teacher toward it in the same pass:

    AdamW exactly as torch.optim.AdamW (decoupled weight decay, bias corrections), then
    new param = min(new param, clamp_max)           (optional, per group: logit_scale <= ln 100)
    teacher += (1 - decay) * (new param - teacher)

The clamp sits between the update and the lerp so the teacher follows the clamped value, as
``AdamW.step(); clamp_(); teacher.update()`` gives.

:func:`adamw_ema_step_` works on lists of tensors (a model's parameters, or DeepSpeed-style flat
fp32 partitions: one 1-D tensor each); :class:`AdamWEMA` is a ``torch.optim.Optimizer`` that
moves an EMA teacher (a :class:`~degla_fast.ema.ReplicaTeacher`, such as
:class:`~degla_fast.ema.EMATeacher`) as it steps.

Backends: ``triton`` (one launch per parameter group and teacher dtype,
``degla_fast.kernels.adamw_ema``; CUDA, or CPU tensors under ``TRITON_INTERPRET=1``), ``torch``
(``torch._foreach_*`` ops in the order torch's multi-tensor AdamW uses, then
:func:`~degla_fast.ema.ema_update_`: the same numbers, in several passes), ``auto`` (triton on
CUDA when Triton is importable, torch otherwise). Arithmetic is fp32.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, NamedTuple, Sequence

import torch

from .backends import check_backend, resolve_backend
from .ema import ReplicaTeacher, check_decay, ema_update_
from .ema.update import torch_lerp_
from .errors import ConfigError, ShapeError
from .plan_cache import PlanCache

_CACHE_SIZE = 8


class _Streams(NamedTuple):
    """The five equally long tensor lists of one AdamW + EMA group (index i: one parameter)."""

    params: list
    grads: list
    exp_avgs: list
    exp_avg_sqs: list
    teachers: list


_LISTS = _Streams._fields


# --- checks -----------------------------------------------------------------------------------

def _check_hyperparameters(*, step: float, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                           decay: float, clamp_max: float | None = None) -> dict:
    """The hyperparameters as floats (``clamp_max`` float or None), or ConfigError naming the bad
    one (NaN fails every test)."""
    values = {"step": float(step), "lr": float(lr), "beta1": float(beta1), "beta2": float(beta2),
              "eps": float(eps), "weight_decay": float(weight_decay)}
    checks = {"step": (values["step"] >= 1 and values["step"] == math.floor(values["step"]), "an integer >= 1"),
              "lr": (values["lr"] >= 0, ">= 0"), "beta1": (0 <= values["beta1"] < 1, "in [0, 1)"),
              "beta2": (0 <= values["beta2"] < 1, "in [0, 1)"), "eps": (values["eps"] >= 0, ">= 0"),
              "weight_decay": (values["weight_decay"] >= 0, ">= 0")}
    for name, (ok, rule) in checks.items():
        if not ok:
            raise ConfigError(f"adamw_ema_step_: {name} must be {rule}; got {values[name]}")
    values["decay"] = check_decay(decay)
    if clamp_max is not None and math.isnan(float(clamp_max)):
        raise ConfigError("adamw_ema_step_: clamp_max must be a number or None; got nan")
    values["clamp_max"] = None if clamp_max is None else float(clamp_max)
    return values


def _validate(lists: Sequence[Sequence[torch.Tensor]], copies: Sequence[torch.Tensor] | None) -> None:
    """ShapeError (naming the tensor index) unless the lists match in length, shape, device and dtype."""
    lengths = {name: len(tensors) for name, tensors in zip(_LISTS, lists)}
    if copies is not None:
        lengths["teacher_copies"] = len(copies)
    if len(set(lengths.values())) > 1:
        raise ShapeError(f"adamw_ema_step_: lists of different lengths: {lengths}")
    for i, (p, *others) in enumerate(zip(*lists, *([copies] if copies is not None else []))):
        for name, t in zip(_LISTS[1:] + ("teacher_copies",), others):
            if t.shape != p.shape:
                raise ShapeError(f"adamw_ema_step_: tensor {i}: {name} shape {tuple(t.shape)} != param shape "
                                 f"{tuple(p.shape)}")
            if t.device != p.device:
                raise ShapeError(f"adamw_ema_step_: tensor {i}: {name} on {t.device} but param on {p.device}")
        for name, t in zip(_LISTS[:4], (p, *others[:3])):
            if t.dtype != torch.float32:
                raise ShapeError(f"adamw_ema_step_: tensor {i}: {name} must be float32 (fp32 master weights and "
                                 f"optimiser state); got {t.dtype}")
        if others[3].dtype != torch.float32:
            raise ShapeError(f"adamw_ema_step_: tensor {i}: teachers must be float32 (the EMA state: a 16-bit state "
                             f"does not move at decay near 1; pass 16-bit weights as teacher_copies); got "
                             f"{others[3].dtype}")
        if copies is not None and others[4].dtype not in (torch.bfloat16, torch.float16):
            raise ShapeError(f"adamw_ema_step_: tensor {i}: teacher_copies must be bfloat16 or float16; got "
                             f"{others[4].dtype}")


# --- torch backend ----------------------------------------------------------------------------

def _torch_adamw_(params, grads, exp_avgs, exp_avg_sqs, hyperparameters: dict) -> None:
    """torch's multi-tensor AdamW step (``_multi_tensor_adam``), op for op, so the numbers match it."""
    lr, beta1, beta2, step = (hyperparameters[name] for name in ("lr", "beta1", "beta2", "step"))
    if hyperparameters["weight_decay"] != 0:
        torch._foreach_mul_(params, 1 - lr * hyperparameters["weight_decay"])
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    step_size = (lr / (1 - beta1 ** step)) * -1
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, (1 - beta2 ** step) ** 0.5)
    torch._foreach_add_(denom, hyperparameters["eps"])
    torch._foreach_addcdiv_(params, exp_avgs, denom, [step_size] * len(params))


def _torch_ema_(teachers, params, copies, weight: float) -> None:
    """The EMA toward ``params`` as ema_update_'s torch backend computes it, then the copies."""
    torch_lerp_(teachers, params, weight)
    if copies is not None:
        torch._foreach_copy_(copies, teachers)


# --- triton backend ---------------------------------------------------------------------------

# Block layouts depend only on the tensor sizes; per-tensor tables on the addresses too, so a
# reallocated gradient costs only a new per-tensor table.
_LAYOUTS = PlanCache(_CACHE_SIZE)
_TABLES = PlanCache(_CACHE_SIZE)


def _plan(streams: _Streams, copies: list[torch.Tensor] | None):
    """(layout, table) of one group for the kernel, or None when a tensor is not addressable by
    it (non-contiguous) or of dtypes it is not compiled for."""
    from .kernels import adamw_ema as kernel
    from .kernels.multi_tensor import addressable

    kernel_streams = [*streams, streams.teachers if copies is None else copies]  # its sixth: the copies
    copy_dtype = None if copies is None else copies[0].dtype
    if not kernel.supported(streams.teachers[0].dtype, copy_dtype) or not addressable(*kernel_streams):
        return None
    numels = tuple(p.numel() for p in streams.params)
    device = streams.params[0].device
    layout = _LAYOUTS.get((device, numels), lambda: kernel.build_layout(numels, device))
    key = (numels,) + tuple((tensors[0].dtype,) + tuple(t.data_ptr() for t in tensors) for tensors in kernel_streams)
    return layout, _TABLES.get(key, lambda: kernel.build_table(*streams, copies))


# --- prepared launches ------------------------------------------------------------------------

def _prepare(lists, copies, backend: str) -> list[tuple]:
    """[(plan or None, streams, teacher copies or None)] per (device, teacher dtype, copy dtype)
    group, empty tensors left out; plan None = torch path. Inputs already validated."""
    groups: dict = {}
    for i, p in enumerate(lists[0]):
        if not p.numel():
            continue
        copy = copies[i] if copies is not None else None
        key = (p.device, lists[4][i].dtype, None if copy is None else copy.dtype)
        streams, group_copies = groups.setdefault(key, (_Streams(*([] for _ in _LISTS)), None if copy is None else []))
        for out, tensors in zip(streams, lists):
            out.append(tensors[i])
        if copy is not None:
            group_copies.append(copy)
    jobs = []
    for (device, _, _), (streams, group_copies) in groups.items():
        triton = resolve_backend(backend, device) == "triton"
        jobs.append((_plan(streams, group_copies) if triton else None, streams, group_copies))
    return jobs


def _run(jobs: list[tuple], hyperparameters: dict) -> None:
    """One AdamW + EMA step of every prepared group: one kernel launch each, or the torch ops."""
    clamp_max = hyperparameters["clamp_max"]
    with torch.no_grad():  # no detach needed: in-place updates of leaves, as optimisers do
        for plan, streams, copies in jobs:
            if plan is None:
                _torch_adamw_(streams.params, streams.grads, streams.exp_avgs, streams.exp_avg_sqs, hyperparameters)
                if clamp_max is not None:
                    torch._foreach_clamp_max_(streams.params, clamp_max)
                _torch_ema_(streams.teachers, streams.params, copies, 1.0 - hyperparameters["decay"])
                continue
            from .kernels import adamw_ema as kernel

            layout, table = plan
            bases = [tensors[0] for tensors in streams] + [(copies or streams.teachers)[0]]
            kernel.launch(layout, table, bases, write_copy=copies is not None, **hyperparameters)


# --- functional form --------------------------------------------------------------------------

def adamw_ema_step_(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], exp_avgs: Sequence[torch.Tensor],
                    exp_avg_sqs: Sequence[torch.Tensor], teachers: Sequence[torch.Tensor], *, step: float, lr: float,
                    beta1: float, beta2: float, eps: float, weight_decay: float, decay: float,
                    backend: str = "auto", teacher_copies: Sequence[torch.Tensor] | None = None,
                    clamp_max: float | None = None) -> None:
    """One AdamW step of every param, then ``teacher += (1 - decay) * (new param - teacher)``, in place.

    params, grads, exp_avgs, exp_avg_sqs: float32 tensors, equal shapes per index (e.g. a
    model's parameters, or DeepSpeed flat partitions: one 1-D tensor per group); teachers:
    same shapes, float32 (the EMA state is always fp32). ``step``: the step count including
    this step (>= 1), as torch's ``state["step"]`` after its increment. ``teacher_copies``:
    optional bf16 or fp16 tensors of the teachers' shapes (the forward weights) that receive
    the new teacher values too. ``clamp_max``: each new param is clamped to at most this before
    its teacher moves toward it (None: no clamp).
    Raises ShapeError (a ValueError) on mismatched lists, naming the tensor index, ConfigError
    (a ValueError) on a bad hyperparameter or backend.
    """
    lists = [list(x) for x in (params, grads, exp_avgs, exp_avg_sqs, teachers)]
    copies = list(teacher_copies) if teacher_copies is not None else None
    hyperparameters = _check_hyperparameters(step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                                             weight_decay=weight_decay, decay=decay, clamp_max=clamp_max)
    check_backend(backend)
    _validate(lists, copies)
    _run(_prepare(lists, copies, backend), hyperparameters)


# --- optimiser --------------------------------------------------------------------------------

def _map_to_teacher(groups: list[dict], teacher: ReplicaTeacher) -> dict:
    """{id(student param): (teacher view, copy or None)}: by name when every group carries
    ``param_names`` (``AdamWEMA(model.named_parameters(), ...)``), by position otherwise."""
    names, views, copies = teacher.parameter_views()
    copies = copies or [None] * len(views)
    if all("param_names" in g for g in groups):
        index = {name: i for i, name in enumerate(names)}
        pairs = []
        for g in groups:
            for name, p in zip(g["param_names"], g["params"]):
                if name not in index:
                    raise ConfigError(f"AdamWEMA: parameter {name!r} is not a parameter of the teacher")
                pairs.append((name, p, index[name]))
    else:
        flat = [p for g in groups for p in g["params"]]
        if len(flat) != len(views):
            raise ConfigError(f"AdamWEMA: {len(flat)} parameters but the teacher has {len(views)}; pass "
                              f"model.named_parameters() to map a subset (or regrouped parameters) by name")
        pairs = [(names[i], p, i) for i, p in enumerate(flat)]
    mapping = {}
    for name, p, i in pairs:
        if p.shape != views[i].shape or p.device != views[i].device:
            raise ShapeError(f"AdamWEMA: parameter {name!r}: student {tuple(p.shape)} on {p.device}, teacher "
                             f"{tuple(views[i].shape)} on {views[i].device}")
        mapping[id(p)] = (views[i], copies[i])
    return mapping


class AdamWEMA(torch.optim.Optimizer):
    """``torch.optim.AdamW`` whose step also moves an EMA teacher toward the new parameters.

    ``teacher``: a :class:`~degla_fast.ema.ReplicaTeacher` (its ``decay`` and per-parameter fp32
    state views: :class:`~degla_fast.ema.EMATeacher`; a ZeRO-3 sharded teacher has no such views).

    ``params``: parameters or groups (as for AdamW; pass ``model.named_parameters()`` or groups
    with ``param_names`` to map them to the teacher by name, otherwise they are mapped by
    position and must be all of the student's parameters, in ``model.parameters()`` order).
    ``decay``: the EMA decay (the teacher's own ``decay`` when None); per group, so it can be
    scheduled like ``lr``. ``clamp_max`` (per group, default None: no clamp): after the update
    every parameter of the group is clamped to at most this, before the teacher moves toward
    it; give ``logit_scale`` a group of its own with ``clamp_max=math.log(100)`` and the teacher
    follows the clamped temperature, as ``AdamW.step(); clamp_(); teacher.update()`` does.
    State (``step``, ``exp_avg``, ``exp_avg_sq``) is kept as AdamW keeps
    it, so ``state_dict``/``load_state_dict`` round-trip; the teacher's own state is the
    teacher's ``state_dict``.

    Semantics, equal to ``AdamW.step(); teacher.update(model)``: parameters without a gradient
    get no AdamW step (as in AdamW), but their teacher still moves toward them (as update()
    does). Teacher parameters of student parameters not in this optimiser are not touched;
    for frozen parameters that is what update() gives too (the teacher starts as an exact copy
    and lerp toward an equal value is exact). With ``forward_dtype`` the teacher's forward
    copy is written by the same pass (triton) or copied after (torch).
    """

    def __init__(self, params: Iterable, teacher: ReplicaTeacher, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 decay: float | None = None, backend: str = "auto", *, clamp_max: float | None = None,
                 amsgrad: bool = False, maximize: bool = False):
        if amsgrad or maximize:
            raise ConfigError("AdamWEMA supports neither amsgrad nor maximize")
        if not isinstance(teacher, ReplicaTeacher):
            raise ConfigError(f"AdamWEMA needs a teacher with per-parameter state views (an EMATeacher, a full "
                              f"replica); got {type(teacher).__name__}")
        decay = teacher.decay if decay is None else decay
        self.backend = check_backend(backend)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, decay=float(decay),
                        clamp_max=clamp_max, amsgrad=False, maximize=False)
        super().__init__(params, defaults)
        for group in self.param_groups:  # the defaults and every group's own values
            _check_hyperparameters(step=1, lr=group["lr"], beta1=group["betas"][0], beta2=group["betas"][1],
                                   eps=group["eps"], weight_decay=group["weight_decay"], decay=group["decay"],
                                   clamp_max=group["clamp_max"])
        self.teacher = teacher
        self._teacher_of = _map_to_teacher(self.param_groups, teacher)
        # A few address sets per group: steps alternating between gradient buffers stay prepared.
        self._launches = PlanCache(4 * len(self.param_groups))

    def __setstate__(self, state: dict) -> None:
        # load_state_dict replaces the groups by the saved ones: one saved by torch's AdamW has no decay.
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("decay", self.defaults["decay"])
            group.setdefault("clamp_max", self.defaults["clamp_max"])
            if group.get("amsgrad") or group.get("maximize"):
                raise ConfigError("AdamWEMA supports neither amsgrad nor maximize")

    def load_state_dict(self, state_dict: dict) -> None:
        # A clamp belongs to its group (logit_scale's) like its parameters do: a state saved
        # without one (torch's AdamW) keeps the clamp this optimiser was built with.
        clamps = [group["clamp_max"] for group in self.param_groups]
        super().load_state_dict(state_dict)
        for group, saved, clamp in zip(self.param_groups, state_dict["param_groups"], clamps):
            if "clamp_max" not in saved:
                group["clamp_max"] = clamp

    def _state_of(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def _teacher_for(self, params: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        pairs = []
        for p in params:
            if id(p) not in self._teacher_of:
                raise ConfigError("AdamWEMA: a parameter added after construction has no teacher parameter")
            pairs.append(self._teacher_of[id(p)])
        teachers = [t for t, _ in pairs]
        copies = [c for _, c in pairs]
        return teachers, (None if copies[0] is None else copies)

    def _follow_frozen(self, group: dict, frozen: list[torch.Tensor]) -> None:
        """Parameters without a gradient get no AdamW step, but the group's clamp and their
        teacher still move them (as clamp_() and EMATeacher.update do); rare, so the plain EMA path."""
        if group["clamp_max"] is not None:
            torch._foreach_clamp_max_(frozen, group["clamp_max"])
        teachers, copies = self._teacher_for(frozen)
        ema_update_(teachers, frozen, group["decay"], backend=self.backend)
        if copies is not None:
            with torch.no_grad():
                torch._foreach_copy_(copies, teachers)

    def _jobs(self, params: list[torch.Tensor], states: list[dict]) -> list[tuple]:
        """The prepared launches of these parameters, re-validated and re-planned only when an
        address changed (a reallocated gradient, a loaded state, ``model.to(...)``)."""
        lists = [params, [p.grad for p in params], [s["exp_avg"] for s in states],
                 [s["exp_avg_sq"] for s in states]]
        def prepare() -> list[tuple]:
            teachers, copies = self._teacher_for(params)
            _validate(lists + [teachers], copies)
            return _prepare(lists + [teachers], copies, self.backend)

        return self._launches.get(tuple(t.data_ptr() for tensors in lists for t in tensors), prepare)

    def _step_group(self, group: dict) -> None:
        trained = [p for p in group["params"] if p.grad is not None]
        if len(trained) < len(group["params"]):
            self._follow_frozen(group, [p for p in group["params"] if p.grad is None])
        if not trained:
            return
        if any(p.grad.is_sparse for p in trained):
            raise ConfigError("AdamWEMA does not support sparse gradients")
        states = [self._state_of(p) for p in trained]
        steps = [s["step"] for s in states]
        torch._foreach_add_(steps, 1.0)
        # Parameters whose gradient was missing at some step have fewer steps (as in AdamW):
        # one launch per distinct step count, usually exactly one.
        by_step: dict[float, list[int]] = {}
        for i, value in enumerate(torch.stack(steps).tolist()):
            by_step.setdefault(value, []).append(i)
        beta1, beta2 = group["betas"]
        for value, idx in by_step.items():
            hyperparameters = _check_hyperparameters(
                step=value, lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                weight_decay=group["weight_decay"], decay=group["decay"], clamp_max=group["clamp_max"])
            _run(self._jobs([trained[i] for i in idx], [states[i] for i in idx]), hyperparameters)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        """One AdamW step of every parameter with a gradient and the teacher update; returns the closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # One launch per group (per teacher dtype): lr and weight decay are kernel scalars, so a
        # schedule changing lr every step uploads nothing; models have few groups (2: decay and
        # no-decay), so per-block hyperparameter tables would save one launch at most per group.
        for group in self.param_groups:
            self._step_group(group)
        return loss
