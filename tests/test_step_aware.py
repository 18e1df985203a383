"""Step-aware preference model: golden equality with the official class, loading, errors and the text cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spo_fast.preference import StepAwarePreferenceModel, make_tiny_step_aware_model, tiny_clip_config

GOLDEN = Path(__file__).parent / "data" / "tiny_step_aware_preference_model"
CKPT = GOLDEN / "step_aware_preference_model.bin"
TOL = 1e-4


@pytest.fixture(scope="module")
def expected() -> dict:
    return json.loads((GOLDEN / "expected.json").read_text())


@pytest.fixture(scope="module")
def golden_model() -> StepAwarePreferenceModel:
    # The golden folder holds only the CLIP config: with a checkpoint nothing else is needed.
    return StepAwarePreferenceModel.from_pretrained(GOLDEN, CKPT)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    return make_tiny_step_aware_model(tmp_path_factory.mktemp("tiny_spm"), seed=3)


@pytest.fixture(scope="module")
def tiny_model(tiny) -> StepAwarePreferenceModel:
    backbone, ckpt = tiny
    return StepAwarePreferenceModel.from_pretrained(backbone, ckpt)


def _t(x) -> torch.Tensor:
    return torch.tensor(x)


# ---------------------------------------------------------------------- golden


@torch.no_grad()
def test_golden_features_and_scores(golden_model, expected):
    img = golden_model.image_features(_t(expected["pixel_values"]), _t(expected["timesteps"]))
    txt = golden_model.text_features(_t(expected["input_ids"]))
    torch.testing.assert_close(img, _t(expected["image_features"]), atol=TOL, rtol=0)
    torch.testing.assert_close(txt, _t(expected["text_features"]), atol=TOL, rtol=0)
    score = golden_model.logit_scale.exp() * torch.cosine_similarity(img, txt, dim=-1)
    torch.testing.assert_close(score, _t(expected["score"]), atol=TOL, rtol=0)


@pytest.mark.parametrize("case", range(3))
@torch.no_grad()
def test_golden_preprocess_cases(golden_model, expected, case):
    c = expected["preprocess_cases"][case]
    score = golden_model.score_input_ids(_t(c["images"]), _t(c["timesteps"]), _t(c["input_ids"]))
    torch.testing.assert_close(score, _t(c["score"]), atol=TOL, rtol=0)


def test_golden_keys_round_trip(golden_model, expected, tmp_path):
    assert sorted(golden_model.state_dict()) == sorted(expected["state_dict_keys"])
    path = golden_model.save_checkpoint(tmp_path / "spm.safetensors")
    again = StepAwarePreferenceModel.from_pretrained(GOLDEN, path)
    with torch.no_grad():
        a = again.image_features(_t(expected["pixel_values"]), _t(expected["timesteps"]))
    torch.testing.assert_close(a, _t(expected["image_features"]), atol=TOL, rtol=0)


def test_features_depend_on_timestep(golden_model, expected):
    x = _t(expected["pixel_values"])[:1].repeat(2, 1, 1, 1)
    with torch.no_grad():
        f = golden_model.image_features(x, torch.tensor([0.0, 999.0]))
    assert not torch.allclose(f[0], f[1], atol=1e-3)


# ---------------------------------------------------------------------- local backbone folder


def test_local_backbone_scores_prompts(tiny, tiny_model):
    backbone, _ = tiny
    assert tiny_model.tokenizer is not None and tiny_model.image_size == 32
    assert not tiny_model.training and not any(p.requires_grad for p in tiny_model.parameters())
    images = torch.rand(3, 3, 40, 56, generator=torch.Generator().manual_seed(0)) * 2 - 1
    prompts = ["a cat", "a dog on a hill", "a cat"]
    t = torch.tensor([981, 501, 21])
    with torch.no_grad():
        s = tiny_model(images, t, prompts)
        ref = tiny_model.score_input_ids(images, t, tiny_model.tokenize(prompts))
    assert s.shape == (3,) and s.dtype == torch.float32 and torch.isfinite(s).all()
    torch.testing.assert_close(s, ref, atol=1e-5, rtol=0)
    # processor= as a separate folder gives the same model inputs.
    again = StepAwarePreferenceModel.from_pretrained(backbone, tiny[1], processor=backbone)
    with torch.no_grad():
        torch.testing.assert_close(again.score(images, t, prompts), s, atol=1e-6, rtol=0)


@settings(max_examples=8, deadline=None)
@given(
    t=st.lists(st.floats(0, 1000, allow_nan=False), min_size=1, max_size=3),
    seed=st.integers(0, 2**16),
)
def test_zero_init_is_plain_clip_at_any_timestep(plain_pair, t, seed):
    spm, clip = plain_pair
    x = torch.randn(len(t), 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        got = spm.image_features(x, torch.tensor(t))
        want = clip.get_image_features(pixel_values=x).pooler_output
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def plain_pair(tiny):
    from transformers import CLIPModel

    backbone, _ = tiny
    spm = StepAwarePreferenceModel.from_pretrained(backbone)  # no SPM checkpoint: adaLN starts as the identity
    clip = CLIPModel.from_pretrained(backbone).eval()
    return spm, clip


# ---------------------------------------------------------------------- errors


def test_checkpoint_key_mismatch_names_keys(tmp_path):
    sd = torch.load(CKPT, weights_only=True)
    del sd["model.t_embedder.mlp.2.bias"]
    sd["model.vision_model.bogus.weight"] = torch.zeros(1)
    bad = tmp_path / "bad.bin"
    torch.save(sd, bad)
    with pytest.raises(KeyError) as e:
        StepAwarePreferenceModel.from_pretrained(GOLDEN, bad)
    msg = str(e.value)
    assert "model.t_embedder.mlp.2.bias" in msg and "model.vision_model.bogus.weight" in msg
    assert "missing keys (1)" in msg and "unexpected keys (1)" in msg


def test_plain_clip_as_checkpoint_is_rejected(tiny):
    backbone, _ = tiny
    from safetensors.torch import load_file

    plain = {"model." + k: v for k, v in load_file(str(backbone / "model.safetensors")).items()}
    with pytest.raises(KeyError, match="adaLN_modulation"):
        StepAwarePreferenceModel.from_pretrained(backbone, plain)


def test_backbone_size_mismatch_names_shapes(tmp_path):
    tiny_clip_config(vision_config={"hidden_size": 48}).save_pretrained(tmp_path)
    with pytest.raises(ValueError) as e:
        StepAwarePreferenceModel.from_pretrained(tmp_path, CKPT)
    msg = str(e.value)
    assert "model.vision_model.embeddings.patch_embedding.weight" in msg
    assert "(32, 3, 8, 8)" in msg and "(48, 3, 8, 8)" in msg


def test_missing_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        StepAwarePreferenceModel.from_pretrained(tmp_path / "no_such_backbone", CKPT)
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        StepAwarePreferenceModel.from_pretrained(GOLDEN, tmp_path / "nope.bin")


def test_stale_position_ids_in_checkpoint_are_accepted():
    # Checkpoints written by transformers < 4.31 carried the (then persistent) position_ids buffers.
    sd = torch.load(CKPT, weights_only=True)
    sd["model.vision_model.embeddings.position_ids"] = torch.arange(17).unsqueeze(0)
    sd["model.text_model.embeddings.position_ids"] = torch.arange(16).unsqueeze(0)
    StepAwarePreferenceModel.from_pretrained(GOLDEN, sd)


def test_no_tokenizer_error(golden_model):
    with pytest.raises(RuntimeError, match="no tokenizer"):
        golden_model.score(torch.zeros(1, 3, 32, 32), torch.tensor([10]), ["a cat"])


def test_prompt_count_must_match(tiny_model):
    with pytest.raises(ValueError, match="one prompt per image"):
        tiny_model.score(torch.zeros(2, 3, 32, 32), torch.tensor([10, 10]), ["a cat"])


# ---------------------------------------------------------------------- text cache


def test_text_cache_runs_text_tower_once_per_prompt(tiny):
    backbone, ckpt = tiny
    model = StepAwarePreferenceModel.from_pretrained(backbone, ckpt, text_cache_size=2)
    rows: list[int] = []
    handle = model.model.text_model.register_forward_pre_hook(
        lambda m, args, kwargs: rows.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    images = torch.zeros(3, 3, 32, 32)
    t = torch.tensor([1, 2, 3])
    with torch.no_grad():
        first = model(images, t, ["a cat", "a dog", "a cat"])
        second = model(images, t[[1, 0, 1]], ["a dog", "a cat", "a dog"])
    assert rows == [2]  # one batched pass over the two distinct prompts, none for the second call
    torch.testing.assert_close(second, first[[1, 0, 1]], atol=1e-6, rtol=0)
    with torch.no_grad():
        model(images[:1], t[:1], ["a hill"])  # evicts the least recently used ("a cat"), cache bounded at 2
    assert list(model._text_cache) == ["a dog", "a hill"]
    model.clear_text_cache()
    with torch.no_grad():
        model(images[:1], t[:1], ["a cat"])
    assert rows == [2, 1, 1]
    handle.remove()


def test_processor_object_and_dtype(tiny, tiny_model):
    from types import SimpleNamespace

    backbone, ckpt = tiny
    # Any CLIPProcessor-like object works: only .tokenizer and .image_processor's size/mean/std are read.
    proc = SimpleNamespace(
        tokenizer=tiny_model.tokenizer,
        image_processor=SimpleNamespace(size={"shortest_edge": 32}, image_mean=[0.5] * 3, image_std=[0.25] * 3),
    )
    model = StepAwarePreferenceModel.from_pretrained(backbone, ckpt, processor=proc, dtype=torch.bfloat16)
    assert model.image_mean == (0.5, 0.5, 0.5) and model.model.visual_projection.weight.dtype == torch.bfloat16
    with torch.no_grad():
        s = model(torch.zeros(2, 3, 48, 32), 500, ["a cat", "a dog"])  # a scalar timestep broadcasts
    assert s.shape == (2,) and s.dtype == torch.float32 and torch.isfinite(s).all()
