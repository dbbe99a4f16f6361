"""Data: the embedded task, LLaVA-format records, images, bad records."""

from __future__ import annotations

import json

import numpy as np
import pytest
from ml_collections import ConfigDict
from PIL import Image

from skipvision_jax.data.images import CLIP_MEAN, CLIP_STD, pad_to_square, preprocess
from skipvision_jax.data.llava import BadRecord, LlavaSource, LlavaTransform
from skipvision_jax.data.pipeline import DataSpec, text_format
from skipvision_jax.data.synthetic import COLOURS, KINDS, SyntheticVQA, chance_accuracy


def test_synthetic_task_is_deterministic_with_enough_kinds_and_answers():
    a, b = SyntheticVQA("train", 500, seed=3), SyntheticVQA("train", 500, seed=3)
    for i in (0, 7, 499):
        for key in a[i]:
            np.testing.assert_array_equal(a[i][key], b[i][key])
    assert not np.array_equal(a[0]["pixels"], SyntheticVQA("val", 500, seed=3)[0]["pixels"])
    answers, kinds = set(), set()
    for i in range(500):
        _, kind, _, answer, _ = a.sample(i)
        answers.add(answer)
        kinds.add(kind)
    assert kinds == set(KINDS) and len(answers) >= 8
    assert 0.25 < chance_accuracy(SyntheticVQA("val", 500)) < 0.45
    example = a[0]
    loss_ids = example["input_ids"][example["loss_mask"]]
    assert loss_ids[-1] == a.tokenizer.eos_id and example["text_mask"][example["loss_mask"]].all()


@pytest.fixture
def tokenizer_path(tmp_path):
    """A LLaMA-style BPE tokenizer (data/bpe.py) learnt on the conversations below in LLaVA's v1 template."""
    from skipvision_jax.data.bpe import train_llama_style
    from skipvision_jax.data.templates import TEMPLATES

    texts = [
        TEMPLATES["vicuna_v1"].render(["<image>\nwhat is in the image ?", answer]).text
        for answer in ("a cat", "a dog", "red", "what is it ?")
    ]
    path = str(tmp_path / "tokenizer.json")
    train_llama_style(texts * 20, vocab_size=400).save(path)
    return path


def _write_image(path, size=(20, 12), colour=(255, 0, 0)):
    Image.new("RGB", size, colour).save(path)


@pytest.fixture
def llava_dir(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    _write_image(images / "good1.png")
    _write_image(images / "good2.png", colour=(0, 0, 255))
    (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    turn = lambda q, a: [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}]
    records = [
        {"id": "good-1", "image": "good1.png", "conversations": turn("what is in the image ?", "a cat")},
        {"id": "missing", "image": "nope.png", "conversations": turn("what is in the image ?", "a dog")},
        {"id": "corrupt", "image": "corrupt.png", "conversations": turn("what is in the image ?", "a dog")},
        {"id": "malformed", "image": "good1.png", "conversations": [{"from": "gpt", "value": "a cat"}]},
        {
            "id": "good-2",
            "image": "good2.png",
            "conversations": turn("what is in the image ?", "red")
            + [{"from": "human", "value": "what is it ?"}, {"from": "gpt", "value": "a dog"}],
        },
    ]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    return str(path), str(images)


def _llava_cfg(json_path, image_dir, tokenizer, on_bad_record="skip"):
    return ConfigDict(
        {
            "kind": "llava",
            "json_path": json_path,
            "val_json_path": json_path,
            "image_dir": image_dir,
            "tokenizer": tokenizer,
            "template": "vicuna_v1",
            "text_len": 0,
            "val_size": 100,
            "val_fraction": 0.0,
            "on_bad_record": on_bad_record,
            "seed": 0,
        }
    )


def test_bad_records_are_counted_and_skipped(llava_dir, tokenizer_path):
    cfg = _llava_cfg(*llava_dir, tokenizer_path)
    spec = DataSpec(cfg, text_format(cfg), image_size=8)
    assert len(spec.train_source) == 4 and "malformed" in spec.train_source.skipped[0]
    batches = list(spec.val_batches(global_batch=2))
    assert spec.skipped_records == 3  # malformed at build, missing + corrupt image at load
    good = np.concatenate([b["loss_mask"].any(axis=1) for b in batches])
    assert good.sum() == 2
    iterator = spec.train_iterator(global_batch=2, seed=0)
    for _ in range(3):  # endless: bad records keep being skipped, never a crash
        assert next(iterator)["pixels"].shape == (2, 8, 8, 3)


@pytest.mark.parametrize("record_id", ["missing", "corrupt"])
def test_bad_image_raises_with_record_id_in_strict_mode(llava_dir, tokenizer_path, record_id):
    json_path, image_dir = llava_dir
    records = [r for r in json.load(open(json_path)) if r["id"] in ("good-1", record_id)]
    strict_path = json_path.replace("data.json", f"{record_id}.json")
    json.dump(records, open(strict_path, "w"))
    cfg = _llava_cfg(strict_path, image_dir, tokenizer_path, "raise")
    spec = DataSpec(cfg, text_format(cfg), image_size=8)
    with pytest.raises(BadRecord, match=f"record {record_id}: "):
        list(spec.val_batches(global_batch=2))


def test_malformed_record_raises_in_strict_mode(llava_dir):
    with pytest.raises(BadRecord, match="record malformed: .conversations. must be"):
        LlavaSource(llava_dir[0], on_bad_record="raise")


def test_llava_transform_masks_answers_and_fixes_the_image_offset(llava_dir, tokenizer_path):
    cfg = _llava_cfg(*llava_dir, tokenizer_path)
    codec = text_format(cfg)
    source = LlavaSource(llava_dir[0])
    transform = LlavaTransform(codec, llava_dir[1], image_size=8, text_len=256)
    examples = [transform(source[i]) for i in (0, 3)]
    tok = codec.tokenizer
    for example in examples:
        assert example["input_ids"][0] == tok.token_to_id("<s>")
        decoded_prefix = tok.decode(example["input_ids"][: codec.image_offset].tolist())
        assert decoded_prefix.endswith("the user's questions. USER: ")  # LLaVA's text before <image>
    answers = [tok.decode(e["input_ids"][e["loss_mask"]].tolist(), skip_special_tokens=False) for e in examples]
    assert answers[0] == "a cat</s>" and answers[1] == "red</s> a dog</s>"


def test_text_length_is_measured_and_longer_conversations_are_cut_and_counted(llava_dir, tokenizer_path):
    cfg = _llava_cfg(*llava_dir, tokenizer_path)
    codec = text_format(cfg)
    longest = max(len(codec.example([t["value"] for t in r["conversations"]])[0]) for r in LlavaSource(cfg.json_path))
    assert DataSpec(cfg, codec, image_size=8).text_len == longest
    cfg.text_len = longest - 1
    spec = DataSpec(cfg, codec, image_size=8)
    assert spec.truncated_at_start == 1
    batches = list(spec.val_batches(global_batch=2))
    assert spec.truncated_records == 1 and all(b["input_ids"].shape[1] == longest - 1 for b in batches)


def test_validation_is_held_back_from_the_training_file(llava_dir, tokenizer_path):
    cfg = _llava_cfg(*llava_dir, tokenizer_path)
    cfg.val_json_path, cfg.val_fraction, cfg.val_size = "", 0.5, 100
    spec = DataSpec(cfg, text_format(cfg), image_size=8)
    train_ids = {r["id"] for r in spec.train_source.records}
    val_ids = {r["id"] for r in spec.val_source.records}
    assert len(val_ids) == 2 and len(train_ids) == 2 and not train_ids & val_ids
    again = DataSpec(cfg, text_format(cfg), image_size=8)
    assert {r["id"] for r in again.val_source.records} == val_ids  # the same records on a rerun


def test_pad_to_square_and_clip_normalization():
    image = Image.new("RGB", (20, 10), (255, 255, 255))
    square = pad_to_square(image)
    assert square.size == (20, 20)
    pixels = preprocess(image, 16)
    assert pixels.shape == (16, 16, 3) and pixels.dtype == np.float32
    np.testing.assert_allclose(pixels[8, 8], (1.0 - CLIP_MEAN) / CLIP_STD, rtol=1e-5)
    np.testing.assert_allclose(pixels[0, 8], (np.round(CLIP_MEAN * 255) / 255 - CLIP_MEAN) / CLIP_STD, atol=0.02)


def test_missing_json_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="data.json_path: no such file"):
        LlavaSource(str(tmp_path / "none.json"))


def test_each_epoch_is_a_fresh_permutation_and_process_rows_rebuild_the_global_batch():
    cfg = ConfigDict({"kind": "synthetic", "seed": 0, "train_size": 16, "val_size": 4, "text_len": 16})
    spec = DataSpec(cfg, text_format(cfg), image_size=32)
    key = lambda batch: [bytes(p.tobytes()) for p in batch["pixels"]]
    iterator = spec.train_iterator(global_batch=4, seed=0)
    epochs = [[k for _ in range(4) for k in key(next(iterator))] for _ in range(2)]
    assert len(set(epochs[0])) == 16 and set(epochs[0]) == set(epochs[1]) and epochs[0] != epochs[1]
    # Two processes holding rows [0, 2) and [2, 4) of each global batch see
    # disjoint halves that concatenate to the single-process batches, in order.
    halves = [spec.train_iterator(global_batch=4, seed=0, rows=rows) for rows in ((0, 2), (2, 4))]
    rebuilt = [k for _ in range(8) for half in halves for k in key(next(half))]
    assert rebuilt == epochs[0] + epochs[1]


def test_embedded_tokenizer_ignores_case_and_punctuation_spacing_and_names_unknown_words():
    tok = SyntheticVQA.tokenizer
    typed, spaced = tok.encode("What color is the RING?"), tok.encode("what color is the ring ?")
    assert typed == spaced and len(typed) == 6 and tok.vocab[typed[-1]] == "?"
    assert tok.decode(typed + [tok.eos_id] + typed) == "what color is the ring ?"  # stops at <eos>
    assert tok.decode([tok.bos_id, *tok.encode("red"), tok.pad_id]) == "red"
    with pytest.raises(ValueError, match="word 'colour' is not in the vocabulary"):
        tok.encode("What colour is the ring?")


def _colour_cells(image: np.ndarray, cell: int) -> dict[tuple[int, int], tuple[str, np.ndarray]]:
    """Read off the pixels: (row, col) -> (colour name, [cell, cell] mask) of
    each grid cell that holds a flat-coloured object (the background is dark)."""
    found = {}
    for name, rgb in COLOURS.items():
        painted = np.all(np.abs(image - np.round(np.array(rgb) * 255) / 255) < 1e-6, axis=-1)
        for r, c in {(y // cell, x // cell) for y, x in zip(*np.nonzero(painted))}:
            found[(r, c)] = (name, painted[r * cell : (r + 1) * cell, c * cell : (c + 1) * cell])
    return found


def test_position_answers_agree_with_the_rendered_pixels():
    source = SyntheticVQA("val", 400)
    checked = 0
    for i in range(len(source)):
        scene, kind, question, answer, rng = source.sample(i)
        if kind != "position":
            continue
        cells = _colour_cells(scene.render(rng), 8)
        where = {colour: cell for cell, (colour, _) in cells.items()}
        words = question.split()
        first, second = words[words.index("the") + 1], words[words.index("or") + 2]
        axis = 1 if "left" in words else 0
        assert answer == (first if where[first][axis] < where[second][axis] else second), question
        checked += 1
    assert checked > 50


def test_detail_answers_agree_with_the_glyphs_read_off_the_pixels():
    from skipvision_jax.data.detail import FONT, DetailVQA

    def read_digit(mask):
        crop = mask[1:6, 2:5]  # the glyph's 3 x 5 box, centred in the 8 x 8 cell
        matches = [d for d, rows in FONT.items() if np.array_equal(crop, [[p == "1" for p in row] for row in rows])]
        assert len(matches) == 1
        return matches[0]

    source = DetailVQA("val", 200, text_len=15)
    kinds = set()
    for i in range(len(source)):
        scene, kind, question, answer, rng = source.sample(i)
        cells = {
            cell: (colour, read_digit(mask)) for cell, (colour, mask) in _colour_cells(scene.render(rng), 8).items()
        }
        row = int(question.split()[5]) - 1
        field = 1 if kind == "digits" else 0
        assert answer == " ".join(cells[(row, col)][field] if (row, col) in cells else "-" for col in range(6))
        kinds.add(kind)
    assert kinds == {"digits", "colours"}
