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
moves an :class:`~degla_fast.ema.EMATeacher` as it steps.

Backends: ``triton`` (one launch per parameter group and teacher dtype,
``degla_fast.kernels.adamw_ema``; CUDA, or CPU tensors under ``TRITON_INTERPRET=1``), ``torch``
(``torch._foreach_*`` ops in the order torch's multi-tensor AdamW uses, then
:func:`~degla_fast.ema.ema_update_`: the same numbers, in several passes), ``auto`` (triton on
CUDA when Triton is importable, torch otherwise). Arithmetic is fp32.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Callable, Iterable, Sequence

import torch

from .backends import check_backend, resolve_backend
from .ema import EMATeacher, _check_decay, _torch_lerp_, ema_update_
from .errors import ConfigError, ShapeError

_CACHE_SIZE = 8
_LISTS = ("params", "grads", "exp_avgs", "exp_avg_sqs", "teachers")


# --- checks -----------------------------------------------------------------------------------

def _check_hyper(*, step: float, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
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
    values["decay"] = _check_decay(decay)
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

def _torch_adamw_(params, grads, exp_avgs, exp_avg_sqs, hyper: dict) -> None:
    """torch's multi-tensor AdamW step (``_multi_tensor_adam``), op for op, so the numbers match it."""
    lr, beta1, beta2, step = hyper["lr"], hyper["beta1"], hyper["beta2"], hyper["step"]
    if hyper["weight_decay"] != 0:
        torch._foreach_mul_(params, 1 - lr * hyper["weight_decay"])
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    step_size = (lr / (1 - beta1 ** step)) * -1
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, (1 - beta2 ** step) ** 0.5)
    torch._foreach_add_(denom, hyper["eps"])
    torch._foreach_addcdiv_(params, exp_avgs, denom, [step_size] * len(params))


def _torch_ema_(teachers, params, copies, weight: float) -> None:
    """The EMA toward ``params`` as ema_update_'s torch backend computes it, then the copies."""
    _torch_lerp_(teachers, params, weight)
    if copies is not None:
        torch._foreach_copy_(copies, teachers)


# --- triton backend ---------------------------------------------------------------------------

class _PlanCache:
    """Block layouts keyed by tensor sizes and per-tensor tables keyed by addresses (small LRUs):
    a reallocated gradient only costs a new per-tensor table."""

    def __init__(self, size: int = _CACHE_SIZE):
        self.size = size
        self._layouts: OrderedDict = OrderedDict()
        self._tables: OrderedDict = OrderedDict()

    def _get(self, cache: OrderedDict, key, build: Callable):
        value = cache.get(key)
        if value is None:
            if len(cache) >= self.size:
                cache.popitem(last=False)
            value = cache[key] = build()
        cache.move_to_end(key)
        return value

    def plan(self, streams: Sequence[Sequence[torch.Tensor]], copies: bool):
        """(layout, table) for six lists (params, grads, exp_avgs, exp_avg_sqs, teachers, copies;
        ``copies`` False: the sixth list is the teachers), or None when a tensor is not
        addressable by the kernel (non-contiguous) or of dtypes it is not compiled for."""
        from .kernels import adamw_ema as kernel

        copy_dtype = streams[5][0].dtype if copies else None
        if not kernel.supported(streams[4][0].dtype, copy_dtype) or not kernel.can_plan(*streams):
            return None
        params = streams[0]
        numels = tuple(p.numel() for p in params)
        layout = self._get(self._layouts, (params[0].device, numels),
                           lambda: kernel.build_layout(numels, params[0].device))
        key = (numels,) + tuple((ts[0].dtype,) + tuple(t.data_ptr() for t in ts) for ts in streams)
        table = self._get(self._tables, key, lambda: kernel.build_table(*streams[:5], streams[5] if copies else None))
        return layout, table


_PLANS = _PlanCache()


# --- prepared launches ------------------------------------------------------------------------

def _prepare(lists, copies, backend: str) -> list[tuple]:
    """[(plan or None, five lists, copies or None)] per (device, teacher dtype, copy dtype) group,
    empty tensors left out; plan None = torch path. Inputs already validated."""
    groups: dict = {}
    for i, p in enumerate(lists[0]):
        if not p.numel():
            continue
        copy = copies[i] if copies is not None else None
        key = (p.device, lists[4][i].dtype, None if copy is None else copy.dtype)
        five, cs = groups.setdefault(key, ([[] for _ in _LISTS], [] if copy is not None else None))
        for out, tensors in zip(five, lists):
            out.append(tensors[i])
        if copy is not None:
            cs.append(copy)
    jobs = []
    for (device, _, _), (five, cs) in groups.items():
        plan = None
        if resolve_backend(backend, device) == "triton":
            plan = _PLANS.plan(five + [cs if cs is not None else five[4]], copies=cs is not None)
        jobs.append((plan, five, cs))
    return jobs


def _run(jobs: list[tuple], hyper: dict) -> None:
    """One AdamW + EMA step of every prepared group: one kernel launch each, or the torch ops."""
    with torch.no_grad():  # no detach needed: in-place updates of leaves, as optimisers do
        for plan, five, cs in jobs:
            if plan is None:
                _torch_adamw_(*five[:4], hyper)
                if hyper["clamp_max"] is not None:
                    torch._foreach_clamp_max_(five[0], hyper["clamp_max"])
                _torch_ema_(five[4], five[0], cs, 1.0 - hyper["decay"])
                continue
            from .kernels import adamw_ema as kernel

            layout, table = plan
            bases = [ts[0] for ts in five] + [(cs or five[4])[0]]
            kernel.launch(layout, table, bases, lr=hyper["lr"], beta1=hyper["beta1"], beta2=hyper["beta2"],
                          eps=hyper["eps"], weight_decay=hyper["weight_decay"], step=hyper["step"],
                          decay=hyper["decay"], write_copy=cs is not None, clamp_max=hyper["clamp_max"])


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
    hyper = _check_hyper(step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, decay=decay,
                         clamp_max=clamp_max)
    check_backend(backend)
    _validate(lists, copies)
    _run(_prepare(lists, copies, backend), hyper)


# --- optimiser --------------------------------------------------------------------------------

def _map_to_teacher(groups: list[dict], teacher: EMATeacher) -> dict:
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
    """``torch.optim.AdamW`` whose step also moves an :class:`EMATeacher` toward the new parameters.

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

    def __init__(self, params: Iterable, teacher: EMATeacher, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 decay: float | None = None, backend: str = "auto", *, clamp_max: float | None = None,
                 amsgrad: bool = False, maximize: bool = False):
        if amsgrad or maximize:
            raise ConfigError("AdamWEMA supports neither amsgrad nor maximize")
        if not isinstance(teacher, EMATeacher):
            raise ConfigError(f"AdamWEMA needs an EMATeacher (a full replica); got {type(teacher).__name__}")
        decay = teacher.decay if decay is None else decay
        self.backend = check_backend(backend)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, decay=float(decay),
                        clamp_max=clamp_max, amsgrad=False, maximize=False)
        super().__init__(params, defaults)
        for group in self.param_groups:  # the defaults and every group's own values
            _check_hyper(step=1, lr=group["lr"], beta1=group["betas"][0], beta2=group["betas"][1], eps=group["eps"],
                         weight_decay=group["weight_decay"], decay=group["decay"], clamp_max=group["clamp_max"])
        self.teacher = teacher
        self._teacher_of = _map_to_teacher(self.param_groups, teacher)
        self._prepared: dict = {}

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
        key = tuple(t.data_ptr() for ts in lists for t in ts)
        jobs = self._prepared.get(key)
        if jobs is None:
            teachers, copies = self._teacher_for(params)
            lists.append(teachers)
            _validate(lists, copies)
            if len(self._prepared) >= 4 * len(self.param_groups):
                self._prepared.pop(next(iter(self._prepared)))
            jobs = self._prepared[key] = _prepare(lists, copies, self.backend)
        return jobs

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
            hyper = _check_hyper(step=value, lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                                 weight_decay=group["weight_decay"], decay=group["decay"], clamp_max=group["clamp_max"])
            _run(self._jobs([trained[i] for i in idx], [states[i] for i in idx]), hyper)

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
