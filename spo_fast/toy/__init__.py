"""The built-in toy text-to-image world (coloured shapes described by short prompts) and its tiny
Stable-Diffusion-structured base model, shipped with the package so that the demo, the learning tests and the
benchmarks run on a CPU with nothing downloaded.

- :mod:`~spo_fast.toy.world`: prompt grammar, train / held-out splits, the renderer;
- :mod:`~spo_fast.toy.tokenizer`: a real CLIP BPE tokenizer for the world's words (max length 16);
- :mod:`~spo_fast.toy.model`: the base model (CLIPTextModel, AutoencoderKL, UNet2DConditionModel,
  DDIMScheduler), its location, loading and a fast CFG DDIM sampler;
- :mod:`~spo_fast.toy.scorer`: the analytic preference (prompt match + crispness) and the SPO-sampler scorer;
- :mod:`~spo_fast.toy.grid`: captioned PNG sample grids;
- ``python -m spo_fast.toy.pretrain``: trains the base model from scratch.
"""

from .grid import save_grid
from .model import (
    ToyComponents,
    build_toy_components,
    decode_latents,
    encode_prompts,
    generate,
    load_toy_components,
    load_toy_pipeline,
    toy_model_path,
)
from .scorer import ToyImageScorer, score, score_components
from .tokenizer import MAX_LENGTH, load_toy_tokenizer, toy_tokenizer_path
from .world import (
    IMAGE_SIZE,
    ToyAttributes,
    all_prompts,
    make_dataset,
    parse_prompt,
    prompt_splits,
    render,
    sample_prompts,
)

__all__ = [
    "IMAGE_SIZE",
    "MAX_LENGTH",
    "ToyAttributes",
    "ToyComponents",
    "ToyImageScorer",
    "all_prompts",
    "build_toy_components",
    "decode_latents",
    "encode_prompts",
    "generate",
    "load_toy_components",
    "load_toy_pipeline",
    "load_toy_tokenizer",
    "make_dataset",
    "parse_prompt",
    "prompt_splits",
    "render",
    "sample_prompts",
    "save_grid",
    "score",
    "score_components",
    "toy_model_path",
    "toy_tokenizer_path",
]
