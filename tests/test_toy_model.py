"""The shipped toy base model: a standard diffusers folder, fast, and it follows its prompts."""

import json

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from spo_fast.toy import (
    build_toy_components,
    generate,
    load_toy_components,
    prompt_splits,
    render,
    score,
    toy_model_path,
)


@pytest.fixture(scope="module")
def pipe() -> StableDiffusionPipeline:
    # The plain diffusers loader, as user code would call it; fp16 weights are cast up for CPU inference.
    p = StableDiffusionPipeline.from_pretrained(str(toy_model_path())).to(torch.float32)
    p.set_progress_bar_config(disable=True)
    return p


def test_folder_is_a_standard_pipeline(pipe):
    root = toy_model_path()
    index = json.loads((root / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    for sub in ("unet", "vae", "text_encoder"):
        assert list((root / sub).glob("*.safetensors")), sub
    size = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    assert size <= 10 * 2**20
    assert isinstance(pipe.unet, UNet2DConditionModel) and isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.text_encoder, CLIPTextModel) and isinstance(pipe.tokenizer, CLIPTokenizer)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    cfg = pipe.scheduler.config
    assert (cfg.beta_schedule, cfg.beta_start, cfg.beta_end) == ("scaled_linear", 0.00085, 0.012)
    assert (cfg.clip_sample, cfg.set_alpha_to_one, cfg.steps_offset, cfg.prediction_type) == (
        False,
        False,
        1,
        "epsilon",
    )
    assert pipe.safety_checker is None and pipe.feature_extractor is None


def test_pipeline_call_generates_right_shapes(pipe):
    _, held = prompt_splits()
    out = pipe(
        list(held[:2]),
        num_inference_steps=3,
        guidance_scale=5.0,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    )
    assert out.images.shape == (2, 3, 32, 32)  # the pipeline post-processes to [0, 1]
    assert 0 <= float(out.images.min()) and float(out.images.max()) <= 1


def test_generate_is_deterministic_and_shaped(pipe):
    prompts = list(prompt_splits()[1][:3])
    a = generate(pipe, prompts, steps=4, generator=torch.Generator().manual_seed(1))
    b, lat = generate(pipe, prompts, steps=4, generator=torch.Generator().manual_seed(1), return_latents=True)
    assert a.shape == (3, 3, 32, 32) and lat.shape == (3, 4, 8, 8)
    torch.testing.assert_close(a, b)
    assert float(a.min()) >= -1 and float(a.max()) <= 1


def test_base_model_beats_random_init_on_held_out_prompts():
    prompts = list(prompt_splits()[1][:8])
    base = load_toy_components()
    rand = build_toy_components(seed=0)
    g = torch.Generator().manual_seed(0)
    s_base = float(score(generate(base, prompts, steps=10, generator=g), prompts).mean())
    g = torch.Generator().manual_seed(0)
    s_rand = float(score(generate(rand, prompts, steps=10, generator=g), prompts).mean())
    s_gt = float(score(render(prompts), prompts).mean())
    assert s_base > s_rand + 0.25, (s_base, s_rand)  # measured: ~0.45 vs ~0.02
    assert s_base < s_gt  # room for preference optimisation
