"""Shims into DeepSpeed internals (ZeRO start-up broadcasts, ZeRO-1/2 fragments, ZeRO-3 partitions and caches).

Written against DeepSpeed 0.16 to 0.19 (checked on 0.19.8; ``setup.py`` bounds the extra to
``<0.20``). Nothing here imports DeepSpeed at module level: it is an optional extra.
"""
from __future__ import annotations

import contextlib
import sys
import warnings

import torch

from ._versions import missing, version_tuple

#: The DeepSpeed releases these shims were written and tested against: [low, high).
WRITTEN_FOR = ((0, 16), (0, 20))


def _version() -> str:
    import deepspeed

    return deepspeed.__version__


def written_for(version: str | None = None) -> bool:
    """Whether DeepSpeed ``version`` (the installed one by default) is in :data:`WRITTEN_FOR`."""
    low, high = WRITTEN_FOR
    return low <= version_tuple(version or _version())[:2] < high


def _warn_outside_range() -> None:
    """One warning when the installed DeepSpeed is outside :data:`WRITTEN_FOR`: the patched
    methods below copy DeepSpeed's bodies, which a later minor release may change (the
    attribute checks catch a removal, not a change of what the method does)."""
    if not written_for():
        low, high = WRITTEN_FOR
        warnings.warn(f"degla_fast.compat.deepspeed: DeepSpeed {_version()} is outside the versions its shims were "
                      f"written for (>={'.'.join(map(str, low))},<{'.'.join(map(str, high))})", RuntimeWarning,
                      stacklevel=3)


@contextlib.contextmanager
def zero_dim_safe_broadcasts():
    """Within: DeepSpeed's start-up parameter broadcasts work for 0-d parameters.

    DeepSpeed broadcasts each parameter as a byte view (``p.data.view(torch.uint8)``), which
    fails for 0-d tensors such as open_clip's ``logit_scale``; the same broadcast of a 1-d view
    of the parameter works. Patches the two private methods that do it
    (``DeepSpeedEngine._broadcast_model`` at engine start-up, ``Init._zero_init_param`` in
    ZeRO-3 partitioning, which the EMA teacher's partitioning goes through too) and restores
    them; DeepSpeed has no option for it. With either method gone, a RuntimeError naming the
    DeepSpeed version; outside :data:`WRITTEN_FOR`, a RuntimeWarning.
    """
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.zero.partition_parameters import Init

    _warn_outside_range()
    for owner, name in ((DeepSpeedEngine, "_broadcast_model"), (Init, "_zero_init_param"),
                        (Init, "_convert_to_deepspeed_param")):
        if not callable(getattr(owner, name, None)):
            raise missing("DeepSpeed", _version(), "deepspeed.zero_dim_safe_broadcasts", f"{owner.__name__}.{name}")
    saved = DeepSpeedEngine._broadcast_model, Init._zero_init_param
    DeepSpeedEngine._broadcast_model, Init._zero_init_param = _broadcast_model, _zero_init_param
    try:
        yield
    finally:
        DeepSpeedEngine._broadcast_model, Init._zero_init_param = saved


def broadcast_src_rank() -> int:
    """The global rank the engine's start-up broadcast reads from: DeepSpeed's private
    ``groups._get_broadcast_src_rank()`` (its data-parallel group's first rank), which the
    replaced ``_broadcast_model`` uses; there is no public accessor."""
    from deepspeed.utils import groups

    get = getattr(groups, "_get_broadcast_src_rank", None)
    if get is None:
        raise missing("DeepSpeed", _version(), "deepspeed.broadcast_src_rank", "groups._get_broadcast_src_rank")
    return get()


def _broadcast_model(engine) -> None:
    """Rank 0's replicated parameters to every rank (stands in for ``DeepSpeedEngine._broadcast_model``)."""
    from deepspeed import comm
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    if engine.dist_backend is None:
        return
    for param in engine.module.parameters():
        if hasattr(param, "ds_status") and param.ds_status is not ZeroParamStatus.AVAILABLE:
            continue  # a ZeRO-3 partition: nothing replicated to broadcast
        comm.broadcast(param.data.view(-1), broadcast_src_rank(), group=engine.seq_data_parallel_group)


def _zero_init_param(self, param) -> None:
    """``Init._zero_init_param`` with a 1-d view in the broadcast: rank 0's values, then partition."""
    from deepspeed import comm

    self._convert_to_deepspeed_param(param)
    group = self.get_partition_dp_group(param)
    src = 0 if comm.get_world_group() == group else comm.get_global_rank(group, 0)
    comm.broadcast(param.data.view(-1), src, group)
    param.partition()


def local_fp32_fragment(param: torch.nn.Parameter) -> torch.Tensor | None:
    """Under ZeRO-1/2: the piece of ``param``'s fp32 master copy this rank's partition holds
    (a view, writable), None when another rank holds it or the parameter has no master.

    Reads ``param._hp_mapping`` (DeepSpeed's link from a 16-bit parameter to its fp32
    fragment): ``deepspeed.utils.safe_get_local_fp32_param`` is the public reader but serves
    ZeRO-3 only, and ``safe_get_full_fp32_param`` gathers (a collective, and a copy). Without
    the attribute (not a ZeRO-1/2 parameter) the documented fallback is None: nothing to write.
    """
    mapping = getattr(param, "_hp_mapping", None)
    return mapping.get_hp_fragment() if mapping is not None else None


def allgather_stream(coordinator):
    """The CUDA stream a ZeRO-3 parameter coordinator gathers (and prefetches) on with
    ``overlap_comm``, or None.

    Reads the name-mangled ``PartitionedParameterCoordinator.__allgather_stream``: DeepSpeed
    exposes no accessor, and a teacher that writes its shards outside DeepSpeed's optimiser
    must order that stream after its writes. Documented fallback when it is gone (or on the
    CPU): None, and the caller orders nothing (DeepSpeed then gathers on the current stream).
    """
    stream = getattr(coordinator, "_PartitionedParameterCoordinator__allgather_stream", None)
    return stream if hasattr(stream, "wait_stream") else None


def release_zero3_module(module: torch.nn.Module) -> None:
    """Drop DeepSpeed's last references to a ZeRO-3 ``module`` once its hooks are removed.

    Two module-level holders outlive ``destroy()`` (DeepSpeed 0.19): ``DeepSpeedZeRoOffload``
    (the engine's and :class:`~degla_fast.ema.ShardedEMATeacher`'s) pushes its top module onto
    ``FWD_MODULE_STACK`` and never pops it, and a class-level cache keeps every module it saw.
    Through them the modules, their partitioned parameters and the process groups those carry
    would outlive the run (and the groups' threads meet interpreter shutdown, where a finished
    rank can abort). DeepSpeed has no public release for either. Documented fallback where
    either holder is gone: nothing is released there (memory held until exit, results unchanged).
    """
    offload = sys.modules.get("deepspeed.runtime.zero.parameter_offload")
    stack = getattr(offload, "FWD_MODULE_STACK", None)
    if stack:
        stack[:] = [m for m in stack if m is not module]
    cache = params_to_release_cache()
    if cache is not None:
        # Clearing it costs the engines still running one recomputation per module.
        cache.cache_clear()


def params_to_release_cache():
    """The ``functools.lru_cache`` behind ``PartitionedParameterCoordinator.__params_to_release``
    (keys: coordinators and modules, held for ever), or None when DeepSpeed is not loaded or no
    longer has it. The method is name-mangled and wrapped in an NVTX decorator: this walks the
    decorators' closures (at most three deep) to the cache."""
    coordinator = sys.modules.get("deepspeed.runtime.zero.partitioned_param_coordinator")
    fn = getattr(getattr(coordinator, "PartitionedParameterCoordinator", None),
                 "_PartitionedParameterCoordinator__params_to_release", None)
    for _ in range(3):  # through the decorators' closures to the cache
        if fn is None or hasattr(fn, "cache_clear"):
            break
        fn = next((c.cell_contents for c in (getattr(fn, "__closure__", None) or ()) if callable(c.cell_contents)), None)
    return fn if fn is not None and hasattr(fn, "cache_clear") else None


# ---------------------------------------------------------------- ZeRO-3 partitions
# What the sharded EMA teacher (degla_fast.ema.sharded) and the trainer's logit_scale clamp read
# of ZeRO-3's partitioned parameters and optimiser. DeepSpeed converts each parameter in place
# (``Init._convert_to_deepspeed_param``), adding ``ds_*`` attributes and methods that it
# documents nowhere; its public readers (``safe_get_local_fp32_param`` and the like) serve one
# parameter at a time and copy, where the teacher needs the flat partitions as they are.


def _ds_attr(obj, name: str, shim: str):
    """``obj.name``, or the one-line error of shim ``shim`` when DeepSpeed no longer sets it."""
    value = getattr(obj, name, None)
    if value is None:
        raise missing("DeepSpeed", _version(), f"deepspeed.{shim}", f"{type(obj).__name__}.{name}")
    return value


def is_partitioned(param: torch.Tensor) -> bool:
    """Whether ``param`` is a ZeRO-3 partitioned parameter (its shard in ``param.ds_tensor``)."""
    return hasattr(param, "ds_tensor")


def local_shard(param: torch.nn.Parameter) -> torch.Tensor:
    """This rank's shard of a ZeRO-3 parameter (``param.ds_tensor``, flat; padded with zeros on
    the last ranks): written in place, it is what the next gather reads."""
    return _ds_attr(param, "ds_tensor", "local_shard")


def set_local_shard(param: torch.nn.Parameter, shard: torch.Tensor) -> None:
    """Make ``shard`` (flat, the shard's size) this rank's partition of ``param``: the next
    gather reads it. Rebinds ``ds_tensor.data``, as DeepSpeed's own optimiser does to place the
    partitions in its flat buffers."""
    local_shard(param).data = shard


def shard_numel(param: torch.nn.Parameter) -> int:
    """How many elements of ``param`` each rank's shard holds (``param.partition_numel()``)."""
    return _ds_attr(param, "partition_numel", "shard_numel")()


def shard_rank(param: torch.nn.Parameter) -> int:
    """Which slice of the full parameter this rank's shard is (``ds_zero_partition_rank``)."""
    return _ds_attr(param, "ds_zero_partition_rank", "shard_rank")


def full_shape(param: torch.nn.Parameter) -> torch.Size:
    """The unpartitioned shape of a ZeRO-3 parameter (``ds_shape``; ``param.shape`` is empty)."""
    return _ds_attr(param, "ds_shape", "full_shape")


def full_numel(param: torch.nn.Parameter) -> int:
    """The unpartitioned element count of a ZeRO-3 parameter (``ds_numel``)."""
    return _ds_attr(param, "ds_numel", "full_numel")


def shard_group(param: torch.nn.Parameter):
    """The process group a ZeRO-3 parameter is partitioned over (``ds_process_group``)."""
    return _ds_attr(param, "ds_process_group", "shard_group")


def master_partitions(optimizer) -> list[torch.Tensor] | None:
    """A ZeRO-3 optimiser's fp32 master partitions, one flat tensor per parameter group
    (``DeepSpeedZeroOptimizer_Stage3.fp32_partitioned_groups_flat``; re-read after a checkpoint
    load, which may swap them), or None when ``optimizer`` has none (not ZeRO-3)."""
    masters = getattr(optimizer, "fp32_partitioned_groups_flat", None)
    return None if masters is None else list(masters)


def partitioned_groups(optimizer) -> list[list[torch.nn.Parameter]]:
    """The parameters of each of a ZeRO-3 optimiser's groups, in the order their shards sit in
    the group's master partition (``fp16_groups``)."""
    return [list(group) for group in _ds_attr(optimizer, "fp16_groups", "partitioned_groups")]


def offloads_optimizer(optimizer) -> bool:
    """Whether a ZeRO-3 optimiser keeps its fp32 partitions off the device (cpu/nvme offload)."""
    return bool(getattr(optimizer, "offload_optimizer", False))


def partition_like_engine(engine, module: torch.nn.Module):
    """Partition ``module`` (unpartitioned, the engine's model's architecture) as ``engine``
    partitions its own and register the gather/release hooks for its forward, with the engine's
    ZeRO-3 gather settings. Returns the ``DeepSpeedZeRoOffload`` holding the hooks (its
    ``destroy()`` removes them).

    ``DeepSpeedZeRoOffload`` is what the engine builds for its own model; DeepSpeed has no public
    way to partition a second, frozen model with hooks but no optimiser.
    """
    try:
        from deepspeed.runtime.zero.parameter_offload import DeepSpeedZeRoOffload
        from deepspeed.utils.timer import NoopTimer
    except ImportError as err:
        raise missing("DeepSpeed", _version(), "deepspeed.partition_like_engine",
                      f"DeepSpeedZeRoOffload or NoopTimer ({err})") from None
    _warn_outside_range()
    return DeepSpeedZeRoOffload(
        module, timers=NoopTimer(), ds_config=engine.config, overlap_comm=engine.zero_overlap_comm(),
        prefetch_bucket_size=engine.zero_prefetch_bucket_size(),
        max_reuse_distance=engine.zero_max_reuse_distance(),
        max_live_parameters=engine.zero_max_live_parameters(),
        param_persistence_threshold=engine.zero_param_persistence_threshold(),
        model_persistence_threshold=engine.zero_model_persistence_threshold(), mpu=engine.mpu)


def persisted_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters of a partitioned ``module`` that ZeRO-3 keeps gathered between forwards
    (``ds_persist``: at or below ``stage3_param_persistence_threshold``), in ``ds_id`` order
    (the same list on every rank)."""
    persisted = [p for p in module.parameters() if getattr(p, "ds_persist", False)]
    return sorted(persisted, key=lambda p: _ds_attr(p, "ds_id", "persisted_parameters"))


def regather(module: torch.nn.Module, params: list[torch.nn.Parameter]) -> None:
    """Re-gather ``params`` (persisted parameters of ``module``) from their current shards: a
    prefetch still in flight is waited for, stale gathered copies are dropped, then one
    coalesced all-gather. A collective: every rank calls it with the same list. What
    DeepSpeed's own optimiser step does for the student's persisted parameters."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    if not params:
        return
    registry = _ds_attr(module, "ds_inflight_param_registry", "regather")
    for p in params:  # a prefetch still in flight (overlap_comm on an accelerator)
        if p in registry:
            registry.pop(p).wait()
    available = [p for p in params if p.ds_status == ZeroParamStatus.AVAILABLE]
    with torch.no_grad():
        if available:  # drop the stale gathered copies; the shards hold the new values
            available[0].partition(param_list=available, has_been_updated=False)
        params[0].all_gather_coalesced(params).wait()
