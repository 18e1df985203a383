"""Preference models that score (possibly noisy, intermediate) diffusion samples; pair selection is in ``selection``."""

from .step_aware import (
    CLIP_MEAN,
    CLIP_STD,
    PAPER_BACKBONE,
    PAPER_PROCESSOR,
    StepAwarePreferenceModel,
    TimestepEmbedder,
    load_spm_state_dict,
    make_tiny_step_aware_model,
    modulate,
    preprocess_images,
    tiny_clip_config,
    write_tiny_clip_tokenizer,
)

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "PAPER_BACKBONE",
    "PAPER_PROCESSOR",
    "StepAwarePreferenceModel",
    "TimestepEmbedder",
    "load_spm_state_dict",
    "make_tiny_step_aware_model",
    "modulate",
    "preprocess_images",
    "tiny_clip_config",
    "write_tiny_clip_tokenizer",
]
