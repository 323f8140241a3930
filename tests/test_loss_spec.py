"""The loss options have one owner: ``LossSpec`` is what DeGLALoss, degla_loss and the
trainer's ``loss:`` section hold (issue 22)."""
import dataclasses
import inspect

import pytest

from degla_fast import DeGLALoss, LossSpec
from degla_fast.errors import ConfigError
from degla_fast.loss import degla_loss
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
        assert getattr(loss.spec, name) == value
    assert not hasattr(loss, "num_negatives")  # one way to read an option: loss.spec
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
    with pytest.raises(ConfigError, match="igc_weight: must be >= 0"):
        LossSpec(igc_weight=-1.0)
    with pytest.raises(ConfigError, match="tgc_scale: must be >= 0"):  # its field's minimum, as the config has it
        LossSpec(tgc_scale=-1.0)


# ---------------------------------------------------------------- every public argument checked where it enters

BAD_OPTIONS = [
    ({"num_negatives": 2.5}, "num_negatives: must be an integer, got 2.5"),
    ({"num_negatives": "4"}, "num_negatives: must be an integer, got '4'"),
    ({"num_negatives": True}, "num_negatives: must be an integer, got True"),
    ({"num_negatives": -1}, "num_negatives: must be >= 0, got -1"),
    ({"igc_weight": "0.1"}, "igc_weight: must be a number, got '0.1'"),
    ({"igc_weight": "x"}, "igc_weight: must be a number, got 'x'"),
    ({"distill_weight": float("nan")}, "distill_weight: must be a finite number, got nan"),
    ({"tgc_weight": float("inf")}, "tgc_weight: must be a finite number, got inf"),
    ({"tgc_scale": -1.0}, "tgc_scale: must be >= 0.0, got -1.0"),
    ({"local_loss": "yes"}, "local_loss: must be true or false, got 'yes'"),
    ({"gather_with_grad": 1}, "gather_with_grad: must be true or false, got 1"),
    ({"official_tgc_indexing": "False"}, "official_tgc_indexing: must be true or false, got 'False'"),
    ({"backend": "cuda"}, "backend: 'cuda' is not one of auto, reference, torch, gemm, triton"),
    ({"dot_precision": 32}, "dot_precision: must be a string, got 32"),
    ({"chunk_bytes": 0}, "chunk_bytes: must be >= 1, got 0"),
    ({"chunk_bytes": 1e6}, "chunk_bytes: must be an integer, got 1000000.0"),
]


def _one_line_config_error(call, message):
    with pytest.raises(ConfigError) as err:
        call()
    assert str(err.value).endswith(message) and "\n" not in str(err.value), str(err.value)


@pytest.mark.parametrize("kw, message", BAD_OPTIONS, ids=[next(iter(kw)) + "=" + repr(v) for kw, _ in BAD_OPTIONS
                                                          for v in kw.values()])
def test_every_public_form_checks_its_options_in_one_line(kw, message):
    """The spec's checks, at every door: LossSpec, DeGLALoss, degla_loss, open_clip's use_degla_loss
    (before anything is replaced) and the trainer's configuration (as a flag's string would not
    be: there strings are read as their type first)."""
    import torch

    from degla_fast.integrations.open_clip import FROM_ARGS, use_degla_loss

    inputs = (torch.zeros(1, 4), torch.zeros(5, 4), torch.ones(()))
    _one_line_config_error(lambda: LossSpec(**kw), message)
    _one_line_config_error(lambda: DeGLALoss(**kw), message)
    _one_line_config_error(lambda: degla_loss(*inputs, **kw), message)
    if not set(kw) & set(FROM_ARGS):  # those come from open_clip_train's own flags: refused by name
        _one_line_config_error(lambda: use_degla_loss(**kw), message)


def test_numpy_scalars_are_numbers_and_kept_as_python_ones():
    np = pytest.importorskip("numpy")
    spec = LossSpec(num_negatives=np.int64(3), igc_weight=np.float32(0.25))
    assert type(spec.num_negatives) is int and spec.num_negatives == 3
    assert type(spec.igc_weight) is float and spec.igc_weight == 0.25


@pytest.mark.parametrize("rank, world_size, message", [(2, 2, r"rank must be in \[0, world_size=2\), got 2"),
                                                       (-1, 2, "rank: must be >= 0, got -1"),
                                                       (0, 0, "world_size: must be >= 1, got 0"),
                                                       ("0", 1, "rank: must be an integer, got '0'")])
def test_rank_and_world_size_are_checked(rank, world_size, message):
    import torch

    with pytest.raises(ConfigError, match=message):
        DeGLALoss(rank=rank, world_size=world_size)
    with pytest.raises(ConfigError, match=message):
        DeGLALoss.from_spec(LossSpec(), rank=rank, world_size=world_size)
    with pytest.raises(ConfigError, match=message):
        degla_loss(torch.zeros(1, 4), torch.zeros(5, 4), torch.ones(()), rank=rank, world_size=world_size)


@pytest.mark.parametrize("backend", ["reference", "torch", "gemm", "triton"])
@pytest.mark.parametrize("k", [0, 2])
def test_an_empty_batch_is_a_one_line_shape_error_on_every_backend(backend, k, kernel_device):
    """B = 0 used to give NaN (torch), a broadcast RuntimeError (gemm) or ZeroDivisionError (triton)."""
    import torch

    from degla_fast.errors import ShapeError

    device = kernel_device if backend in ("gemm", "triton") else torch.device("cpu")
    image, text = torch.zeros(0, 8, device=device), torch.zeros(0, 8, device=device)
    loss = DeGLALoss(num_negatives=k, backend=backend)
    with pytest.raises(ShapeError, match=r"^image_features: an empty batch \(B = 0\) has no loss") as err:
        loss(image, text, torch.ones((), device=device), image, text)
    assert "\n" not in str(err.value)
