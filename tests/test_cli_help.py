"""First contact with the command line: help that answers without importing torch (its import
alone takes seconds: benchmarks/bench_help.py times the commands), and every flag's default
in it, written as YAML writes it."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from degla_fast import cli

REPO = Path(__file__).resolve().parents[1]
#: What a help text must not load: each costs from a tenth of a second (numpy) to seconds (torch).
HEAVY = ("torch", "numpy", "open_clip", "triton", "deepspeed", "PIL", "tqdm")

PROBE = """
import json, sys
from degla_fast.cli import main
try:
    status = main(sys.argv[1:])
except SystemExit as done:  # argparse's --help exits
    status = done.code
heavy = sorted({name.split(".")[0] for name in sys.modules} & set(json.loads(HEAVY)))
print("PROBE " + json.dumps({"status": status, "heavy": heavy}))
"""


@pytest.mark.parametrize("args", [["--help"], ["train", "--help"], ["train", "--help-config"],
                                  *[[name, "--help"] for name in cli.COMMANDS if name != "train"]],
                         ids=lambda args: " ".join(args))
def test_help_imports_nothing_heavy(args):
    proc = subprocess.run([sys.executable, "-c", PROBE.replace("HEAVY", repr(json.dumps(HEAVY))), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    report = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("PROBE "))[6:])
    assert report == {"status": 0, "heavy": []}, proc.stderr[-2000:]


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_every_flag_shows_its_default(command):
    parser = cli.build_parser(command)
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    formatter = sub._get_formatter()
    flags = [a for a in sub._actions if a.option_strings and a.help is not None and a.dest != "help"
             and a.help != "==SUPPRESS=="]
    assert flags
    for action in flags:
        text = formatter._get_help_string(action)
        assert "default" in text or "required" in text, (command, action.option_strings, text)
        assert not any(f"default: {python}" in text for python in ("None", "True", "False")), text


def test_train_flags_show_the_configuration_defaults_as_yaml(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps: one line of words
    for expected in ("(optim.lr; default: 1.0e-06)", "(model.pretrained; default: openai)", "(data.path; required)",
                     "(overwrite; default: false)", "(resume; default: null)", "(threads; default: null)",
                     "(loss.num_negatives; default: 4)", "no progress bar (default: false)"):
        assert expected in text, expected
