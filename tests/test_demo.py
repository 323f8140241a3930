"""``make train`` (``python -m degla_fast.demo --quick``): one table with the start point, NegCLIP and
DeGLA side by side and chance levels, a chart, and a second run that reuses every finished stage."""
import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

from degla_fast import demo

REPO = Path(__file__).resolve().parents[1]


def test_quick_demo_table_chart_and_reuse(tmp_path, capsys):
    out = tmp_path / "demo"
    assert demo.main(["--quick", "--output", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    table = (out / "results.md").read_text()
    assert "| metric (accuracy %) | chance | start point (CLIP loss) | NegCLIP | DeGLA |" in table
    for row in ("| compositional: average | 50.0 |", "| zero-shot: shape | 33.3 |", "| zero-shot: colour | 12.5 |", "| zero-shot: texture | 25.0 |",
                "| zero-shot: count | 33.3 |", "| zero-shot: average |", "| train set's own hard negatives"):
        assert row in table, row
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("stage.json")}
    assert len(stamps) >= 7   # data, 3 trainings, 3 evaluations

    assert demo.main(["--quick", "--output", str(out), "--no-progress"]) == 0
    again = capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("stage.json")} == stamps   # nothing redone
    assert again.count("reused") >= 3 and "done in" not in again   # data, start point and its evaluation
    # the fine-tunes too, said as the other stages say it (not "finished (0 s)")
    assert f"  NegCLIP: reused ({out / 'negclip'})" in again and f"  DeGLA: reused ({out / 'degla'})" in again
    assert "finished (" not in again


# `make train > train.log 2>&1`: the demo asks its data stage for a progress bar; a file must get
# timestamped lines and no carriage returns (a bar's redraws were one 25 KB line), a terminal the bar.
DATA_STAGE = ("import sys; from degla_fast import stages; stages.synth_stage(sys.argv[1], progress=True, num_images=8, "
              "pretrain_images=8, eval_items=1, zeroshot_items=1)")
STAMPED = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d .+")


def test_the_data_stage_draws_its_progress_bar_only_on_a_terminal(tmp_path):
    log = tmp_path / "train.log"
    with open(log, "wb") as fh:
        subprocess.run([sys.executable, "-c", DATA_STAGE, str(tmp_path / "file")], cwd=REPO, stdout=fh,
                       stderr=subprocess.STDOUT, check=True, timeout=120)
    printed = log.read_bytes()
    assert b"\r" not in printed
    lines = printed.decode().splitlines()
    assert lines and all(STAMPED.fullmatch(line) for line in lines), lines
    assert " data: done in " in lines[-1]

    main, child = pty.openpty()  # the same stage with stderr on a terminal draws its bar there
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))  # 80 columns (a new pty has 0)
    try:
        proc = subprocess.Popen([sys.executable, "-c", DATA_STAGE, str(tmp_path / "terminal")], cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=child)
        os.close(child)
        drawn = b""
        while True:
            try:
                chunk = os.read(main, 4096)
            except OSError:  # the terminal closed with the process
                break
            if not chunk:
                break
            drawn += chunk
        assert proc.wait(timeout=120) == 0
    finally:
        os.close(main)
    assert b"\r" in drawn and b"synth" in drawn
