"""The ablation experiment: its summary and paired-difference math, the one stage cache, and a smoke
run of the whole pipeline (``degla-fast experiment --quick``)."""
import argparse
import json
import math
import statistics

import pytest

from degla_fast import stages
from degla_fast.errors import ConfigError
from degla_fast.experiment import (QUICK, VARIANTS, Settings, contrast_table, contrasts, finetune_fields, markdown,
                                   paired, run_experiment, summarize)

METRICS = ("swap", "compositional_avg", "zeroshot_shape", "zeroshot_avg", "train_pairwise")


def _metrics(base: float) -> dict:
    return {metric: base + i for i, metric in enumerate(METRICS)}


def test_summarize_mean_and_sample_std_over_seeds():
    per_seed = {"negclip": [_metrics(50.0), _metrics(60.0), _metrics(70.0)], "pretrained": [_metrics(40.0)]}
    summary = summarize(per_seed)
    swap = summary["negclip"]["swap"]
    assert swap["mean"] == pytest.approx(60.0)
    assert swap["std"] == pytest.approx(statistics.stdev([50.0, 60.0, 70.0]))   # 10
    assert (swap["min"], swap["max"], swap["n"]) == (50.0, 70.0, 3)
    assert summary["pretrained"]["compositional_avg"] == {"mean": 41.0, "std": 0.0, "min": 41.0, "max": 41.0, "n": 1}
    table = markdown(summary, {"negclip": "(b) NegCLIP", "pretrained": "start"}, {m: 50.0 for m in METRICS})
    assert "| metric | chance | (b) NegCLIP | start |" in table
    assert "| swap | 50.0 | 60.0 ± 10.0 | 40.0 |" in table


def test_bar_chart_draws_error_bars_only_for_several_seeds(monkeypatch):
    # make train's chart has one seed: a bar with an error bar (and caps) would suggest a spread it never measured
    from matplotlib.axes import Axes

    from degla_fast.experiment import bar_chart

    drawn, real_bar = {}, Axes.bar

    def bar(self, *args, label=None, **kwargs):
        container = real_bar(self, *args, label=label, **kwargs)
        drawn.setdefault(label, []).append(container.errorbar)
        return container

    monkeypatch.setattr(Axes, "bar", bar)
    summary = summarize({"negclip": [_metrics(50.0), _metrics(60.0)], "start": [_metrics(40.0)]})
    assert bar_chart(summary, {"negclip": "NegCLIP", "start": "start"})[:4] == b"\x89PNG"
    assert all(e is not None for e in drawn["NegCLIP"]) and len(drawn["NegCLIP"]) == 2  # two panels
    assert drawn["start"] == [None, None]


def test_paired_differences_and_their_t_interval():
    d = paired([3.0, 5.0, 4.0, 6.0, 2.0], [1.0, 1.0, 1.0, 1.0, 1.0])   # differences 2, 4, 3, 5, 1
    half = 2.776 * statistics.stdev([2, 4, 3, 5, 1]) / math.sqrt(5)
    assert d["mean"] == pytest.approx(3.0) and d["n"] == 5
    assert (d["low"], d["high"]) == (pytest.approx(3.0 - half), pytest.approx(3.0 + half))
    shared = paired([3.0, 5.0], [1.0])   # a shared start point is subtracted from every seed
    assert shared["mean"] == pytest.approx(3.0)
    one = paired([3.0], [1.0])
    assert one["mean"] == 2.0 and math.isnan(one["low"])
    per_seed = {"negclip": [_metrics(50.0), _metrics(52.0)], "degla": [_metrics(51.0), _metrics(54.0)],
                "pretrained": [_metrics(40.0)]}
    rows = contrasts(per_seed)
    names = {(r["name"], r["metric"]) for r in rows}
    assert ("DeGLA - NegCLIP", "zeroshot_avg") in names and ("NegCLIP - start", "train_pairwise") in names
    assert not any(r["name"].startswith("fixed") for r in rows)   # degla_release was not run
    assert "| DeGLA - NegCLIP | compositional avg | +1.5 |" in contrast_table(rows)


def test_bad_settings_name_the_flag():
    with pytest.raises(ConfigError, match="--variants: unknown simclr"):
        Settings(variants=["simclr"]).validate()
    with pytest.raises(ConfigError, match="--finetune-steps"):
        Settings(finetune_steps=0).validate()
    with pytest.raises(ConfigError, match="--split"):
        Settings(split="train").validate()


def test_variants_map_to_trainer_fields(tmp_path):
    s = Settings()
    fields = {v: finetune_fields(s, tmp_path, tmp_path / "start", v, 3) for v in VARIANTS}
    assert fields["clip"]["loss.num_negatives"] == 0
    assert fields["negclip"]["loss.num_negatives"] == 4 and fields["negclip"]["loss.igc_weight"] == 0.0
    assert fields["igc_tgc"]["loss.tgc_weight"] == s.loss.tgc_weight and fields["igc_tgc"]["loss.distill_weight"] == 0.0
    assert fields["degla"]["loss.distill_weight"] == s.loss.distill_weight
    assert fields["degla_release"]["loss.official_tgc_indexing"] is True
    assert fields["degla"]["loss.official_tgc_indexing"] is False
    for f in fields.values():   # every field is a real trainer field
        stages.train_config(tmp_path / "x", {**f, "data.path": "x.json"})


def test_loss_weight_flags_set_the_settings_loss_spec():
    from degla_fast.experiment import add_arguments, settings_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    settings = settings_from_args(parser.parse_args(["--distill-weight", "0.05", "--batch-size", "4"]))
    assert (settings.loss.distill_weight, settings.loss.igc_weight, settings.batch_size) == (0.05, 0.1, 4)
    assert Settings().loss.distill_weight == 0.01   # the experiment's own default, not the loss's
    with pytest.raises(ConfigError, match="tgc_weight"):
        settings_from_args(parser.parse_args(["--tgc-weight", "-1"]))


def test_run_stage_runs_once_per_stamp(tmp_path):
    calls = []

    def work():
        calls.append(1)
        return {"value": len(calls)}

    assert stages.run_stage(tmp_path / "a", {"k": 1}, work, log=None) == ({"value": 1}, pytest.approx(0.0, abs=5))
    assert stages.run_stage(tmp_path / "a", {"k": 1}, work, log=None) == ({"value": 1}, 0.0)
    assert stages.run_stage(tmp_path / "a", {"k": 2}, work, log=None)[0] == {"value": 2}
    assert len(calls) == 2


def test_quick_experiment_writes_table_chart_and_json(tmp_path):
    settings = Settings(**QUICK)
    results = run_experiment(settings, tmp_path)
    summary = results["summary"]
    assert set(summary) == {"pretrained", *VARIANTS}
    for variant in summary.values():
        for stats in variant.values():
            assert 0.0 <= stats["mean"] <= 100.0
        assert {"compositional_avg", "zeroshot_avg", "train_pairwise", "zeroshot_texture"} <= set(variant)
    assert results["chance"]["zeroshot_colour"] == pytest.approx(12.5)
    assert results["chance"]["zeroshot_shape"] == pytest.approx(100 / 3)
    text = (tmp_path / "results.md").read_text()
    assert "(d) DeGLA" in text and "compositional avg" in text and "fixed - release TGC" in text
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["summary"] == json.loads(json.dumps(summary))
    # the fine-tuned runs really used their loss settings
    config = (tmp_path / "runs" / "degla_release-seed0" / "config.yaml").read_text()
    assert "num_negatives: 4" in config and "official_tgc_indexing: true" in config
    # a second invocation reuses every finished stage
    again = run_experiment(settings, tmp_path)
    assert again["per_seed"] == results["per_seed"]
    assert again["timings"]["finetune_s"] < 30

    # learning curves: the first seed's runs kept a checkpoint every step, each scored; step 0 is the start point
    curves = results["curves"]
    assert set(curves) == set(VARIANTS)
    for curve in saved["curves"].values():
        assert sorted(map(int, curve)) == [0, 1, 2] and {"swap", "swap_obj", "swap_att"} <= set(curve["1"])
    assert curves["negclip"][0] == results["per_seed"]["pretrained"][0]
    assert curves["negclip"][2]["swap"] == results["per_seed"]["negclip"][0]["swap"]  # the last point is the run
    assert len(list((tmp_path / "runs" / "negclip-seed0" / "checkpoints").glob("step_*.pt"))) == 2
    assert len(list((tmp_path / "runs" / "negclip-seed1" / "checkpoints").glob("step_*.pt"))) == 1
    assert "Learning curves" in text and (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert "| swap_obj |" in text and "| NegCLIP - CLIP loss | swap |" in text

    # the sweep from the same folder: the start point and the reference runs are reused, and DeGLA at
    # distillation weight 0 (the experiment's decay) is +IGC+TGC seed for seed
    from degla_fast.experiment import run_sweep

    sweep = run_sweep(settings, tmp_path, [0.0, 0.5], [settings.ema_decay])
    assert sweep["per_seed"]["negclip"] == results["per_seed"]["negclip"]
    assert sweep["per_seed"]["degla w=0 d=0.995"] == results["per_seed"]["igc_tgc"]
    assert "| degla w=0.5 d=0.995 |" in (tmp_path / "sweep.md").read_text()
    config = (tmp_path / "runs" / "degla-w0.5-d0.995-seed1" / "config.yaml").read_text()
    assert "distill_weight: 0.5" in config and "decay: 0.995" in config
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ConfigError, match="sweep-decay"):
        run_sweep(settings, tmp_path, [0.1], [1.0])

    # other fine-tuning settings in the same folder: the old run is set aside and the new one trained
    # from its start (resuming it would continue the 2-step run to step 3 under another schedule)
    from dataclasses import replace

    longer = run_experiment(replace(settings, finetune_steps=3, variants=["negclip"], seeds=[0], curve_every=0), tmp_path)
    assert [p.name.split("-2")[0] for p in (tmp_path / "runs" / "previous").iterdir()] == ["negclip-seed0"]
    run = tmp_path / "runs" / "negclip-seed0"
    assert "max_steps: 3" in (run / "config.yaml").read_text()
    assert [p.name for p in (run / "checkpoints").glob("step_*.pt")] == ["step_00000003.pt"]
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 3
    assert longer["per_seed"]["pretrained"] == results["per_seed"]["pretrained"]  # the start point kept
