"""Count what a piece of code asks of the device, on the CPU: kernel launches and host reads.

``with DeviceWork() as work: ...`` records

* ``work.launches``: every ATen op that runs a kernel (views, allocations and metadata ops do
  not; on a GPU each of the others is at least one launch) plus every Triton kernel launch
  (through the interpreter's ``run``), as names in order;
* ``work.allocations``: the bytes of every tensor an op creates (``empty`` and its kin, and the
  results of ops that write no argument and return no view: ``mm`` without ``out=``...), in order;
* ``work.host_reads``: every read of a device value on the host: ATen's
  ``_local_scalar_dense`` (``item``, ``float()``, ``int()``, ``bool()``), the ops whose output
  size depends on the data (``nonzero``, ``masked_select``, ``unique``...; on a GPU they wait
  for the device) and ``Tensor.tolist``/``numpy``/``cpu`` calls.

ATen ops are seen through a ``TorchDispatchMode``, which (unlike a ``TorchFunctionMode``) also
sees the ops of custom autograd Functions' backward passes.
"""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

#: Ops that launch nothing: allocations and shape/metadata ops (views are found by their schema).
NO_KERNEL = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "detach", "alias", "lift_fresh",
             "_to_copy_noop", "is_same_size", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "size",
             "stride", "dim", "set_", "resize_", "_has_compatible_shallow_copy_type", "record_stream", "promote_types"}
#: Ops that return one of their inputs or metadata, never a new tensor.
NOT_ALLOCATING = NO_KERNEL - {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided"}
#: Ops whose result size depends on the data: the host waits for the device.
DATA_DEPENDENT = {"nonzero", "masked_select", "unique", "_unique", "_unique2", "unique_dim", "unique_consecutive",
                  "repeat_interleave", "bincount", "_local_scalar_dense", "is_nonzero", "equal", "allclose"}
# (``item`` is not among them: the dispatch mode sees its ``_local_scalar_dense``.)
_HOST_METHODS = ("tolist", "numpy", "cpu")


class DeviceWork(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.launches: list[str] = []
        self.host_reads: list[str] = []
        self.allocations: list[int] = []
        self._patched = []
        self._in_kernel = 0  # the interpreter's own copies of a kernel's arguments are not ours

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if self._in_kernel:
            pass
        elif name in DATA_DEPENDENT:
            self.host_reads.append(name)
        elif not (func.is_view or name in NO_KERNEL or name.startswith("_") and name.endswith("_view")):
            self.launches.append(name)
        out = func(*args, **(kwargs or {}))
        writes = any(a.alias_info is not None and a.alias_info.is_write for a in func._schema.arguments)
        if not (self._in_kernel or func.is_view or writes or name in NOT_ALLOCATING):
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(t, torch.Tensor):
                    self.allocations.append(t.numel() * t.element_size())
        return out

    def __enter__(self):
        from triton.runtime.interpreter import InterpretedFunction

        real_run = InterpretedFunction.run
        work = self

        def run(fn, *args, **kwargs):
            work.launches.append(f"triton:{fn.fn.__name__}")
            work._in_kernel += 1
            try:
                return real_run(fn, *args, **kwargs)
            finally:
                work._in_kernel -= 1

        self._patched.append((InterpretedFunction, "run", real_run))
        InterpretedFunction.run = run
        for method in _HOST_METHODS:
            real = getattr(torch.Tensor, method)

            def read(t, *args, _real=real, _name=method, **kwargs):
                self.host_reads.append(_name)
                return _real(t, *args, **kwargs)

            self._patched.append((torch.Tensor, method, real))
            setattr(torch.Tensor, method, read)
        return super().__enter__()

    def __exit__(self, *exc):
        for owner, name, real in reversed(self._patched):
            setattr(owner, name, real)
        self._patched.clear()
        return super().__exit__(*exc)
