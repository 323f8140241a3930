"""The :class:`~degla_fast.ema.Teacher` protocol as EMATeacher meets it (ShardedEMATeacher's
half is checked on two processes in tests/ema_zero3_worker.py): state_dict is exactly what a
checkpoint stores, load_state_dict takes it back, close is a no-op."""
from __future__ import annotations

import torch

from degla_fast.ema import EMATeacher, ShardedEMATeacher, Teacher


class _WithScratch(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 2)
        self.register_buffer("scratch", torch.zeros(2), persistent=False)
        self.register_buffer("count", torch.tensor(3.0))


def test_both_teachers_declare_the_protocol():
    names = {"update", "state_dict", "load_state_dict", "close"}
    for cls in (EMATeacher, ShardedEMATeacher):
        assert names <= set(dir(cls)), cls


def test_replica_state_dict_is_the_checkpoints_and_round_trips():
    student = _WithScratch()
    teacher = EMATeacher(student, decay=0.5, backend="torch", forward_dtype=torch.bfloat16)
    assert isinstance(teacher, Teacher) and teacher.forward_dtype == torch.bfloat16
    with torch.no_grad():
        student.lin.weight.add_(1.0)
    teacher.update(student)
    state = teacher.state_dict()
    assert list(state) == list(teacher.module.state_dict())  # no non-persistent buffer
    assert all(v.device.type == "cpu" and v.dtype == torch.float32 for v in state.values())
    assert all(v.data_ptr() != teacher.flat.data_ptr() for v in state.values())  # copies, not views
    other = EMATeacher(_WithScratch(), decay=0.5, backend="torch", forward_dtype=torch.bfloat16)
    other.load_state_dict(state)
    for key, value in other.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert other.close() is None
