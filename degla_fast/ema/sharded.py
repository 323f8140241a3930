"""The ZeRO-3 EMA teacher: :class:`ShardedEMATeacher`, partitioned exactly like the student.

Each rank keeps fp32 EMA shards laid out like the engine's fp32 master partitions and lerps
them toward those masters with no communication; with ``forward_dtype`` a 16-bit copy of the
shards is what DeepSpeed gathers for the teacher's forward. Small parameters that ZeRO-3 keeps
gathered are refreshed after every update. Every DeepSpeed internal it needs (the optimiser's
partitions, the parameters' shards, the gather hooks) is reached through
:mod:`degla_fast.compat.deepspeed`; DeepSpeed itself is imported only there, when a teacher is built.
"""
from __future__ import annotations

import torch

from ..checkpoint import cpu_copy
from ..compat.deepspeed import (allgather_stream, full_numel, full_shape, local_shard, master_partitions,
                                offloads_optimizer, partition_like_engine, partitioned_groups, persisted_parameters,
                                regather, release_zero3_module, set_local_shard, shard_group, shard_numel, shard_rank)
from ..errors import ConfigError, ShapeError
from .state import flat_views, teacher_settings
from .update import Launch, Updater, validate_pairs


def _master_partitions(engine) -> tuple:
    """``(optimizer, fp32 master partitions)`` of a ZeRO-3 engine, or a ConfigError."""
    optimizer = getattr(engine, "optimizer", None)
    masters = master_partitions(optimizer)
    if masters is None:
        raise ConfigError("ShardedEMATeacher needs a ZeRO-3 engine with an optimizer (fp32 master partitions)")
    if any(m.numel() == 0 for m in masters) or offloads_optimizer(optimizer):
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
        shape = tuple(full_shape(student_params[name]))
        if tuple(p.shape) != shape:
            raise ShapeError(f"ShardedEMATeacher: {name}: teacher shape {tuple(p.shape)} != student shape {shape}")


def _place(teacher_module: torch.nn.Module, student: torch.nn.Module, device, *, gather_dtype: torch.dtype) -> None:
    """The unpartitioned teacher on ``device``, frozen, in eval mode, its parameters in the dtype
    they are partitioned (and so gathered) in, its buffers copies of the student's."""
    teacher_module.to(device=device).requires_grad_(False).eval()
    with torch.no_grad():
        for p in teacher_module.parameters():  # partitioned (and so gathered) in the forward's dtype;
            p.data = p.data.to(gather_dtype)   # buffers stay as the student's, as in EMATeacher
        for (_, t_buf), (_, s_buf) in zip(teacher_module.named_buffers(), student.named_buffers()):
            t_buf.data = s_buf.detach().clone()


class ShardedEMATeacher:
    """ZeRO-3 EMA teacher: partitioned exactly like the student, its EMA with no communication.

    Each rank keeps, per optimiser parameter group, an fp32 teacher shard laid out like the
    engine's fp32 master partition of that group (:attr:`shards`, the EMA state); ``update()``
    lerps the one toward the other in one pass. With ``forward_dtype`` (bf16/fp16) the same pass
    also writes a 16-bit copy of each shard (:attr:`forward_shards`), and the module's ZeRO-3
    partitions (each parameter's local shard) are views of those copies: DeepSpeed's hooks gather the
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

    #: The EMA state's dtype: always fp32.
    dtype = torch.float32

    def __init__(self, engine, teacher_module: torch.nn.Module, *, decay: float = 0.9996, backend: str = "auto",
                 forward_dtype: torch.dtype | None = None):
        self.decay, self.backend, self.forward_dtype = teacher_settings(decay, backend, forward_dtype)
        optimizer, masters = _master_partitions(engine)
        student = engine.module
        _check_same_parameters(student, teacher_module)
        device = masters[0].device
        _place(teacher_module, student, device, gather_dtype=self.forward_dtype or self.dtype)
        # Same world size and shapes as the student's: the same shards.
        self._offload = partition_like_engine(engine, teacher_module)
        self.module = teacher_module
        #: The parameters kept gathered between forwards (refreshed by every update), the same order on every rank.
        self.persisted = persisted_parameters(teacher_module)
        # One fp32 buffer for the EMA state of all groups and, with a forward dtype, one of that
        # dtype with the same layout: the update writes both with one table.
        sizes = [torch.Size([m.numel()]) for m in masters]
        self._flat, self._shards = flat_views(sizes, self.dtype, device)
        self._forward_flat, self._forward_shards = self._flat, self._shards
        if self.forward_dtype is not None:
            self._forward_flat, self._forward_shards = flat_views(sizes, self.forward_dtype, device)
        self._names = self._seed_shards(optimizer, masters, student)
        self._optimizer, self._updater = optimizer, Updater(self.backend)
        self._jobs = self._prepare()

    def _seed_shards(self, optimizer, masters: list[torch.Tensor], student: torch.nn.Module) -> dict:
        """Copy the engine's fp32 masters into the shards (and forward copies), make the teacher's
        partitions views of the forward shards and copy frozen student partitions as they are.
        Returns ``{teacher parameter name: (group index, offset, partition numel)}`` (for state_dict)."""
        names = {id(p): n for n, p in student.named_parameters()}
        teacher_params = dict(self.module.named_parameters())
        layout = {}
        with torch.no_grad():
            groups = partitioned_groups(optimizer)
            for g, (group, master) in enumerate(zip(groups, masters)):
                self._shards[g].copy_(master.detach())
                if self._forward_flat is not self._flat:
                    self._forward_shards[g].copy_(self._shards[g])
                offset = 0
                for p in group:
                    t = teacher_params[names[id(p)]]
                    n = shard_numel(p)
                    if local_shard(t).numel() != n:
                        raise ShapeError(f"ShardedEMATeacher: {names[id(p)]}: teacher shard {local_shard(t).numel()} "
                                         f"elements, student shard {n}")
                    set_local_shard(t, self._forward_shards[g].narrow(0, offset, n))
                    layout[names[id(p)]] = (g, offset, n)
                    offset += n
            grouped = {id(p) for group in groups for p in group}
            for name, p in student.named_parameters():  # frozen student parameters: a constant EMA
                if id(p) not in grouped:
                    local_shard(teacher_params[name]).copy_(local_shard(p))
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

    def _prepare(self) -> list[Launch]:
        # Re-read each step: a checkpoint load may swap the engine's master tensors.
        self._masters = master_partitions(self._optimizer)
        self._master_ptrs = [m.data_ptr() for m in self._masters]
        validate_pairs(self._shards, self._masters)
        copy_of = (self._flat, self._forward_flat) if self._forward_flat is not self._flat else None
        return self._updater.prepare(self._shards, self._masters, copy_of=copy_of)

    def update(self, student_module: torch.nn.Module | None = None, apply: torch.Tensor | None = None) -> None:
        """Lerp this rank's teacher shards toward its fp32 master shards (``student_module`` is not
        read), writing the forward copy in the same pass, then refresh the persisted parameters
        (a collective when some are persisted: every rank calls it).
        ``apply``: as for :meth:`EMATeacher.update` (0 leaves the shards unchanged)."""
        if [m.data_ptr() for m in master_partitions(self._optimizer)] != self._master_ptrs:
            self._jobs = self._prepare()
        Updater.run(self._jobs, 1.0 - self.decay, apply)
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
        regather(self.module, self.persisted)

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
        group = shard_group(next(iter(params.values()))) if params else None
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
                shard = local_shard(p)
                parts = [torch.empty_like(shard) for _ in range(world)]
                dist.all_gather(parts, shard.contiguous(), group=group)
                full = torch.cat(parts).to(self.dtype)
            state[name] = full[: full_numel(p)].reshape(full_shape(p))  # cpu_copy below copies it once
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
                    target = local_shard(p)
                    n = target.numel()
                full = state_dict[name].reshape(-1).to(device=target.device, dtype=target.dtype)
                rank = shard_rank(p)
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
