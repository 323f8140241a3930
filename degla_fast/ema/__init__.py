"""EMA teacher of the DeGLA self-distillation: ``teacher += (1 - decay) * (student - teacher)``.

The public surface::

    from degla_fast.ema import EMATeacher, ShardedEMATeacher, Teacher, ema_update_

- :func:`ema_update_` (:mod:`.update`): lists of tensors updated in place in one pass over memory.
- :class:`EMATeacher` (:mod:`.replicated`): a full teacher copy of a student module, its
  parameters views of one flat fp32 buffer; :meth:`EMATeacher.from_deepspeed` builds the
  teacher of a DeepSpeed engine (this replica under ZeRO-0/1/2, a :class:`ShardedEMATeacher`
  under ZeRO-3).
- :class:`ShardedEMATeacher` (:mod:`.sharded`): the ZeRO-3 teacher, partitioned like the student.
- :class:`Teacher` and :class:`ReplicaTeacher` (:mod:`.teacher`): what the trainer, and the fused
  AdamW + EMA optimiser, use of a teacher.

The EMA state is always fp32; 16-bit teacher weights are only a forward copy of it
(``forward_dtype``), written by the same pass (:mod:`.state` says why).
"""
from __future__ import annotations

from .replicated import EMATeacher
from .sharded import ShardedEMATeacher
from .teacher import ReplicaTeacher, Teacher
from .update import check_decay, ema_update_

__all__ = ["EMATeacher", "ReplicaTeacher", "ShardedEMATeacher", "Teacher", "check_decay", "ema_update_"]
