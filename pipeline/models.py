"""Models and tokenizers, built or loaded: the one place every stage and the scoring API get them from.

    build_llama(cfg, tok, max_positions)   a fresh Llama sized by a model preset (pretraining from scratch)
    load_tokenizer(name_or_path)           a model's tokenizer, with the pipeline's tokens
    load_causal_lm(name_or_path)           (model, tokenizer): a hub model to pretrain on, a policy to fine-tune
    load_reward_model(name_or_path)        (model, tokenizer): a score head (one output per member) on a checkpoint
    load_as_saved(name_or_path)            (model, tokenizer) exactly as saved, for generation (the chat CLI)
    Unpadded(backbone)                     a backbone that reads only the tokens its attention mask keeps

A name is a local Hugging Face directory or a hub id. Every tokenizer has what the later stages need (pad !=
eos, chat markers and template: pipeline.tokenizer.add_pipeline_tokens); every model matches it (embeddings
grown to its vocabulary, its special-token ids). Weights load in fp32, from safetensors only.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                          GenerationConfig, LlamaConfig, LlamaForCausalLM)
from transformers.modeling_outputs import BaseModelOutputWithPast, SequenceClassifierOutputWithPast

from pipeline.config import ModelConfig, PeftConfig, SavedGenerationConfig
from pipeline.errors import PipelineError
from pipeline.registry import looks_like_hub_id
from pipeline.tokenizer import add_pipeline_tokens


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
    model = LlamaForCausalLM(config)
    match_tokenizer(model, tokenizer)
    return model


def check_model_source(name_or_path: str) -> None:
    """A local directory must exist; anything else is taken as a hub id."""
    if not looks_like_hub_id(name_or_path) and not Path(name_or_path).is_dir():
        raise PipelineError(f"model directory not found: {Path(name_or_path).resolve()}")


def _saved_tokenizer(name_or_path: str, trust_remote_code: bool):
    check_model_source(name_or_path)
    try:
        return AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise PipelineError(f"cannot load a tokenizer from '{name_or_path}': {e}") from None


def _saved_model(auto_class, what: str, name_or_path: str, trust_remote_code: bool, dtype=torch.float32, **kwargs):
    try:
        return auto_class.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, dtype=dtype,
                                          use_safetensors=True, **kwargs)
    except Exception as e:
        raise PipelineError(f"cannot load {what} from '{name_or_path}': {e}") from None


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """The tokenizer at name_or_path, given the pipeline's tokens where it lacks them."""
    tok = _saved_tokenizer(name_or_path, trust_remote_code)
    add_pipeline_tokens(tok)
    return tok


def _load(auto_class, what: str, name_or_path: str, trust_remote_code: bool, **kwargs):
    """(model, tokenizer) from name_or_path, the model matched to the tokenizer."""
    tok = load_tokenizer(name_or_path, trust_remote_code)
    model = _saved_model(auto_class, what, name_or_path, trust_remote_code, **kwargs)
    match_tokenizer(model, tok)
    return model, tok


def load_as_saved(name_or_path: str, trust_remote_code: bool = False, dtype=torch.float32):
    """(model, tokenizer) of a causal LM exactly as saved, nothing added (generation with it: the chat CLI)."""
    tok = _saved_tokenizer(name_or_path, trust_remote_code)
    return _saved_model(AutoModelForCausalLM, "a causal LM", name_or_path, trust_remote_code, dtype), tok


def load_causal_lm(name_or_path: str, trust_remote_code: bool = False):
    """(model, tokenizer) of a causal LM: a hub model to pretrain on, a policy to fine-tune or its reference."""
    return _load(AutoModelForCausalLM, "a causal LM", name_or_path, trust_remote_code)


ENSEMBLE_FILE = "ensemble.json"  # an ensemble of separately trained reward models: the list of its members' folders


def ensemble_members(path: str | Path) -> list[Path]:
    """The member folders of an ensemble of separately trained reward models saved at `path`; [] for any other."""
    listed = Path(path) / ENSEMBLE_FILE
    return [Path(path) / f for f in json.loads(listed.read_text())["members"]] if listed.is_file() else []


def load_reward_model(name_or_path: str, trust_remote_code: bool = False, members: int | None = None):
    """(model, tokenizer) of a reward model: a score head with one output per ensemble member, read at the last
    token that is not padding. On a causal-LM checkpoint (reward training's backbone) the head is new, with
    `members` outputs (default 1); on a reward checkpoint (scoring, PPO's reward and value models) it is the
    trained one, with as many outputs as it was trained with; an ensemble of separate models loads as a
    MemberStack, one output per member."""
    folders = ensemble_members(name_or_path)
    if folders:
        loaded = [load_reward_model(str(f), trust_remote_code, 1)[0] for f in folders]
        return MemberStack(loaded), load_tokenizer(name_or_path, trust_remote_code)
    if members is None:
        members = reward_members(name_or_path, trust_remote_code)
    return _load(AutoModelForSequenceClassification, "a reward model", name_or_path, trust_remote_code,
                 num_labels=members)


def reward_members(name_or_path: str, trust_remote_code: bool = False) -> int:
    """The number of score outputs of a saved reward model (its ensemble's members); 1 for any other checkpoint,
    whose config's num_labels means nothing here."""
    check_model_source(name_or_path)
    folders = ensemble_members(name_or_path)
    if folders:
        return len(folders)
    try:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise PipelineError(f"cannot load a model config from '{name_or_path}': {e}") from None
    scorer = any(a.endswith("ForSequenceClassification") for a in config.architectures or [])
    return config.num_labels if scorer else 1


class _Backbones(nn.Module):
    """The members' backbones side by side: their last hidden states concatenated, (batch, tokens, members x
    hidden), in the output's hidden_states as TRL's get_reward reads it."""

    def __init__(self, backbones: list[nn.Module]):
        super().__init__()
        self.each = nn.ModuleList(backbones)

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        kwargs.pop("output_hidden_states", None)
        hidden = torch.cat([b(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
                            for b in self.each], -1)
        return BaseModelOutputWithPast(last_hidden_state=hidden, hidden_states=(hidden,))


class _Heads(nn.Module):
    """Each member's score head on its own share of the concatenated hidden states: (..., members)."""

    def __init__(self, heads: list[nn.Module]):
        super().__init__()
        self.each = nn.ModuleList(heads)

    def forward(self, hidden):
        parts = hidden.chunk(len(self.each), -1)
        return torch.cat([head(part) for head, part in zip(self.each, parts)], -1)


class MemberStack(nn.Module):
    """Separately trained reward models (`reward.ensemble_kind=models`) as one sequence-classification model with
    one output per member: the shape of a heads ensemble, so that the scorer, the online trainers (TRL reads the
    backbone, then `score`) and the disagreement guard take either kind alike. Each member reads the same tokens
    with its own weights; the logits are read at the last token that is not padding, as transformers reads them."""

    base_model_prefix = "backbones"

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.backbones = _Backbones([getattr(m, m.base_model_prefix) for m in members])
        self.score = _Heads([m.score for m in members])
        self.config = members[0].config.__class__.from_dict(members[0].config.to_dict())
        self.config.num_labels = len(members)
        self.members = members  # the plain models, kept out of the module tree (their weights are registered above)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        kwargs.pop("use_cache", None)
        logits = self.score(self.backbones(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                                           **kwargs).last_hidden_state)
        non_pad = (input_ids != self.config.pad_token_id).to(logits.device, torch.int32)
        last = (torch.arange(input_ids.shape[-1], device=logits.device, dtype=torch.int32) * non_pad).argmax(-1)
        return SequenceClassifierOutputWithPast(logits=logits[torch.arange(len(last), device=logits.device), last])


class Unpadded(nn.Module):
    """A backbone that reads only the tokens its attention mask keeps. The online trainers score rollouts padded on
    both sides (prompts on the left to the longest prompt, responses on the right to response_length), so a scoring
    pass over the padded batch spends much of its work on padding. The rows are sorted by their number of kept
    tokens and run in buckets of `bucket` rows, each packed to its longest row with the positions the full call
    would have given them; the hidden states go back where the tokens were (zeros at padding, which no reader uses).
    Every kept token attends to the same tokens at the same positions as in the full call."""

    def __init__(self, backbone: nn.Module, bucket: int = 16):
        super().__init__()
        self.backbone, self.bucket = backbone, bucket

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, **kwargs):
        if attention_mask is None or input_ids is None or attention_mask.all():
            return self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                 **kwargs)
        kwargs.pop("output_hidden_states", None)
        kwargs.pop("return_dict", None)
        rows, width = input_ids.shape
        keep = attention_mask.bool()
        if position_ids is None:  # what the model itself would use: the column
            position_ids = torch.arange(width, device=input_ids.device).expand(rows, width)
        lengths = keep.sum(1)
        # each row's kept columns first, in order (a stable sort puts False after True)
        columns = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices
        where, values = [], []
        for chunk in lengths.argsort(descending=True).split(self.bucket):
            size = max(int(lengths[chunk].max()), 1)
            cols = columns[chunk, :size]
            packed = torch.arange(size, device=input_ids.device) < lengths[chunk, None]
            out = self.backbone(input_ids=input_ids[chunk].gather(1, cols), attention_mask=packed.long(),
                                position_ids=position_ids[chunk].gather(1, cols), **kwargs).last_hidden_state
            where.append((chunk[:, None] * width + cols)[packed])
            values.append(out[packed])
        values = torch.cat(values)
        hidden = values.new_zeros(rows * width, values.shape[-1]).index_put((torch.cat(where),), values)
        hidden = hidden.view(rows, width, -1)
        return BaseModelOutputWithPast(last_hidden_state=hidden, hidden_states=(hidden,))


def match_tokenizer(model, tokenizer) -> None:
    """Grow the embeddings to the tokenizer's vocabulary and make the model's special tokens the tokenizer's;
    a generative model also gets a generation config with them."""
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.config, name, getattr(tokenizer, name))
    if model.can_generate():
        model.generation_config = GenerationConfig(
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, **asdict(SavedGenerationConfig()))


def count_parameters(model) -> int:
    # Tied embeddings are counted once.
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def lora_config(cfg: PeftConfig, task_type: str):
    """PEFT's LoraConfig from the peft section, or None for full fine-tuning."""
    if cfg.method == "none":
        return None
    from peft import LoraConfig
    targets = cfg.target_modules
    return LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, task_type=task_type,
                      target_modules=targets[0] if list(targets) == ["all-linear"] else list(targets))
