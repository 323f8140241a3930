"""Process-group set-up for ``torchrun`` and the DeepSpeed launcher, and the few collectives
the trainer needs. A single process (no ``WORLD_SIZE`` in the environment) needs none of it.

Both launchers export ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``; the backend is NCCL on CUDA and gloo on the CPU.
"""
from __future__ import annotations

import gc
import os
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..checkpoint import cpu_copy
from ..compat.deepspeed import is_partitioned, local_fp32_fragment, local_shard, zero_dim_safe_broadcasts
from ..errors import ConfigError, DataError
from ..io import read_config_mapping


@dataclass
class DistInfo:
    """Where this process sits: ``rank`` of ``world_size``, ``local_rank`` on its node, its ``device``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(choice: str, local_rank: int) -> torch.device:
    """``auto`` -> ``cuda:LOCAL_RANK`` when CUDA is available, else ``cpu``."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' asked but no CUDA device is available (use auto or cpu)")
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def setup(device_choice: str = "auto", use_deepspeed: bool = False) -> DistInfo:
    """Join the process group the launcher describes (if any) and pick this process's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_choice, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if use_deepspeed:
            import deepspeed

            deepspeed.init_distributed(dist_backend=backend)
        else:
            dist.init_process_group(backend=backend)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def teardown() -> None:
    """Leave the process group (if joined) and end its threads before the interpreter shuts down.

    ``destroy_process_group`` only unregisters the groups; a group's threads end when its last
    reference goes. DeepSpeed caches groups in module globals (its own ``destroy_process_group``
    releases them) and its engine and optimisers hold them in reference cycles (``gc.collect``).
    Threads that live on into interpreter shutdown occasionally end a finished rank in SIGABRT.
    """
    if not dist.is_initialized():
        return
    deepspeed_comm = sys.modules.get("deepspeed.comm")
    if deepspeed_comm is not None and deepspeed_comm.is_initialized():
        deepspeed_comm.destroy_process_group()
    if dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()


def all_true(flag: bool, info: DistInfo, device: torch.device | None = None) -> bool:
    """True when ``flag`` holds on every rank (one tiny all-reduce; no-op on one process)."""
    if not info.distributed:
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=device or info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item() > 0)


def all_true_tensor(flag: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """``flag`` (a 0-d bool tensor) AND-ed over ranks, still on the device: one tiny all-reduce,
    no host read (nothing at all on one process)."""
    if not info.distributed:
        return flag
    t = flag.float().reshape(1)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t.reshape(()) > 0


def sum_across(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Element-wise sum of ``values`` over ranks (a new tensor; ``values`` itself on one process)."""
    if not info.distributed:
        return values
    values = values.clone()
    dist.all_reduce(values)
    return values


def any_true(flag: bool, info: DistInfo) -> bool:
    """True when ``flag`` holds on some rank."""
    return not all_true(not flag, info)


def gather_objects(obj: Any, info: DistInfo) -> list:
    """Every rank's ``obj`` in rank order (each rank gets the list)."""
    if not info.distributed:
        return [obj]
    out: list = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def raise_on_any_rank(error: str | None, info: DistInfo) -> None:
    """A :class:`DataError` with the first rank's ``error`` on every rank when any rank has one
    (a user error found on one rank, such as a failed write on rank 0, must not leave the others
    waiting at the next collective). One small all-gather; nothing on one process but the raise."""
    errors = [error] if not info.distributed else gather_objects(error, info)
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise DataError(first)


def read_deepspeed_config(path: str, *, micro_batch: int, world_size: int, max_grad_norm: float) -> dict:
    """The DeepSpeed JSON config at ``path`` with the trainer-owned keys filled in.

    Batch-size keys are set from the trainer's batch size (``"auto"`` or absent; a different
    explicit value is an error, one source of truth); ``gradient_clipping`` comes from
    ``optim.max_grad_norm`` (0 = off) where the file says ``"auto"`` or nothing (DeepSpeed's
    own default would clip at 1.0). ZeRO-1/2 without clipping get ``compute_grad_norm: false``
    (unless the file says otherwise): the norm's host read per step is then gone. The forward's autocast is
    the trainer's (``precision``); the file's ``fp16``/``bf16`` sections choose the engine's weights.
    """
    cfg = read_config_mapping(path, "deepspeed")
    wanted = {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": 1,
              "train_batch_size": micro_batch * world_size}
    for key, value in wanted.items():
        if cfg.get(key, "auto") not in ("auto", value):
            raise ConfigError(f"deepspeed: {path}: {key} is {cfg[key]!r} but the trainer needs {value} "
                              "(set the batch size with data.batch_size / --batch-size; use \"auto\" here)")
        cfg[key] = value
    stage = cfg.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"deepspeed: {path}: zero_optimization.stage {stage!r} is not one of 0, 1, 2, 3")
    if cfg.get("gradient_clipping", "auto") == "auto":
        # Always explicit: DeepSpeed's own default clips at norm 1.0.
        cfg["gradient_clipping"] = float(max_grad_norm)
    cfg.setdefault("steps_per_print", 10**9)  # the trainer logs; keep DeepSpeed quiet
    zero = cfg.get("zero_optimization", {})
    if stage in (1, 2) and not cfg["gradient_clipping"] and not zero.get("offload_optimizer"):
        # Without clipping the norm is only read back to find overflow on the host (a sync per
        # step); the trainer finds non-finite steps on the device itself.
        zero.setdefault("compute_grad_norm", False)
    return cfg


def zero_stage(ds_config: dict | None) -> int:
    """The ZeRO stage a DeepSpeed config asks for (0 without DeepSpeed)."""
    return int((ds_config or {}).get("zero_optimization", {}).get("stage", 0))


# ---------------------------------------------------------------- DeepSpeed


def wrap_deepspeed(student: torch.nn.Module, optimizer: torch.optim.Optimizer, ds_config: dict):
    """The DeepSpeed engine around ``student`` with the trainer's AdamW (every rank calls this).

    The learning-rate schedule stays with the trainer (stepped once per applied step), so the
    engine gets none. Under ZeRO-3 the engine partitions ``student``'s parameters in place.
    """
    import deepspeed

    if zero_stage(ds_config) == 3:
        mark_zero3_leaves(student)
    with zero_dim_safe_broadcasts():
        engine, _, _, _ = deepspeed.initialize(model=student, optimizer=optimizer, config=ds_config)
    return engine


def mark_zero3_leaves(module: torch.nn.Module) -> None:
    """Make ZeRO-3 gather each ``nn.MultiheadAttention`` whole around its forward.

    Its forward reads ``out_proj.weight`` directly instead of calling ``out_proj``, so ZeRO-3's
    per-module hooks would leave that weight partitioned; a leaf module's hooks gather every
    parameter below it.
    """
    from deepspeed.utils import set_z3_leaf_modules

    if any(isinstance(m, torch.nn.MultiheadAttention) for m in module.modules()):
        set_z3_leaf_modules(module, [torch.nn.MultiheadAttention])


def clamp_logit_scale_deepspeed(student: torch.nn.Module, maximum: float) -> None:
    """``student.logit_scale <= maximum`` in the engine's fp32 master copy and in the model's own
    (possibly partitioned, possibly 16-bit) copy. A collective under ZeRO-3: every rank calls it."""
    param = student.logit_scale
    with torch.no_grad():
        # The rank's own piece of the fp32 master copy, clamped in place: no gather and no host
        # read (the value is never compared on the host).
        if is_partitioned(param):  # ZeRO-3: this rank's slice of the flat fp32 partition
            from deepspeed.utils import safe_get_local_fp32_param

            master = safe_get_local_fp32_param(param)
        else:  # ZeRO-1/2: the fragment this rank's partition holds (None: another rank's)
            master = local_fp32_fragment(param)
        if master is not None:
            master.clamp_(max=maximum)
        # Under ZeRO-3 the local shard is its own tensor (padding on ranks that hold none: clamping is
        # harmless), and param.data the gathered copy the forward reads: a persisted parameter
        # (logit_scale is far below stage3_param_persistence_threshold) stays gathered between
        # steps, and the engine's step has just re-gathered it from the unclamped shards, so it
        # is clamped too (an empty placeholder when the parameter is released). The EMA teacher's
        # logit_scale is an average of these clamped values (tests/ema_zero3_worker.py checks both).
        if is_partitioned(param):
            local_shard(param).clamp_(max=maximum)
        param.data.clamp_(max=maximum)


def full_state_dict(module: torch.nn.Module, info: DistInfo) -> dict | None:
    """``module``'s complete state dict on CPU on rank 0 (None elsewhere), parameters from the
    engine's fp32 master copy where it keeps one. A collective: every rank calls it."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    params = dict(module.named_parameters())
    # GatheredParameters only gathers ZeRO-3 partitions; it is a no-op for other stages.
    with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
        state = cpu_copy(module.state_dict()) if info.is_main else None
    for name, param in params.items():
        master = safe_get_full_fp32_param(param)
        if master is not None and state is not None:
            state[name] = master.detach().reshape(state[name].shape).to("cpu", copy=True)
    return state
