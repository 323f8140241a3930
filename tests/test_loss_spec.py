"""The loss options have one owner: ``LossSpec`` is what DeGLALoss, degla_loss and the
trainer's ``loss:`` section hold (issue 22)."""
import dataclasses
import inspect

import pytest

from degla_fast import DeGLALoss, LossSpec
from degla_fast.errors import ConfigError
from degla_fast.functional import degla_loss
from degla_fast.train.config import TrainConfig, field_docs, load_config, to_dict

SPEC_FIELDS = [f.name for f in dataclasses.fields(LossSpec)]
CONFIG_KEYS = [f.name for f in dataclasses.fields(LossSpec) if f.metadata["in_config"]]


def test_the_trainer_loss_section_is_the_spec():
    config = TrainConfig()
    assert type(config.loss) is LossSpec
    assert list(to_dict(config)["loss"]) == CONFIG_KEYS
    assert CONFIG_KEYS == [n for n in SPEC_FIELDS if n != "check_finite"]  # the trainer checks the loss itself
    docs = field_docs()
    for f in dataclasses.fields(LossSpec):
        if f.name in CONFIG_KEYS:
            assert docs[f"loss.{f.name}"][1] == f.metadata["doc"]
        else:
            assert f"loss.{f.name}" not in docs


def test_defaults_come_from_the_spec_with_one_stated_override():
    spec, trainer = LossSpec(), TrainConfig().loss
    differ = {n: (getattr(spec, n), getattr(trainer, n)) for n in SPEC_FIELDS if getattr(spec, n) != getattr(trainer, n)}
    assert differ == {"local_loss": (False, True), "gather_with_grad": (False, True)}
    module = inspect.signature(DeGLALoss).parameters
    functional = inspect.signature(degla_loss).parameters
    for f in dataclasses.fields(LossSpec):
        assert module[f.name].default == f.default == functional[f.name].default, f.name
    assert DeGLALoss().spec == spec


@pytest.mark.parametrize("kw", [{}, {"num_negatives": 0}, {"igc_weight": 0.3, "tgc_weight": 0.0, "backend": "torch"},
                                {"official_tgc_indexing": True, "local_loss": True, "gather_with_grad": True,
                                 "dot_precision": "ieee", "check_finite": False, "chunk_bytes": 1 << 20}])
def test_module_holds_the_spec_of_its_keywords(kw):
    loss = DeGLALoss(**kw)
    assert loss.spec == LossSpec(**kw)
    assert DeGLALoss.from_spec(loss.spec, rank=1, world_size=2).spec == loss.spec
    for name, value in kw.items():
        assert getattr(loss, name) == value
    with pytest.raises(AttributeError, match="frozen spec"):
        loss.backend = "torch"


def test_config_key_dot_precision_and_one_line_errors():
    config = load_config(None, {"data.path": "x.json", "loss.dot_precision": "ieee", "loss.igc_weight": "0.5"})
    assert config.loss.dot_precision == "ieee" and config.loss.igc_weight == 0.5 and config.loss.local_loss
    assert load_config(None, {"data.path": "x.json"}).loss.dot_precision == "tf32"
    with pytest.raises(ConfigError, match=r"loss.dot_precision: 'fp32' is not one of tf32, ieee"):
        load_config(None, {"data.path": "x.json", "loss.dot_precision": "fp32"})
    with pytest.raises(ConfigError, match="loss.check_finite: unknown configuration key"):
        load_config(None, {"data.path": "x.json", "loss.check_finite": "true"})
    with pytest.raises(ConfigError, match="igc_weight must be >= 0"):
        LossSpec(igc_weight=-1.0)
    with pytest.raises(ConfigError, match="tgc_scale must be >= 0"):  # its field's minimum, as the config has it
        LossSpec(tgc_scale=-1.0)
