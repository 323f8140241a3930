"""The ablation experiment: its summary math, and a seconds-long smoke run of the whole pipeline."""
import json
import statistics

import pytest

from degla_fast.errors import ConfigError
from degla_fast.experiment import METRICS, QUICK, Settings, markdown, run_experiment, summarize


def _metrics(base: float) -> dict:
    return {metric: base + i for i, metric in enumerate(METRICS)}


def test_summarize_mean_and_sample_std_over_seeds():
    per_seed = {"negclip": [_metrics(50.0), _metrics(60.0), _metrics(70.0)], "pretrained": [_metrics(40.0)]}
    summary = summarize(per_seed)
    swap = summary["negclip"]["swap"]
    assert swap["mean"] == pytest.approx(60.0)
    assert swap["std"] == pytest.approx(statistics.stdev([50.0, 60.0, 70.0]))   # 10
    assert (swap["min"], swap["max"], swap["n"]) == (50.0, 70.0, 3)
    assert summary["negclip"]["zeroshot_avg"]["mean"] == pytest.approx(60.0 + METRICS.index("zeroshot_avg"))
    assert summary["pretrained"]["add"] == {"mean": 42.0, "std": 0.0, "min": 42.0, "max": 42.0, "n": 1}
    table = markdown(summary, {"negclip": "(b) NegCLIP", "pretrained": "start"})
    assert "| (b) NegCLIP | 60.0 ± 10.0 | 61.0 ± 10.0 |" in table
    assert "| start | 40.0 | 41.0 |" in table


def test_bad_settings_name_the_flag():
    with pytest.raises(ConfigError, match="--variants: unknown simclr"):
        Settings(variants=["simclr"]).validate()
    with pytest.raises(ConfigError, match="--finetune-steps"):
        Settings(finetune_steps=0).validate()


def test_quick_experiment_writes_table_chart_and_json(tmp_path):
    settings = Settings(**QUICK)
    results = run_experiment(settings, tmp_path)
    summary = results["summary"]
    assert set(summary) == {"pretrained", "clip", "negclip", "igc_tgc", "degla"}
    for variant in summary.values():
        for stats in variant.values():
            assert 0.0 <= stats["mean"] <= 100.0
    table = (tmp_path / "results.md").read_text()
    assert "(d) DeGLA" in table and "compositional_avg" in table
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["summary"] == json.loads(json.dumps(summary))
    # the fine-tuned runs really used their loss settings
    config = (tmp_path / "runs" / "negclip-seed0" / "ablation.yaml").read_text()
    assert "num_negatives: 4" in config and "igc_weight: 0.0" in config
    # a second invocation reuses every finished run
    again = run_experiment(settings, tmp_path)
    assert again["per_seed"] == results["per_seed"]
    assert again["timings"]["finetune_s"] == 0.0
