"""Causal language models from transformers (GPT-2, Llama), built from config sizes or loaded.

Built with `AutoModelForCausalLM.from_config` (no download) and SDPA attention. Under ZeRO-3
the caller keeps a `HfDeepSpeedConfig` alive while building, so transformers initialises the
weights inside `deepspeed.zero.Init` on their partitions (PLATFORM.md: without it the step-0
loss of a tiny GPT-2 was 22.5 instead of ~ln(vocab)).
"""

from __future__ import annotations

import contextlib

import torch
import torch._dynamo  # noqa: F401  (import before deepspeed.zero.Init, see PLATFORM.md)
import transformers  # noqa: F401
from torch import nn

from metabolic.engine.config import ConfigError


def lm_config(cfg, vocab_size: int, seq_len: int, eos_id: int):
    """A transformers config for ModelConfig `cfg` (gpt2 or llama)."""
    from transformers import GPT2Config, LlamaConfig

    if cfg.name == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_positions=seq_len, n_embd=cfg.width, n_layer=cfg.depth,
                          n_head=cfg.heads, n_inner=cfg.mlp_ratio * cfg.width, bos_token_id=eos_id,
                          eos_token_id=eos_id, attn_implementation="sdpa")
    if cfg.name == "llama":
        return LlamaConfig(vocab_size=vocab_size, hidden_size=cfg.width, intermediate_size=cfg.mlp_ratio * cfg.width,
                           num_hidden_layers=cfg.depth, num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
                           max_position_embeddings=seq_len, bos_token_id=eos_id, eos_token_id=eos_id,
                           tie_word_embeddings=True, attn_implementation="sdpa")
    raise ConfigError(f"config key 'model.name': {cfg.name!r} is not a language model")


class CausalLM(nn.Module):
    """Wraps a transformers causal LM so forward(input_ids) returns logits [B, L, V]."""

    def __init__(self, hf_model: nn.Module) -> None:
        super().__init__()
        self.hf = hf_model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.hf(input_ids=input_ids, use_cache=False).logits


def build_causal_lm(cfg, vocab_size: int, seq_len: int, eos_id: int) -> CausalLM:
    """From config sizes, or from_pretrained(cfg.pretrained) (a local path, or a hub name when online)."""
    from transformers import AutoModelForCausalLM

    if cfg.pretrained:
        try:
            hf = AutoModelForCausalLM.from_pretrained(cfg.pretrained, attn_implementation="sdpa")
        except Exception as err:
            raise ConfigError(f"config key 'model.pretrained': cannot load '{cfg.pretrained}' "
                              f"({type(err).__name__}: {err})") from err
        if hf.config.vocab_size < vocab_size:
            raise ConfigError(f"config key 'model.pretrained': model vocabulary {hf.config.vocab_size} is smaller "
                              f"than the tokenizer's {vocab_size} (use the model's own tokenizer)")
        positions = getattr(hf.config, "max_position_embeddings", None) or getattr(hf.config, "n_positions", None)
        if positions is not None and positions < seq_len:
            raise ConfigError(f"config key 'data.text.seq_len': {seq_len} is longer than the {positions} positions "
                              f"model.pretrained '{cfg.pretrained}' was trained for")
    else:
        hf = AutoModelForCausalLM.from_config(lm_config(cfg, vocab_size, seq_len, eos_id))
    return CausalLM(hf)


def lm_forward_flops_per_token(cfg, n_params: int, seq_len: int) -> float:
    """Forward FLOPs per token: 2 per weight plus causal attention scores and values, 2*2*L*d/2 per layer.

    (The analytic count is used because under ZeRO-3 the partitioned model cannot run a counting pass.)
    """
    return 2.0 * n_params + 2.0 * cfg.depth * seq_len * cfg.width


def save_hf(module: nn.Module, tokenizer, folder, is_main: bool) -> None:
    """Save the LM and its tokenizer in Hugging Face format (loads with from_pretrained).

    Under ZeRO-3 every rank must enter the gather; rank 0 writes the full weights.
    """
    import deepspeed

    params = list(module.parameters())
    zero3 = any(hasattr(p, "ds_id") for p in params)
    ctx = deepspeed.zero.GatheredParameters(params, modifier_rank=None) if zero3 else contextlib.nullcontext()
    with ctx:
        if is_main:
            module.hf.save_pretrained(str(folder), safe_serialization=True)
            tokenizer.save_pretrained(str(folder))

