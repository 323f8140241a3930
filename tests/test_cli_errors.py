"""Every user mistake of issue 15 that lives outside the training loop, through the command line:
exit status 2, one line on stderr, no traceback, and every file that was there before unchanged
(and no new one written)."""
from __future__ import annotations

import fcntl
import json
import os

import pytest
import torch

from degla_fast.cli import main
from degla_fast import checkpoint as ckpt


def _workspace(root):
    """Files the cases point at: a training run with one checkpoint, a text file, a JSON file,
    non-UTF-8 inputs, a training CSV without negatives, an empty data file, a run folder another
    run holds, 'latest' pointers out of their folders. Returns the lock on busy/ (keep it open)."""
    run = root / "run" / "checkpoints"
    run.mkdir(parents=True)
    ckpt.save_checkpoint(run, {"model_name": "degla-tiny", "student": {"w": torch.ones(2)}, "teacher": None,
                               "optimizer": {}, "step": 1, "epoch": 0, "batch": 1, "rng": [ckpt.rng_state()]},
                         keep_last=2)
    (root / "notes.txt").write_text("hello, not a checkpoint\n")
    (root / "data.json").write_text(json.dumps({"model": "x"}))
    (root / "latin1.yaml").write_bytes(b"epochs: 1\nmodel:\n  name: caf\xe9\n")
    (root / "latin1.csv").write_bytes(b"image,caption\na.jpg,un caf\xe9 noir\n")
    (root / "latin1.json").write_bytes(b'[{"image": "a.jpg", "caption": "caf\xe9"}]')
    (root / "nocaption.csv").write_text("image,text2\na.jpg,a dog\n")
    (root / "captions.json").write_text(json.dumps([{"image": "a.jpg", "caption": "A dog on a mat."}]))
    (root / "train.csv").write_text("filepath,title\na.jpg,a dog\nb.jpg,a cat\n")
    (root / "latin1bench").mkdir()
    (root / "latin1bench" / "swap_obj.json").write_bytes(b'{"0": {"filename": "a.png", "caption": "caf\xe9"}}')
    (root / "out").mkdir()
    (root / "out" / "keep.txt").write_text("earlier output")
    # issue 23, sections 4-5: a corrupt .safetensors (its 8-byte header length is 1 TB), a DeGLA
    # training file and an empty list given to eval, a zero-shot image folder whose image is a FIFO
    (root / "corrupt.safetensors").write_bytes((10**12).to_bytes(8, "little") + b"{}")
    (root / "train.json").write_text(json.dumps([{"image": "a.jpg", "original": "a dog", "enhanced": ["a cat"]}]))
    (root / "empty.json").write_text("[]")
    from PIL import Image

    for label in ("cat", "dog"):
        (root / "zs" / label).mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "zs" / "dog" / "1.png")
    os.mkfifo(root / "zs" / "cat" / "0.png")  # nobody writes to it: an open that blocks waits for ever
    # Another run writing busy/ (its lock held, as that run's would be); 'latest' files that
    # point outside their folders: up through '..', and an absolute path.
    (root / "busy").mkdir()
    held = open(root / "busy" / ".lock", "w")
    held.write("pid 4242 on elsewhere\n")
    held.flush()
    fcntl.flock(held, fcntl.LOCK_EX)
    for name, target in (("escape", "../../run/checkpoints/step_00000001.pt"),
                         ("absolute", str(run / "step_00000001.pt"))):
        (root / name / "checkpoints").mkdir(parents=True)
        (root / name / "checkpoints" / "latest").write_text(target + "\n")
    return held


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
    "eval a non-UTF-8 benchmark file": (["eval", "--model", "degla-tiny", "--benchmark", "sugarcrepe", "--data",
                                         "latin1bench", "--device", "cpu"],
                                        "swap_obj.json: not UTF-8 text (byte 0xe9 at byte offset 43"),
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
    "train --config a non-UTF-8 YAML": (TRAIN + ["--config", "latin1.yaml", "--data", "train.csv"],
                                        "latin1.yaml: not UTF-8 text (byte 0xe9 at byte offset 28"),
    "train --output onto a file": (["train", "--model", "degla-tiny", "--device", "cpu", "--no-progress", "--output",
                                    "notes.txt", "--set", "data.pipeline=torch", "--num-workers", "0", "--data",
                                    "train.csv", "--pretrained", "none", "--num-negatives", "0", "--batch-size", "1"],
                                   "cannot write notes.txt"),
    "train into a folder that holds a run": (["train", "--model", "degla-tiny", "--device", "cpu", "--no-progress",
                                              "--output", "run", "--set", "data.pipeline=torch", "--data",
                                              "train.csv", "--pretrained", "none", "--num-negatives", "0"],
                                             "run already holds a run (checkpoints); resume it with --resume latest"),
    # One writer per run folder; a 'latest' pointer stays in its folder (issue 23).
    "train into a folder another run is writing": (TRAIN + ["--data", "train.csv", "--pretrained", "none",
                                                           "--num-negatives", "0", "--batch-size", "1", "--output",
                                                           "busy", "--resume", "latest"],
                                                  "output: busy is in use by another run (pid 4242 on elsewhere, "
                                                  "holding busy/.lock)"),
    "train --resume latest through '..'": (TRAIN + ["--data", "train.csv", "--pretrained", "none", "--output",
                                                    "escape", "--resume", "latest"],
                                           "escape/checkpoints/latest: names '../../run/checkpoints/step_00000001.pt', "
                                           "outside its folder"),
    "train --resume latest to an absolute path": (TRAIN + ["--data", "train.csv", "--pretrained", "none", "--output",
                                                           "absolute", "--resume", "latest"],
                                                  "absolute/checkpoints/latest: names '/"),
    "export a run whose latest points out of it": (["export", "escape", "x.pt"], "outside its folder"),
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
    # ---- issue 23, sections 4-5: no silent overwrite, no traceback, no nan table, no hang
    "export onto an existing file": (["export", "run", "data.json"], "export: data.json exists; pass --overwrite"),
    "train --resume a checkpoint of another model": (
        TRAIN + ["--data", "train.csv", "--pretrained", "none", "--model", "degla-synth", "--resume", "run"],
        f"resume: {C} holds a 'degla-tiny' model, this run is configured for 'degla-synth'; resume it with "
        "--model degla-tiny"),
    "train --resume weights that do not fit the model": (
        TRAIN + ["--data", "train.csv", "--pretrained", "none", "--resume", "run"],
        f"{C}: student weights do not fit 'degla-tiny' (missing ["),
    "train --pretrained a corrupt .safetensors": (
        TRAIN + ["--data", "train.csv", "--pretrained", "corrupt.safetensors"],
        "cannot load weights 'corrupt.safetensors' for 'degla-tiny': SafetensorError: Error while deserializing"),
    "eval --pretrained a corrupt .safetensors": (
        ["eval", "--model", "degla-tiny", "--pretrained", "corrupt.safetensors", "--benchmark", "sugarcrepe",
         "--data", ".", "--device", "cpu"], "SafetensorError: Error while deserializing header"),
    "experiment --output onto a file": (["experiment", "--quick", "--output", "notes.txt", "--no-progress"],
                                        "cannot write notes.txt: is a file, not a folder (--output names a folder)"),
    "train an unknown flag": (["train", "--learning-rate", "1"],
                              "unrecognized arguments: --learning-rate 1 (see degla-fast train --help)"),
    "experiment --seeds abc": (["experiment", "--seeds", "abc"],
                               "argument --seeds: invalid int value: 'abc' (see degla-fast experiment --help)"),
    "a missing sub-command": ([], "the following arguments are required: COMMAND"),
    **{f"eval --benchmark {name} --data a training file": (
        ["eval", "--model", "degla-tiny", "--benchmark", name, "--data", "train.json", "--device", "cpu"], expected)
       for name, expected in [
           ("sugarcrepe", "train.json: record 0: missing field 'filename'"),
           ("valse", "train.json: record 0: missing field 'caption'"),
           ("aro-relation", "train.json: record 0: missing field 'image_path'"),
           ("aro-attribution", "train.json: record 0: missing field 'image_path'"),
           ("coco-order", "a.jpg: image file not found (record 0 of train.json)"),
           ("flickr-order", "a.jpg: image file not found (record 0 of train.json)"),
           ("zeroshot", "train.json: expected an object with 'classnames'"),
           ("retrieval", "train.json: record 0: missing field 'caption'"),
           ("synthetic", "train.json/eval: folder not found")]},
    **{f"eval --benchmark {name} an empty file": (
        ["eval", "--model", "degla-tiny", "--benchmark", name, "--data", "empty.json", "--device", "cpu"],
        "empty.json: no records") for name in ("sugarcrepe", "valse", "coco-order", "aro-relation", "retrieval")},
    "eval a zero-shot image that is a FIFO": (
        ["eval", "--model", "degla-tiny", "--benchmark", "zeroshot", "--data", "zs", "--device", "cpu",
         "--workers", "0", "--no-progress"], "zs/cat/0.png: cannot read image (OSError: a FIFO, not a regular file)"),
    # ---- end of issue 23, sections 4-5
}


def _snapshot(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.timeout(120)  # a case that hangs (an image that is a FIFO) fails instead of stopping the suite
@pytest.mark.parametrize("case", list(CASES))
def test_user_mistake_is_one_line_exit_2_and_nothing_changes(case, tmp_path, monkeypatch, capsys):
    if case == "eval --device cuda without a GPU" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    busy = _workspace(tmp_path)
    monkeypatch.chdir(tmp_path)
    argv, expected = CASES[case]
    before = _snapshot(tmp_path)
    capsys.readouterr()
    status = main(list(argv))
    busy.close()
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert status == 2, err
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith("degla-fast: error: ") and expected in lines[0], lines[0]
    assert _snapshot(tmp_path) == before


# ---------------------------------------------------------------- unreadable images, in workers too


@pytest.fixture(scope="module")
def bomb() -> bytes:
    """A 22 kB PNG of 13,500 x 13,500 pixels: more than twice PIL's MAX_IMAGE_PIXELS, so
    Image.open raises DecompressionBombError (not an OSError) before decoding anything."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("1", (13_500, 13_500)).save(buffer, format="PNG")
    return buffer.getvalue()


def _sugarcrepe(root, bad: bytes | None = None):
    from PIL import Image

    images = root / "images"
    images.mkdir()
    records = {}
    for i in range(3):
        Image.new("RGB", (64, 64), (80 * i, 20, 200)).save(images / f"{i}.png")
        records[str(i)] = {"filename": f"{i}.png", "caption": "a red square", "negative_caption": "a square red"}
    if bad is not None:
        (images / "1.png").write_bytes(bad)
    (root / "swap_obj.json").write_text(json.dumps(records))


@pytest.mark.parametrize("workers", ["0", "1"])
@pytest.mark.parametrize("kind", ["corrupt", "bomb"])
def test_an_unreadable_image_is_one_line_with_or_without_workers(kind, workers, bomb, tmp_path, capsys):
    _sugarcrepe(tmp_path, bad=b"\x89PNG\r\n\x1a\n not really" if kind == "corrupt" else bomb)
    status = main(["eval", "--model", "degla-tiny", "--benchmark", "sugarcrepe", "--data", str(tmp_path),
                   "--device", "cpu", "--workers", workers, "--batch-size", "2", "--no-progress"])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "cannot read image" in lines[0] and str(tmp_path / "images") in lines[0], lines[0]
    if kind == "bomb":
        assert "DecompressionBombError" in lines[0]


def test_from_worker_keeps_the_original_message():
    from degla_fast.errors import DataError, from_worker

    wrapped = DataError("Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
                        "last):\n  File \"x.py\", line 1, in f\ndegla_fast.errors.DataError: a.jpg: cannot read image")
    assert str(from_worker(wrapped)) == "a.jpg: cannot read image" and type(from_worker(wrapped)) is DataError
    plain = DataError("b.jpg: cannot read image")
    assert from_worker(plain) is plain


@pytest.mark.parametrize("kind", ["corrupt", "bomb"])
def test_train_with_a_worker_reports_an_unreadable_image_in_one_line(kind, bomb, tmp_path, capsys):
    from degla_fast.data.synthetic import generate

    data = generate(tmp_path / "synth", num_images=8, seed=0, eval_items=1, zeroshot_items=1, progress=False)
    records = json.loads(data.read_text())
    (tmp_path / "synth" / records[3]["image"]).write_bytes(bomb if kind == "bomb" else b"\xff\xd8\xff not a jpeg")
    status = main(["train", "--data", str(data), "--output", str(tmp_path / "run"), "--model", "degla-tiny",
                   "--pretrained", "none", "--batch-size", "8", "--num-negatives", "0", "--device", "cpu",
                   "--num-workers", "1", "--max-steps", "1", "--no-progress", "--set", "data.pipeline=torch"])
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith("degla-fast: error: ")]
    assert status == 2 and "Traceback" not in err, err
    assert len(lines) == 1 and "cannot read image" in lines[0] and "DataLoader worker" not in err, err


# ---------------------------------------------------------------- issue 23, section 4: beside the table


def test_export_replaces_an_existing_file_only_with_overwrite(tmp_path, capsys):
    _workspace(tmp_path)
    target = tmp_path / "data.json"
    before = target.read_bytes()
    assert main(["export", str(tmp_path / "run"), str(target)]) == 2 and target.read_bytes() == before
    assert main(["export", str(tmp_path / "run"), str(target), "--overwrite"]) == 0
    assert torch.load(target, weights_only=True).keys() == {"w"}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".data.json")] == []  # no temporary left


@pytest.mark.timeout(180)
def test_a_config_without_a_model_prints_only_our_line(tmp_path):
    """The default model's weights cannot be fetched offline: open_clip logged its own
    "ERROR:root:Failed to download weights ..." before our line (issue 23). A child process with
    an empty Hugging Face cache, so that the weights are never found whatever this machine holds."""
    import subprocess
    import sys
    from pathlib import Path

    _workspace(tmp_path)
    (tmp_path / "nomodel.yaml").write_text("data:\n  path: train.csv\n  num_workers: 0\n  pipeline: torch\n"
                                           "loss:\n  num_negatives: 0\ndevice: cpu\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-m", "degla_fast", "train", "--config", "nomodel.yaml", "--output",
                           "trainrun", "--no-progress"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=150)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("degla-fast: error: pretrained: cannot load weights 'openai' for "
                               "'ViT-B-32-quickgelu': RuntimeError: Failed to download weights"), lines[0]
