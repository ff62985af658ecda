"""Evaluation by generation: responses to held-out prompts, scored by the demo's gold judge."""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from pipeline import demo
from pipeline.config import GenerationEvalConfig


@torch.no_grad()
def generate_responses(model, tok, prompts: list[list[dict]], cfg: GenerationEvalConfig, desc: str) -> list[str]:
    """One response per conversational prompt, in batches, left-padded so every row ends at its prompt."""
    was_training = model.training
    model.eval()
    tok.padding_side = "left"
    texts = [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    sampling = {"do_sample": True, "temperature": cfg.temperature, "top_k": 0, "top_p": 1.0} \
        if cfg.temperature > 0 else {"do_sample": False}
    out = []
    for i in tqdm(range(0, len(texts), cfg.batch_size), desc=desc, unit="batch"):
        batch = tok(texts[i:i + cfg.batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
        batch = {k: v.to(model.device) for k, v in batch.items()}
        ids = model.generate(**batch, max_new_tokens=cfg.max_new_tokens, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id, **sampling)
        out += tok.batch_decode(ids[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    tok.padding_side = "right"
    model.train(was_training)
    return [r.strip() for r in out]


def gold_eval(model, tok, rows: list[dict], cfg: GenerationEvalConfig, desc: str) -> tuple[float, list[dict]]:
    """Mean gold score of the model's responses to demo prompts, and the samples."""
    prompts = [r["prompt"] for r in rows]
    responses = generate_responses(model, tok, prompts, cfg, desc)
    samples = [{"task": r["task"], "prompt": r["prompt"][-1]["content"], "response": resp,
                "gold": demo.gold_score(r["prompt"][-1]["content"], resp)} for r, resp in zip(rows, responses)]
    return sum(s["gold"] for s in samples) / len(samples), samples
