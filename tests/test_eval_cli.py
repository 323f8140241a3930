"""`degla-fast eval` end to end with the tiny open_clip model, and its one-line user errors."""
import json

import pytest
import torch
from open_clip.model import CLIP
from PIL import Image

from degla_fast.cli import main
from degla_fast.evaluate import BENCHMARKS


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from degla_fast.model import TINY_MODEL, create_model

    torch.manual_seed(0)
    bundle = create_model(TINY_MODEL)
    weights = tmp_path_factory.mktemp("model") / "tiny.pt"
    torch.save(bundle.model.state_dict(), weights)
    return bundle, weights


def test_eval_cli_matches_a_direct_computation(tiny, tmp_path, capsys):
    bundle, weights = tiny
    images = tmp_path / "images"
    images.mkdir()
    colours = [(250, 20, 20), (20, 200, 40), (30, 40, 220), (240, 240, 30)]
    records = {}
    for i, colour in enumerate(colours):
        Image.new("RGB", (80, 72), colour).save(images / f"{i}.png")
        records[str(i)] = {"filename": f"{i}.png", "caption": f"a photo of a {'red green blue yellow'.split()[i]} square",
                           "negative_caption": "a square photo of a dog"}
    # the same image used twice, with different captions: encoded once, scored twice
    records["4"] = {"filename": "0.png", "caption": "a red thing", "negative_caption": "a thing that is red"}
    (tmp_path / "swap_obj.json").write_text(json.dumps(records))
    out = tmp_path / "out" / "result.json"

    status = main(["eval", "--model", "degla-tiny", "--pretrained", str(weights), "--benchmark", "sugarcrepe",
                   "--data", str(tmp_path), "--json-out", str(out), "--device", "cpu", "--workers", "0",
                   "--batch-size", "2"])
    assert status == 0
    printed = capsys.readouterr().out
    assert "swap_obj" in printed and "| metric" in printed
    result = json.loads(out.read_text())
    assert result["benchmark"] == "sugarcrepe" and result["counts"]["swap_obj"] == 5

    # independent computation: full-length (untrimmed) tokens through open_clip's own towers
    model = bundle.model.eval()
    with torch.no_grad():
        expected = 0
        for record in records.values():
            pixels = bundle.preprocess_val(Image.open(images / record["filename"]).convert("RGB"))[None]
            img = CLIP.encode_image(model, pixels, normalize=True)
            tokens = bundle.tokenizer([record["caption"], record["negative_caption"]])
            assert tokens.shape[1] == 77
            txt = CLIP.encode_text(model, tokens, normalize=True)
            scores = (txt @ img.T).squeeze(1)
            expected += int(scores[0] > scores[1])
    assert result["metrics"]["swap_obj"] == pytest.approx(100.0 * expected / 5)
    assert result["metrics"]["swap"] == result["metrics"]["swap_obj"]


def test_unknown_benchmark_lists_the_choices(capsys):
    assert main(["eval", "--model", "degla-tiny", "--benchmark", "winoground", "--data", "x"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and all(name in err for name in BENCHMARKS)  # no usage block


def test_missing_data_is_one_line_naming_the_file(tmp_path, capsys):
    missing = tmp_path / "nowhere.json"
    status = main(["eval", "--model", "degla-tiny", "--benchmark", "valse", "--data", str(missing)])
    assert status == 2
    err = capsys.readouterr().err.strip()
    assert err == f"degla-fast: error: {missing}: file not found (--data)"
