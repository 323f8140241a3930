"""``make train`` (``python -m degla_fast.demo --quick``): one table with the start point, NegCLIP and
DeGLA side by side and chance levels, a chart, and a second run that reuses every finished stage."""
from degla_fast import demo


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
