"""The checkpoint folder's files: pruning never deletes what ``latest`` names, a failed write is
one line and leaves the previous checkpoint and ``latest`` as they were, torn temporaries of a
killed run can be removed, and a non-UTF-8 configuration file is one line."""
from __future__ import annotations

import errno

import pytest
import torch

from degla_fast.errors import ConfigError, DataError
from degla_fast.io import read_config_mapping
from degla_fast import checkpoint as ckpt


def _payload(step):
    return {"model_name": "degla-tiny", "student": {"w": torch.full((2,), float(step))}, "optimizer": {},
            "step": step, "epoch": 0, "batch": step, "rng": [ckpt.rng_state()]}


def _names(folder):
    return sorted(p.name for p in folder.iterdir())


def test_pruning_never_deletes_the_checkpoint_latest_names(tmp_path):
    # An older run in the same folder got further: its step numbers are higher than ours.
    for step in (5, 6, 7):
        ckpt.save_checkpoint(tmp_path, _payload(step), keep_last=3)
    path = ckpt.save_checkpoint(tmp_path, _payload(2), keep_last=3)
    assert path.exists() and ckpt.latest_name(tmp_path) == "step_00000002.pt"
    assert ckpt.resolve_checkpoint(tmp_path) == path
    assert ckpt.load_checkpoint(path)["step"] == 2
    # ordinary pruning is unchanged
    for step in (8, 9, 10):
        ckpt.save_checkpoint(tmp_path, _payload(step), keep_last=2)
    assert _names(tmp_path) == ["latest", "step_00000009.pt", "step_00000010.pt"]


@pytest.mark.parametrize("failure", ["disk full (OSError)", "disk full (torch.save)", "folder is a file"])
def test_a_failed_checkpoint_write_is_one_line_and_keeps_the_previous_one(failure, tmp_path, monkeypatch):
    folder = tmp_path / "checkpoints"
    first = ckpt.save_checkpoint(folder, _payload(1), keep_last=3)
    before = {name: (folder / name).read_bytes() for name in _names(folder)}
    if failure == "folder is a file":
        folder = tmp_path / "file"
        folder.write_text("x")
        expected = f"cannot write {folder / 'step_00000002.pt'}: {folder} is a file, not a folder"
    else:
        def full(obj, handle):
            handle.write(b"PK partial")
            if "OSError" in failure:
                raise OSError(errno.ENOSPC, "No space left on device")
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0\n"
                               "PytorchStreamWriter failed writing file data/0: file write failed")

        monkeypatch.setattr(torch, "save", full)
        expected = f"cannot write {folder / 'step_00000002.pt'}: " + (
            "No space left on device" if "OSError" in failure else "the write failed (is the disk full?)")
    with pytest.raises(DataError) as caught:
        ckpt.save_checkpoint(folder, _payload(2), keep_last=3)
    assert str(caught.value) == expected and "\n" not in str(caught.value)
    folder = tmp_path / "checkpoints"
    assert {name: (folder / name).read_bytes() for name in _names(folder)} == before  # no temporaries left
    assert ckpt.resolve_checkpoint(folder) == first


@pytest.mark.parametrize("pointer", ["../other/step_00000001.pt", "ABSOLUTE", "..", "sub/step_00000001.pt"])
def test_a_latest_that_points_outside_its_folder_is_refused(pointer, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    ckpt.save_checkpoint(other, _payload(1), keep_last=1)  # a real checkpoint there: only the check refuses
    (tmp_path / "run" / "sub").mkdir(parents=True)
    ckpt.save_checkpoint(tmp_path / "run" / "sub", _payload(1), keep_last=1)
    pointer = str(other / "step_00000001.pt") if pointer == "ABSOLUTE" else pointer
    (tmp_path / "run" / "latest").write_text(pointer + "\n")
    for given in (tmp_path / "run", tmp_path / "run" / "latest"):
        with pytest.raises(DataError, match="outside its folder") as refused:
            ckpt.resolve_checkpoint(given)
        assert str(refused.value).startswith(f"{tmp_path / 'run' / 'latest'}: names {pointer!r}, outside")
    (tmp_path / "run" / "latest").write_text("step_00000001.pt\n")
    ckpt.save_checkpoint(tmp_path / "run", _payload(1), keep_last=1)
    assert ckpt.resolve_checkpoint(tmp_path / "run") == tmp_path / "run" / "step_00000001.pt"


def test_stale_temporaries_of_a_killed_run_are_removed(tmp_path):
    ckpt.save_checkpoint(tmp_path, _payload(3), keep_last=3)
    torn = [tmp_path / ".step_00000004.pt.k2j3h4.tmp", tmp_path / ".latest.abc.tmp"]
    for path in torn:
        path.write_bytes(b"PK torn")
    mine = tmp_path / ".notes.tmp"
    mine.write_text("not ours")
    assert ckpt.remove_stale_temporaries(tmp_path) == sorted(torn)
    assert _names(tmp_path) == [".notes.tmp", "latest", "step_00000003.pt"]
    assert ckpt.remove_stale_temporaries(tmp_path / "missing") == []


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_a_non_utf8_config_file_is_one_line_naming_the_byte(suffix, tmp_path):
    path = tmp_path / f"config{suffix}"
    path.write_bytes(b"lr: 0.1\nname: caf\xe9\n" if suffix == ".yaml" else b'{"name": "caf\xe9"}')
    offset = path.read_bytes().index(b"\xe9")
    with pytest.raises(ConfigError, match=rf"config{suffix}: not UTF-8 text \(byte 0xe9 at byte offset {offset}:"):
        read_config_mapping(path, "--config")
