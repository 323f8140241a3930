"""degla_fast.model: trimmed text encoding is exact, checkpoints load, errors name the culprit."""
import copy

import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.model import CLIP
from open_clip.transformer import Transformer

from degla_fast.data.text import trim_tokens
from degla_fast.errors import ConfigError, DataError, ShapeError
from degla_fast.model import (TINY_MODEL, ModelBundle, TrimmedTextCLIP, clip_features, create_model, encode_image,
                              encode_text, load_model, pad_tokens)
from degla_fast.precision import autocast, autocast_dtype

CAPTIONS = ["a red circle", "a small blue square to the left of a big green triangle",
            "two shapes", "a yellow star above a purple hexagon and an orange circle"]


@pytest.fixture(scope="module")
def bundle() -> ModelBundle:
    torch.manual_seed(0)
    return create_model(TINY_MODEL)


def padded_reference(model, tokens):
    """open_clip's own full-length text path (77 positions), the independent expectation."""
    return F.normalize(CLIP.encode_text(model, pad_tokens(tokens, 77)), dim=-1)


def sequence_first_copy(model):
    """The same weights with the text transformer running [L, N, D] (batch_first=False)."""
    twin = copy.deepcopy(model)
    old = twin.transformer
    new = Transformer(old.width, old.layers, heads=4, batch_first=False)
    new.load_state_dict(old.state_dict())
    twin.transformer = new
    return twin


def test_tiny_model_is_registered_and_bundled(bundle):
    assert TINY_MODEL == "degla-tiny" and TINY_MODEL in open_clip.list_models()
    assert isinstance(bundle.model, TrimmedTextCLIP) and isinstance(bundle.model, CLIP)
    assert (bundle.name, bundle.pretrained, bundle.image_size, bundle.context_length) == (TINY_MODEL, None, 64, 77)
    assert len(bundle.mean) == len(bundle.std) == 3
    tokens = bundle.tokenizer(CAPTIONS)
    assert tokens.shape == (4, 77) and tokens.dtype == torch.long
    from PIL import Image
    image = bundle.preprocess_val(Image.new("RGB", (100, 80), (255, 0, 0)))
    assert image.shape == (3, 64, 64)
    # A trimmed model keeps open_clip's state-dict keys, so plain open_clip can load its weights.
    assert set(bundle.model.state_dict()) == set(open_clip.create_model(TINY_MODEL).state_dict())


@pytest.mark.parametrize("layout", ["batch_first", "sequence_first"])
def test_trimmed_text_equals_padded(bundle, layout):
    model = bundle.model.eval() if layout == "batch_first" else sequence_first_copy(bundle.model).eval()
    full = bundle.tokenizer(CAPTIONS)
    trimmed = trim_tokens(full)
    assert trimmed.shape[1] < 20 and (trimmed[:, -1] != 0).any()
    with torch.no_grad():
        expected = padded_reference(model, full)
        for tokens in (trimmed, full, pad_tokens(trimmed, 30)):
            torch.testing.assert_close(encode_text(model, tokens), expected, rtol=1e-5, atol=1e-5)
            # model.forward takes the trimmed path too (this is what a DeepSpeed engine calls)
            torch.testing.assert_close(model(None, tokens)[1], expected, rtol=1e-5, atol=1e-5)


def test_trimmed_text_gradients_equal_padded(bundle):
    model = copy.deepcopy(bundle.model).train()
    full = bundle.tokenizer(CAPTIONS)
    weights = torch.randn(4, 128)

    def grads(run):
        model.zero_grad()
        (run() * weights).sum().backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    trimmed = grads(lambda: encode_text(model, trim_tokens(full)))
    padded = grads(lambda: padded_reference(model, full))
    assert trimmed.keys() == padded.keys() and "positional_embedding" in trimmed
    for name in padded:
        # float32 sums in a different order: tolerance relative to the largest entry
        atol = 1e-5 * float(padded[name].abs().max()) + 1e-8
        torch.testing.assert_close(trimmed[name], padded[name], rtol=1e-4, atol=atol, msg=name)


def test_pooling_that_sees_padding_falls_back_to_full_length(bundle):
    model = copy.deepcopy(bundle.model).eval()
    model.text_pool_type = "last"
    full = bundle.tokenizer(CAPTIONS)
    with torch.no_grad():
        expected = padded_reference(model, full)
        torch.testing.assert_close(encode_text(model, trim_tokens(full)), expected, rtol=1e-5, atol=1e-5)
        # and the fallback matters: running "last" pooling on the trimmed batch would differ
        model.text_pool_type = "argmax"
        assert not torch.allclose(encode_text(model, trim_tokens(full)), expected, atol=1e-3)


def test_clip_features_and_encoders(bundle):
    model = bundle.model.eval()
    images = torch.randn(3, 3, 64, 64)
    tokens = trim_tokens(bundle.tokenizer(CAPTIONS[:3]))
    with torch.no_grad():
        image_features, text_features, scale = clip_features(model, images, tokens)
        torch.testing.assert_close(image_features, F.normalize(model.visual(images), dim=-1))
        torch.testing.assert_close(text_features, padded_reference(model, tokens), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(encode_image(model, images), image_features)
    assert scale.dim() == 0 and scale.item() == pytest.approx(1 / 0.07, rel=1e-5)
    assert torch.allclose(image_features.norm(dim=-1), torch.ones(3), atol=1e-5)
    # wrapped models (DDP, DeepSpeed engine) are unwrapped through .module
    wrapper = torch.nn.Module()
    wrapper.module = model
    with torch.no_grad():
        torch.testing.assert_close(encode_text(wrapper, tokens), text_features)


def test_plain_open_clip_model_is_padded(bundle):
    plain = open_clip.create_model(TINY_MODEL).eval()
    assert type(plain) is CLIP
    tokens = trim_tokens(bundle.tokenizer(CAPTIONS))
    with torch.no_grad():
        _, text_features, _ = clip_features(plain, torch.randn(4, 3, 64, 64), tokens)
        torch.testing.assert_close(text_features, padded_reference(plain, tokens), rtol=1e-5, atol=1e-5)


def test_teacher_copy_keeps_the_trimmed_path(bundle):
    teacher = copy.deepcopy(bundle.model)
    assert type(teacher) is TrimmedTextCLIP
    tokens = trim_tokens(bundle.tokenizer(CAPTIONS))
    with torch.no_grad():
        torch.testing.assert_close(teacher(None, tokens)[1], encode_text(bundle.model, tokens))


def test_bf16_and_amp_precisions():
    # One meaning of each precision: an autocast over fp32 weights (degla_fast.precision).
    low = create_model(TINY_MODEL, precision="bf16")
    assert low.model.visual.conv1.weight.dtype == torch.float32 and low.precision == "bf16"
    tokens = low.tokenizer(CAPTIONS)
    with torch.no_grad(), autocast(low.precision, "cpu"):
        features = encode_text(low.model, trim_tokens(tokens))
        assert features.dtype == torch.bfloat16
        torch.testing.assert_close(features.float(), padded_reference(low.model, tokens).float(), rtol=0, atol=2e-2)
    amp = create_model(TINY_MODEL, precision="amp")
    assert amp.model.visual.conv1.weight.dtype == torch.float32
    with torch.no_grad(), autocast("amp", "cpu"):
        assert encode_image(amp.model, torch.randn(2, 3, 64, 64)).dtype == torch.bfloat16
    with torch.no_grad(), autocast("fp32", "cpu"):
        assert encode_image(amp.model, torch.randn(2, 3, 64, 64)).dtype == torch.float32
    cuda = torch.device("cuda")  # the rule needs no GPU
    assert [autocast_dtype(p, cuda) for p in ("fp32", "bf16", "amp")] == [None, torch.bfloat16, torch.float16]
    assert autocast_dtype("amp", cuda, deepspeed=True) == autocast_dtype("amp", "cpu") == torch.bfloat16


def write_checkpoint(folder, bundle, step, **overrides):
    folder.mkdir(parents=True, exist_ok=True)
    student = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in bundle.model.state_dict().items()}
    state = {"format": "degla-fast/checkpoint", "version": 1, "model_name": TINY_MODEL, "pretrained": None,
             "student": student, "teacher": bundle.model.state_dict(), "step": step, "epoch": 0,
             "rng": [rng_state()]}  # as train writes it: tensors and plain values
    state.update(overrides)
    name = f"step_{step:08d}.pt"
    torch.save(state, folder / name)
    (folder / "latest").write_text(name + "\n")
    return folder / name, student


def rng_state():
    from degla_fast.checkpoint import rng_state

    return rng_state()


def test_load_model_reads_checkpoints(tmp_path, bundle):
    write_checkpoint(tmp_path / "run" / "checkpoints", bundle, 1)
    path, student = write_checkpoint(tmp_path / "run" / "checkpoints", bundle, 2)
    for where in (tmp_path / "run", tmp_path / "run" / "checkpoints", tmp_path / "run" / "checkpoints" / "latest",
                  path):
        loaded = load_model(None, where)
        assert loaded.pretrained == str(path) and loaded.name == TINY_MODEL
        assert isinstance(loaded.model, TrimmedTextCLIP)
        for key, value in loaded.model.state_dict().items():
            assert torch.equal(value, student[key]), key
    # a plain state dict (what `degla-fast export` writes) needs the model name
    plain = tmp_path / "plain.pt"
    torch.save(student, plain)
    loaded = load_model(TINY_MODEL, plain)
    assert torch.equal(loaded.model.text_projection, student["text_projection"])
    with pytest.raises(ConfigError, match="model"):
        load_model(None, plain)


def test_load_model_errors(tmp_path, bundle):
    path, _ = write_checkpoint(tmp_path / "a", bundle, 3, version=7)
    with pytest.raises(DataError, match="version 7"):
        load_model(None, path)
    path, _ = write_checkpoint(tmp_path / "b", bundle, 3)
    with pytest.raises(ConfigError, match="ViT-B-32"):
        load_model("ViT-B-32", path)
    (tmp_path / "c" / "checkpoints").mkdir(parents=True)
    (tmp_path / "c" / "checkpoints" / "latest").write_text("step_00000009.pt")
    with pytest.raises(DataError, match="step_00000009.pt"):
        load_model(None, tmp_path / "c")
    with pytest.raises(DataError, match="no such checkpoint"):
        load_model(TINY_MODEL, tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="junk.pt"):
        load_model(TINY_MODEL, tmp_path / "junk.pt")
    # NumPy arrays (how RNG states used to be saved) need the unsafe loader: refused, never retried
    path, _ = write_checkpoint(tmp_path / "d", bundle, 3, rng={"numpy": __import__("numpy").random.get_state()})
    with pytest.raises(DataError, match="refused by the safe loader"):
        load_model(None, path)


def test_user_errors_name_the_culprit(bundle):
    with pytest.raises(ConfigError, match="no-such-model"):
        create_model("no-such-model")
    with pytest.raises(ConfigError, match="precision"):
        create_model(TINY_MODEL, precision="fp8")
    with pytest.raises(ConfigError, match="not-a-tag"):
        create_model(TINY_MODEL, pretrained="not-a-tag")
    with pytest.raises(ShapeError, match="context length is 77"):
        encode_text(bundle.model, torch.ones(2, 78, dtype=torch.long))
    with pytest.raises(ShapeError, match=r"\[N, L\]"):
        encode_text(bundle.model, torch.ones(78, dtype=torch.long))
