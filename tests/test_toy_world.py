"""The toy world: grammar, splits, renderer, tokenizer, grid."""

import json

import pytest
import torch
from PIL import Image
from transformers import CLIPTokenizer

from spo_fast.toy import (
    MAX_LENGTH,
    all_prompts,
    make_dataset,
    parse_prompt,
    prompt_splits,
    render,
    sample_prompts,
    save_grid,
    toy_tokenizer_path,
)
from spo_fast.toy.tokenizer import write_tokenizer_files
from spo_fast.toy.world import vocabulary


def test_world_is_deterministic_and_in_range():
    p1, x1 = make_dataset(64, seed=3)
    p2, x2 = make_dataset(64, seed=3)
    p3, x3 = make_dataset(64, seed=4)
    assert p1 == p2 and torch.equal(x1, x2)
    assert p1 != p3 or not torch.equal(x1, x3)
    assert x1.shape == (64, 3, 32, 32) and x1.dtype == torch.float32
    assert float(x1.min()) >= -1 and float(x1.max()) <= 1
    assert torch.equal(render(p1[:4]), render(p1[:4]))  # canonical renders need no seed


def test_splits_are_disjoint_and_cover_the_grammar():
    train, held = prompt_splits()
    assert set(train).isdisjoint(held)
    assert sorted(train + held) == sorted(all_prompts())
    assert 0.1 < len(held) / len(all_prompts()) < 0.2
    assert prompt_splits() == (train, held)
    assert set(sample_prompts(50, seed=1, split="held_out")) <= set(held)
    with pytest.raises(ValueError):
        sample_prompts(2, split="test")


def test_parse_prompt_roundtrip_and_errors():
    p = "a small red circle on the left on a blue background"
    a = parse_prompt(p)
    assert (a.size, a.colour, a.shape, a.position, a.background) == ("small", "red", "circle", "on the left", "blue")
    assert a.prompt() == p
    assert parse_prompt("  A Small RED circle on the left on a blue background ") == a
    for bad in ["a small red circle", "a huge red circle on the left on a blue background", ""]:
        with pytest.raises(ValueError):
            parse_prompt(bad)


def test_render_draws_object_where_the_prompt_says():
    img = render(["a large red square on the left on a blue background"])[0]
    red = torch.tensor([0.90, 0.12, 0.12]) * 2 - 1
    is_red = ((img - red[:, None, None]) ** 2).sum(0) < 0.01
    cols = is_red.float().sum(0).nonzero().flatten()
    assert is_red.any() and float(cols.float().mean()) < 14  # centred left of the middle column (16)


def test_tokenizer_files_load_with_clip_tokenizer(tmp_path):
    tok = CLIPTokenizer.from_pretrained(str(toy_tokenizer_path()))
    assert tok.model_max_length == MAX_LENGTH
    # The shipped files are exactly what the generator writes (they are a function of the grammar).
    write_tokenizer_files(tmp_path)
    for name in ("vocab.json", "merges.txt"):
        assert (tmp_path / name).read_text() == (toy_tokenizer_path() / name).read_text()
    vocab = json.loads((tmp_path / "vocab.json").read_text())
    assert len(tok) == len(vocab)
    for word in vocabulary():
        ids = tok(word, add_special_tokens=False).input_ids
        assert len(ids) == 1 and tok.convert_ids_to_tokens(ids) == [word + "</w>"]
    prompts = all_prompts()[::97]
    enc = tok(prompts, padding="max_length", max_length=MAX_LENGTH, truncation=True)
    assert all(len(ids) == MAX_LENGTH for ids in enc.input_ids)
    assert tok.batch_decode(enc.input_ids, skip_special_tokens=True) == prompts


def test_unknown_words_tokenize():
    tok = CLIPTokenizer.from_pretrained(str(toy_tokenizer_path()))
    text = "a zebra-striped Ünïcode hexagon 42 🦄"
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert len(ids) > 8  # sub-word / byte pieces, not one unknown token
    assert tok.unk_token_id not in ids[1:-1]
    # CLIP's decoder puts a space after every end-of-word piece, so compare without spaces.
    assert tok.decode(ids, skip_special_tokens=True).replace(" ", "") == text.lower().replace(" ", "")
    padded = tok([text], padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt")
    assert padded.input_ids.shape == (1, MAX_LENGTH)


def test_save_grid(tmp_path):
    prompts = sample_prompts(6, seed=0)
    path = save_grid(render(prompts), prompts, tmp_path / "grid.png", ncols=3)
    with Image.open(path) as im:
        assert im.mode == "RGB" and im.width > 3 * 128 and im.height > 2 * 128
    with pytest.raises(ValueError):
        save_grid(render(prompts), prompts[:2], tmp_path / "bad.png")
