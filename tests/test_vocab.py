"""degla-synth's compact vocabulary: every word the synthetic world writes has its own id, the
special ids keep their roles (padding 0, end-of-text the largest, so argmax pooling still finds it),
and the tokenizer survives pickling (the token cache tokenizes in worker processes)."""
import pickle

import open_clip
import pytest
import torch

from degla_fast.data import synthetic as S
from degla_fast.model import create_model
from degla_fast.vocab import COMPACT_MODELS, CompactTokenizer, clip_vocabulary_overrides, model_fingerprint


@pytest.fixture(scope="module")
def bundle():
    return create_model("degla-synth")


def world_texts(seeds=(0, 1), items=600):
    """Captions, hard negatives, evaluation captions and zero-shot prompts of rendered worlds."""
    texts = []
    for seed in seeds:
        for i in range(items):
            texts.append(S.pretrain_item(seed, i)[1].text())
            _, caption, negatives = S.train_item(seed, i)
            texts += [caption.text(), *negatives]
        for subset in S.EVAL_SUBSETS:
            for split in ("val", "test"):
                for i in range(items // 10):
                    item = S.eval_item(seed, subset, i, split)
                    texts += [x if isinstance(x, str) else x.text() for x in item[1:3]]
    for task, classes in S.ZEROSHOT_CLASSES.items():
        texts += [t.format(c) for t in S.ZEROSHOT_TEMPLATES[task] for c in classes]
    return texts


def test_every_word_of_the_world_has_an_id(bundle):
    tok = bundle.tokenizer
    assert isinstance(tok, CompactTokenizer)
    texts = world_texts()
    ids = tok(texts)
    unknown = [t for t, row in zip(texts, ids) if (row == tok.unknown_id).any()]
    assert not unknown, f"words outside degla-synth's vocabulary: {unknown[:5]}"
    # one id per BPE piece: the compact ids are a relabelling, not a merge
    base = open_clip.get_tokenizer("degla-synth")(texts)
    pairs = set(zip(base.flatten().tolist(), ids.flatten().tolist()))
    assert len({b for b, _ in pairs}) == len({c for _, c in pairs}) == len(pairs)


def test_the_compact_model_is_the_full_vocabulary_model_on_the_world():
    # Same seed: the compact model's weights are the full model's, its token rows those its ids read,
    # so every world text (and image) gets the full model's features: the same start point, trained faster.
    torch.manual_seed(3)
    compact = create_model("degla-synth")
    torch.manual_seed(3)
    full = open_clip.create_model("degla-synth", **clip_vocabulary_overrides("degla-synth"))
    assert full.token_embedding.num_embeddings == 49408 and compact.model.token_embedding.num_embeddings == 128
    texts = world_texts(seeds=(0,), items=100)
    images = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        a = compact.model.encode_text(compact.tokenizer(texts))
        b = full.encode_text(open_clip.get_tokenizer("degla-synth")(texts))
        # (the compact bundle's text path runs trimmed batches: other matmul shapes, so float rounding)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert torch.equal(compact.model.encode_image(images), full.encode_image(images))
    rest = {k: v for k, v in full.state_dict().items() if k != "token_embedding.weight"}
    assert all(torch.equal(compact.model.state_dict()[k], v) for k, v in rest.items())


def test_a_saved_compact_model_loads(tmp_path, bundle):
    path = tmp_path / "weights.pt"
    torch.save(bundle.model.state_dict(), path)
    again = create_model("degla-synth", str(path))
    assert torch.equal(again.model.token_embedding.weight, bundle.model.token_embedding.weight)
    assert isinstance(again.tokenizer, CompactTokenizer)


def test_special_ids_and_pooling(bundle):
    tok, model = bundle.tokenizer, bundle.model
    rows = model.token_embedding.num_embeddings
    assert rows == open_clip.get_model_config("degla-synth")["text_cfg"]["vocab_size"] == tok.vocab_size
    ids = tok(["a red circle to the left of a blue square", "a zebra", ""])
    assert ids.max() < rows and ids.min() >= 0
    assert (ids[:, 0] == 1).all()
    assert (ids.argmax(1) == (ids != 0).sum(1) - 1).all()  # end-of-text is the last and largest id
    assert ids[1, 2] == tok.unknown_id and ids[1, 3] == tok.eot_token_id == rows - 1
    assert (ids[2, 2:] == 0).all()
    with torch.no_grad():
        assert torch.isfinite(model.encode_text(ids)).all()


def test_pickles_and_other_models_keep_clip_vocabulary(bundle):
    again = pickle.loads(pickle.dumps(bundle.tokenizer))
    texts = ["there are three stars", "an image of a checkered semicircle"]
    assert torch.equal(again(texts), bundle.tokenizer(texts))
    assert "degla-tiny" not in COMPACT_MODELS
    assert not isinstance(create_model("degla-tiny").tokenizer, CompactTokenizer)


def test_fingerprint_follows_the_words(monkeypatch):
    before = model_fingerprint("degla-synth")
    monkeypatch.setitem(COMPACT_MODELS, "degla-synth", COMPACT_MODELS["degla-synth"] + ("zebra",))
    assert model_fingerprint("degla-synth") != before
    assert model_fingerprint("degla-tiny") != before
