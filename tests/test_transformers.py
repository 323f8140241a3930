"""degla_fast.integrations.transformers with a tiny randomly initialised CLIPModel and a tokenizer
built from a few-token vocabulary written here (nothing downloaded): the loss equals CLIPModel's own
at K = 0 in value and gradients, and a short Trainer run with K = 4 logs every term, saves the EMA
teacher with its checkpoints and restores it on resume."""
from __future__ import annotations

import json
import logging

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from degla_fast.integrations import transformers as degla_hf  # noqa: E402  (after the skips)

from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor,  # noqa: E402
                          CLIPTokenizer, TrainingArguments)

COLOURS = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200), "yellow": (200, 200, 30),
           "pink": (230, 120, 160), "grey": (120, 120, 120)}
SHAPES = ("circle", "square")


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    """A CLIPTokenizer over single characters (no merges) and a 32-pixel image processor."""
    folder = tmp_path_factory.mktemp("tok")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in "abcdefghijklmnopqrstuvwxyz":
            vocab[c + suffix] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return CLIPProcessor(image_processor=images, tokenizer=tokenizer)


def tiny_model(seed: int = 0) -> CLIPModel:
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(vocab_size=54, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=40, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    return CLIPModel(config)


def examples(n: int = 16) -> list[dict]:
    from PIL import Image

    names = list(COLOURS)
    rows = []
    for i in range(n):
        colour, shape = names[i % len(names)], SHAPES[(i // len(names)) % 2]
        rows.append({"image": Image.new("RGB", (40, 40), COLOURS[colour]), "caption": f"a {colour} {shape}",
                     "negatives": [f"a {c} {shape}" for c in names if c != colour]})
    return rows


def test_collator_layout(processor):
    rows = examples(3)
    batch = degla_hf.DeGLACollator(processor, num_negatives=2)(rows)
    assert batch["pixel_values"].shape == (3, 3, 32, 32)
    assert batch["input_ids"].shape[0] == 3 * (1 + 2) == batch["attention_mask"].shape[0]
    texts = processor.tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True)
    assert [t.replace(" ", "") for t in texts[:3]] == [r["caption"].replace(" ", "") for r in rows]
    for i, row in enumerate(rows):  # sample-major: example i's two negatives follow the captions, in order
        mine = [t.replace(" ", "") for t in texts[3 + 2 * i:5 + 2 * i]]
        assert set(mine) <= {n.replace(" ", "") for n in row["negatives"]} and len(set(mine)) == 2
    rows[1]["negatives"] = rows[1]["negatives"][:1]
    with pytest.raises(degla_hf.DataError, match=r"^example 1: 1 hard negatives in 'negatives', num_negatives=2"):
        degla_hf.DeGLACollator(processor, num_negatives=2)(rows)


def test_k0_equals_clip_models_own_loss_in_value_and_gradients(processor):
    model = tiny_model().double()  # float64: the two losses sum in different orders
    batch = degla_hf.DeGLACollator(processor, num_negatives=0)(examples(6))
    batch["pixel_values"] = batch["pixel_values"].double()
    with torch.no_grad():
        model.logit_scale.fill_(1.7)  # away from the init value, so that its gradient is not special
    theirs = model(**batch, return_loss=True).loss
    theirs.backward()
    their_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ours = degla_hf.clip_model_loss(model, batch, degla_hf.DeGLALoss(num_negatives=0, backend="torch")).total
    ours.backward()
    assert float(ours.detach()) == pytest.approx(float(theirs.detach()), rel=1e-12)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, their_grads[name], rtol=1e-9, atol=1e-12, msg=lambda m: f"{name}: {m}")
    assert their_grads["logit_scale"].abs() > 0


@pytest.mark.timeout(300)
def test_trainer_with_negatives_logs_the_terms_saves_and_restores_the_teacher(processor, tmp_path, caplog):
    def trainer(max_steps: int):
        args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=max_steps,
                                 learning_rate=1e-3, logging_steps=1, save_steps=2, report_to=[], use_cpu=True,
                                 dataloader_num_workers=0, seed=0, disable_tqdm=True)
        return degla_hf.DeGLATrainer(model=tiny_model(), args=args, train_dataset=examples(),
                                     data_collator=degla_hf.DeGLACollator(processor, num_negatives=4),
                                     num_negatives=4, backend="torch", ema_decay=0.9)

    first = trainer(max_steps=2)
    first.train()
    logged = [h for h in first.state.log_history if "loss" in h]
    print("\n".join(json.dumps(h) for h in logged))
    assert len(logged) == 2 and all(set(degla_hf.TERMS) <= set(h) for h in logged)
    for h in logged:  # the terms are what the trainer's loss is made of
        assert sum(h[t] for t in degla_hf.TERMS) == pytest.approx(h["loss"], rel=1e-3, abs=1e-4)
    assert logged[0]["distill_loss"] < 1e-9 < logged[1]["distill_loss"]  # teacher = student, then behind it
    saved = tmp_path / "out" / "checkpoint-2" / degla_hf.TEACHER_FILE
    state = torch.load(saved, weights_only=True)
    student = first.model.state_dict()
    assert set(state) <= set(student) and any(not torch.equal(state[k], student[k]) for k in state)

    second = trainer(max_steps=4)
    with caplog.at_level(logging.INFO):
        second.train(resume_from_checkpoint=True)
    assert f"degla-fast: EMA teacher restored from {saved}" in caplog.text
    resumed = [h for h in second.state.log_history if "loss" in h and h["step"] > 2]
    assert len(resumed) == 2 and resumed[0]["distill_loss"] > 1e-9  # the restored teacher, not the student
    assert (tmp_path / "out" / "checkpoint-4" / degla_hf.TEACHER_FILE).is_file()


def test_transformers_sees_the_hub_kernels_package_not_this_checkouts_folder():
    """The checkout's kernels/ (our Triton kernels) on sys.path shadowed the hub-kernels package
    transformers 5 imports (degla_fast/compat/transformers.py)."""
    import sys
    from importlib.metadata import PackageNotFoundError, distribution
    from pathlib import Path

    try:
        distribution("kernels")
    except PackageNotFoundError:
        pytest.skip("no hub-kernels package installed (transformers 4)")
    ours = Path(__file__).resolve().parents[1] / "kernels"
    assert Path(sys.modules["kernels"].__file__).resolve().parent != ours
