"""Evaluation by generation: responses to held-out prompts, their log-probabilities, and gold scores."""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from pipeline import demo
from pipeline.config import GenerationEvalConfig


@torch.no_grad()
def sample_responses(model, tok, prompts: list[list[dict]] | list[str], cfg: GenerationEvalConfig, desc: str,
                     top_p: float = 1.0):
    """(prompt ids, response ids) per prompt: conversational through the chat template, text as it is; a response
    ends at its first eos, included."""
    was_training = model.training
    model.eval()
    side, tok.padding_side = tok.padding_side, "left"  # every row of a batch ends at its prompt
    texts = [p if isinstance(p, str) else tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
             for p in prompts]
    sampling = {"do_sample": True, "temperature": cfg.temperature, "top_k": 0, "top_p": top_p} \
        if cfg.temperature > 0 else {"do_sample": False}
    cuda = [model.device.index or 0] if model.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):  # seeded sampling, leaving the caller's random state as it was
        torch.manual_seed(cfg.seed)
        out = []
        for i in tqdm(range(0, len(texts), cfg.batch_size), desc=desc, unit="batch"):
            batch = tok(texts[i:i + cfg.batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            batch = {k: v.to(model.device) for k, v in batch.items()}
            ids = model.generate(**batch, max_new_tokens=cfg.max_new_tokens, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id, **sampling)  # (B, prompt + new)
            width = batch["input_ids"].shape[1]
            for row, mask, full in zip(batch["input_ids"], batch["attention_mask"], ids):
                response = full[width:].tolist()
                if tok.eos_token_id in response:
                    response = response[:response.index(tok.eos_token_id) + 1]
                response = [t for t in response if t != tok.pad_token_id]
                out.append((row[mask.bool()].tolist(), response))
    tok.padding_side = side
    model.train(was_training)
    return out


def generate_responses(model, tok, prompts: list[list[dict]] | list[str], cfg: GenerationEvalConfig, desc: str,
                       top_p: float = 1.0) -> list[str]:
    """One response text per prompt (greedy when cfg.temperature is 0)."""
    return [tok.decode(r, skip_special_tokens=True).strip()
            for _, r in sample_responses(model, tok, prompts, cfg, desc, top_p)]


@torch.no_grad()
def response_logprobs(model, pairs: list[tuple[list[int], list[int]]], temperature: float, pad_id: int,
                      batch_size: int = 32) -> list[float]:
    """Sum of log p(response token | context) with logits / temperature, as PPO computes them."""
    model.eval()
    out = []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        width = max(len(p) + len(r) for p, r in chunk)
        ids = torch.full((len(chunk), width), pad_id)
        for j, (p, r) in enumerate(chunk):
            ids[j, :len(p) + len(r)] = torch.tensor(p + r)
        mask = ids != pad_id
        logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits.float()
        logp = torch.log_softmax(logits[:, :-1] / temperature, dim=-1)  # (B, T-1, V)
        token_logp = logp.gather(-1, ids[:, 1:, None].to(model.device)).squeeze(-1).cpu()  # (B, T-1)
        for j, (p, r) in enumerate(chunk):
            out.append(token_logp[j, len(p) - 1:len(p) + len(r) - 1].sum().item())
    return out


def judge(prompt: str, response: str) -> dict:
    """The demo's verdict on one response: its gold score and the flaw classes its detectors find."""
    return {"gold": demo.gold_score(prompt, response), "flaws": sorted(demo.detect_flaws(prompt, response))}


def gold_eval(model, tok, rows: list[dict], cfg: GenerationEvalConfig, desc: str) -> tuple[float, list[dict]]:
    """Mean gold score of the model's responses to demo prompts, and the samples (with their flaw classes)."""
    responses = generate_responses(model, tok, [r["prompt"] for r in rows], cfg, desc)
    samples = [{"task": r["task"], "prompt": r["prompt"][-1]["content"], "response": resp,
                **judge(r["prompt"][-1]["content"], resp)} for r, resp in zip(rows, responses)]
    return sum(s["gold"] for s in samples) / len(samples), samples


def flaw_rates(samples: list[dict], prefix: str = "flaw_rate") -> dict[str, float]:
    """{prefix/<class>: share of the samples showing it} for every demo flaw class."""
    return {f"{prefix}/{c}": sum(c in s["flaws"] for s in samples) / max(len(samples), 1) for c in demo.FLAWS}


def paired_bootstrap(before: list[float], after: list[float], level: float = 0.95, resamples: int = 10000,
                     seed: int = 0) -> tuple[float, float, float]:
    """Mean of after - before over paired items (the same prompts scored twice) and its percentile bootstrap
    interval: the items are resampled with replacement, keeping each pair together."""
    import numpy as np

    if len(before) != len(after) or not before:
        raise ValueError(f"paired_bootstrap needs two equal, non-empty lists (got {len(before)} and {len(after)})")
    diff = np.asarray(after, dtype=float) - np.asarray(before, dtype=float)
    low, high = bootstrap_interval(lambda picks: diff[picks].mean(axis=1), diff.size, level, resamples, seed)
    return float(diff.mean()), low, high


def bootstrap_interval(statistic, n: int, level: float = 0.95, resamples: int = 10000,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of a statistic of n paired items: statistic(picks) takes the resamples' item
    indices (an array of resamples x n, drawn with replacement) and returns one value per resample."""
    import numpy as np

    picks = np.random.default_rng(seed).integers(0, n, (resamples, n))
    low, high = np.quantile(statistic(picks), [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


# Held-out prompts below which an evaluation's gains cannot support a conclusion: the log and the report say so.
MIN_EVAL_PROMPTS = 30


def gain(name: str, before: list[float], after: list[float], per_prompt: int = 1) -> dict[str, float]:
    """NAME (the mean of after - before) with its paired bootstrap 95% interval (NAME_ci_low, NAME_ci_high), from
    the scores of the start and the trained model on the same held-out prompts; with per_prompt responses to each
    prompt (consecutive), the prompts are what is resampled, each the mean of its responses."""
    by_prompt = lambda xs: [sum(xs[i:i + per_prompt]) / per_prompt for i in range(0, len(xs), per_prompt)]
    mean, low, high = paired_bootstrap(by_prompt(before), by_prompt(after))
    return {name: mean, f"{name}_ci_low": low, f"{name}_ci_high": high}


def with_interval(metrics: dict, key: str) -> str:
    """A metric as text, with its 95% interval where the metrics hold one (KEY_ci_low, KEY_ci_high)."""
    low, high = metrics.get(f"{key}_ci_low"), metrics.get(f"{key}_ci_high")
    if low is None or high is None:
        return f"{metrics[key]:.4g}"
    return f"{metrics[key]:+.3f} [{low:+.3f}, {high:+.3f}]"


@torch.no_grad()
def copy_rate(model, tok, stories: list[str], limit: int = 300) -> dict[str, float]:
    """In-context copying, per kind of demo story element (person, animal, colour, obj, place): the share of an
    element's later mentions in a document that the model predicts with probability > 0.5, having read the first.
    Kinds never mentioned twice are left out."""
    kind_of = {w: k for k, words in demo.VOCAB.items() if k != "ending" for w in words}
    single = {}  # token id -> word, for words that are one token after a space
    for w in kind_of:
        ids = tok(" " + w, add_special_tokens=False)["input_ids"]
        if len(ids) == 1:
            single[ids[0]] = w
    was_training = model.training
    model.eval()
    hits: dict[str, list[bool]] = {}
    for story in stories[:limit]:
        ids = [tok.eos_token_id] + tok(story, add_special_tokens=False)["input_ids"]
        ids = ids[:model.config.max_position_embeddings]
        probs = model(torch.tensor([ids], device=model.device)).logits[0].float().softmax(-1)
        seen = set()
        for t, token in enumerate(ids[1:], start=1):
            if token in single:
                if token in seen:
                    hits.setdefault(kind_of[single[token]], []).append(probs[t - 1, token].item() > 0.5)
                seen.add(token)
    model.train(was_training)
    return {k: sum(v) / len(v) for k, v in sorted(hits.items())}
