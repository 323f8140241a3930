"""pipeline 'auto': DALI where it can start on the GPU, else the torch pipeline with one warning line."""
import warnings

import pytest
import torch

from degla_fast.data import build_train_data
from degla_fast.data import dali as dali_mod
from degla_fast.data import loader as loader_mod
from degla_fast.errors import ConfigError

MEAN, STD = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)


def _build(path, tokenizer, **kw):
    return build_train_data(path, tokenizer=tokenizer, image_size=32, mean=MEAN, std=STD, batch_size=4,
                            num_negatives=3, num_workers=0, **kw)


def test_auto_falls_back_to_torch_when_dali_cannot_start(degla_json, tokenizer, monkeypatch):
    monkeypatch.setattr(loader_mod, "dali_available", lambda: True)
    reason = "RuntimeError: CUDA driver version is insufficient for CUDA runtime version"
    probed = []
    monkeypatch.setattr(dali_mod, "dali_start_error", lambda device_id: probed.append(device_id) or reason)
    with pytest.warns(RuntimeWarning) as caught:
        data = _build(degla_json, tokenizer, pipeline="auto", device="cuda:1")
    assert data.pipeline == "torch" and probed == [1]
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "\n" not in messages[0]
    assert messages[0].startswith("pipeline 'auto': DALI cannot start on cuda:1 (RuntimeError: CUDA driver version")
    assert "using the torch pipeline" in messages[0] and dali_mod.dali_package() in messages[0]


def test_auto_keeps_dali_when_it_starts(degla_json, tokenizer, monkeypatch):
    monkeypatch.setattr(loader_mod, "dali_available", lambda: True)
    monkeypatch.setattr(dali_mod, "dali_start_error", lambda device_id: None)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert _build(degla_json, tokenizer, pipeline="auto", device="cuda").pipeline == "dali"
    # On the CPU, auto is the torch pipeline without probing DALI at all.
    monkeypatch.setattr(dali_mod, "dali_start_error", lambda device_id: pytest.fail("probed on the CPU"))
    assert _build(degla_json, tokenizer, pipeline="auto", device="cpu").pipeline == "torch"


@pytest.mark.skipif(not dali_mod.dali_available() or torch.cuda.is_available(),
                    reason="needs nvidia-dali and no usable GPU")
def test_real_probe_reports_why_dali_cannot_start_here(degla_json, tokenizer):
    reason = dali_mod.dali_start_error(0)
    assert reason and "\n" not in reason
    with pytest.warns(RuntimeWarning, match=r"DALI cannot start on cuda:0 \(.+\); using the torch pipeline"):
        assert _build(degla_json, tokenizer, pipeline="auto", device="cuda").pipeline == "torch"


def test_dali_hint_names_the_wheel_for_this_torch(degla_json, tokenizer, monkeypatch):
    monkeypatch.setattr(loader_mod, "dali_available", lambda: False)
    for cuda, wheel in (("12.4", "nvidia-dali-cuda120"), ("13.0", "nvidia-dali-cuda130"), (None, "nvidia-dali-cuda130")):
        monkeypatch.setattr(torch.version, "cuda", cuda)
        assert dali_mod.dali_package() == wheel
        with pytest.raises(ConfigError, match=f"pip install {wheel}"):
            _build(degla_json, tokenizer, pipeline="dali")
