"""Randomly initialised Llama-family model directories, written by transformers itself.

For smoke tests of a deployment before a real target exists, and for the test-suite's fixtures: the files
are an ordinary Hugging Face directory, so every command treats them like a user's model.
"""

from __future__ import annotations

from pathlib import Path

import torch

from hass_deploy.atomic import check_output_dir
from hass_deploy.errors import HassDeployError

SIZES = {
    # tiny: builds in a second, decodes at hundreds of tokens/s on 2 cores
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
    # small: the shape cpu-notes.md calls S (7.4 M parameters)
    "small": dict(vocab_size=8192, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048),
}

ARCHITECTURE_CLASSES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 32}),
}


def random_hf_model(architecture: str, size: str = "tiny", seed: int = 0, **overrides):
    """A transformers model with random weights (the oracle our implementation is compared with)."""
    import transformers

    if architecture not in ARCHITECTURE_CLASSES:
        raise HassDeployError(f"unknown architecture {architecture!r}; choose one of {', '.join(ARCHITECTURE_CLASSES)}")
    if size not in SIZES:
        raise HassDeployError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}")
    config_name, model_name, extra = ARCHITECTURE_CLASSES[architecture]
    config = getattr(transformers, config_name)(**{**SIZES[size], **extra, **overrides})
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = getattr(transformers, model_name)(config)
    finally:
        torch.random.set_rng_state(state)
    return model.eval()


def write_random_target(out: str | Path, architecture: str = "llama", size: str = "tiny", seed: int = 0,
                        force: bool = False, **overrides) -> Path:
    out = check_output_dir(out, force)
    random_hf_model(architecture, size, seed, **overrides).save_pretrained(out)
    return out
