"""Models: a Llama built from a config preset, or a pretrained model from a hub id or local directory."""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig, LlamaForCausalLM

from pipeline.config import ModelConfig, PeftConfig
from pipeline.errors import PipelineError
from pipeline.registry import looks_like_hub_id


def build_llama(cfg: ModelConfig, tokenizer, max_positions: int) -> LlamaForCausalLM:
    """A freshly initialised Llama sized by the preset, with the tokenizer's vocabulary and special tokens."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=max_positions,
        tie_word_embeddings=cfg.tie_word_embeddings,
        rope_theta=cfg.rope_theta,
        attention_dropout=0.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def check_model_source(name_or_path: str) -> None:
    """A local directory must exist; anything else is taken as a hub id."""
    if not looks_like_hub_id(name_or_path) and not Path(name_or_path).is_dir():
        raise PipelineError(f"model directory not found: {Path(name_or_path).resolve()}")


def load_causal_lm(name_or_path: str, trust_remote_code: bool = False, dtype=torch.float32):
    check_model_source(name_or_path)
    try:
        return AutoModelForCausalLM.from_pretrained(name_or_path, trust_remote_code=trust_remote_code,
                                                    dtype=dtype, use_safetensors=True)
    except Exception as e:
        raise PipelineError(f"cannot load a causal LM from '{name_or_path}': {e}") from None


def match_tokenizer(model, tokenizer) -> None:
    """Grow the embeddings to the tokenizer's vocabulary and make the model's special tokens the tokenizer's."""
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.config, name, getattr(tokenizer, name))
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, max_new_tokens=128, do_sample=True, temperature=0.7,
    )


def count_parameters(model) -> int:
    # Tied embeddings are counted once.
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def load_for_finetuning(name_or_path: str, trust_remote_code: bool = False):
    """(model, tokenizer) from a checkpoint, hub id or directory, with pad != eos and a chat template."""
    from pipeline.tokenizer import add_pipeline_tokens, load_tokenizer
    tok = load_tokenizer(name_or_path, trust_remote_code)
    add_pipeline_tokens(tok)
    model = load_causal_lm(name_or_path, trust_remote_code)
    match_tokenizer(model, tok)
    return model, tok


def lora_config(cfg: PeftConfig, task_type: str):
    """PEFT's LoraConfig from the peft section, or None for full fine-tuning."""
    if cfg.method == "none":
        return None
    from peft import LoraConfig
    targets = cfg.target_modules
    return LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, task_type=task_type,
                      target_modules=targets[0] if list(targets) == ["all-linear"] else list(targets))
