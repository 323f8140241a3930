"""Every user mistake of issue 15 that lives outside the training loop, through the command line:
exit status 2, one line on stderr, no traceback, and every file that was there before unchanged
(and no new one written)."""
from __future__ import annotations

import json

import pytest
import torch

from degla_fast.cli import main
from degla_fast.train import checkpoint as ckpt


def _workspace(root):
    """Files the cases point at: a training run with one checkpoint, a text file, a JSON file,
    non-UTF-8 inputs, a training CSV without negatives, an empty data file."""
    run = root / "run" / "checkpoints"
    run.mkdir(parents=True)
    ckpt.save_checkpoint(run, {"model_name": "degla-tiny", "student": {"w": torch.ones(2)}, "teacher": None,
                               "optimizer": {}, "step": 1, "epoch": 0, "batch": 1, "rng": [ckpt.rng_state()]},
                         keep_last=2)
    (root / "notes.txt").write_text("hello, not a checkpoint\n")
    (root / "data.json").write_text(json.dumps({"model": "x"}))
    (root / "latin1.csv").write_bytes(b"image,caption\na.jpg,un caf\xe9 noir\n")
    (root / "latin1.json").write_bytes(b'[{"image": "a.jpg", "caption": "caf\xe9"}]')
    (root / "nocaption.csv").write_text("image,text2\na.jpg,a dog\n")
    (root / "captions.json").write_text(json.dumps([{"image": "a.jpg", "caption": "A dog on a mat."}]))
    (root / "train.csv").write_text("filepath,title\na.jpg,a dog\nb.jpg,a cat\n")
    (root / "out").mkdir()
    (root / "out" / "keep.txt").write_text("earlier output")


C = "run/checkpoints/step_00000001.pt"
EVAL = ["eval", "--model", "degla-tiny", "--benchmark", "sugarcrepe", "--data", ".", "--workers", "0"]
TRAIN = ["train", "--model", "degla-tiny", "--device", "cpu", "--no-progress", "--output", "trainrun",
         "--set", "data.pipeline=torch", "--num-workers", "0"]
LLM = ["--method", "llm", "--llm-model", "m"]

# id -> (argv with paths relative to the workspace, text the one line must hold)
CASES = {
    "eval --device tpu": (EVAL + ["--device", "tpu"], "--device: 'tpu'"),
    "eval --device cuda without a GPU": (EVAL + ["--device", "cuda"], "no CUDA GPU"),
    "eval --batch-size 0": (EVAL + ["--device", "cpu", "--batch-size", "0"], "--batch-size must be >= 1"),
    "eval --json-out a folder": (EVAL + ["--device", "cpu", "--json-out", "out"], "cannot write out: is a folder"),
    "eval --json-out under a file": (EVAL + ["--device", "cpu", "--json-out", "notes.txt/r.json"],
                                     "cannot write notes.txt/r.json: notes.txt is a file"),
    "eval --model a text file": (["eval", "--model", "notes.txt", "--benchmark", "sugarcrepe", "--data", ".",
                                  "--device", "cpu"], "notes.txt: not a torch checkpoint"),
    "eval --model a JSON file": (["eval", "--model", "data.json", "--benchmark", "sugarcrepe", "--data", ".",
                                  "--device", "cpu"], "data.json: not a torch checkpoint"),
    "export onto its source": (["export", C, C], "is the checkpoint being exported"),
    "export onto latest": (["export", "run", "run/checkpoints/latest"], "part of a run's checkpoints folder"),
    "export into a folder": (["export", "run", "out"], "cannot write out: is a folder"),
    "export under a file": (["export", "run", "notes.txt/x.pt"], "cannot write notes.txt/x.pt: notes.txt is a file"),
    "export a text file": (["export", "notes.txt", "x.pt"], "notes.txt: not a torch checkpoint"),
    "export a JSON file": (["export", "data.json", "x.pt"], "data.json: not a torch checkpoint"),
    "train --resume a text file": (TRAIN + ["--data", "train.csv", "--pretrained", "none", "--resume", "notes.txt"],
                                   "notes.txt: not a torch checkpoint"),
    "train --pretrained a JSON file": (TRAIN + ["--data", "train.csv", "--pretrained", "data.json"],
                                       "data.json: not a torch checkpoint"),
    "train CSV without negatives column": (TRAIN + ["--data", "train.csv", "--pretrained", "none",
                                                    "--num-negatives", "4"], "no 'neg_caption' column"),
    "negatives non-UTF-8 CSV": (["negatives", "--input", "latin1.csv", "--output", "n.json"],
                                "latin1.csv: not UTF-8 text (byte 0xe9 at byte offset 26"),
    "negatives non-UTF-8 JSON": (["negatives", "--input", "latin1.json", "--output", "n.json"],
                                 "latin1.json: not UTF-8 text (byte 0xe9 at byte offset 35"),
    "negatives CSV without caption column": (["negatives", "--input", "nocaption.csv", "--output", "n.json"],
                                             "no caption column"),
    "negatives --output a folder": (["negatives", "--input", "captions.json", "--output", "out"],
                                    "cannot write out: is a folder"),
    "negatives --output a foreign file": (["negatives", "--input", "captions.json", "--output", "data.json"],
                                          "pass --overwrite"),
    "negatives --llm-url notaurl": (["negatives", "--input", "captions.json", "--output", "n.json", *LLM,
                                     "--llm-url", "notaurl"], "--llm-url: 'notaurl'"),
    "synth --out onto a file": (["synth", "--out", "notes.txt", "--images", "2", "--eval-items", "1",
                                 "--zeroshot-items", "1", "--no-progress"], "cannot write notes.txt: is a file"),
}


def _snapshot(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", list(CASES))
def test_user_mistake_is_one_line_exit_2_and_nothing_changes(case, tmp_path, monkeypatch, capsys):
    if case == "eval --device cuda without a GPU" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    _workspace(tmp_path)
    monkeypatch.chdir(tmp_path)
    argv, expected = CASES[case]
    before = _snapshot(tmp_path)
    capsys.readouterr()
    status = main(list(argv))
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert status == 2, err
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith("degla-fast: error: ") and expected in lines[0], lines[0]
    assert _snapshot(tmp_path) == before
