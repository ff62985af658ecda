"""Where a PPO step's time goes, and TRL's rollout generation against a plain `generate` (part of `make bench`).

    python -m bench.ppo_phases OUT.json [Hydra overrides of the ppo stage]

Runs the real PPO stage in this process with timers around TRL's rollout functions (generation; reference,
value and reward scoring); the rest of each step is training. Then generates for the same prompts, at the
rollout batch size, once the way TRL's PPO does and once with a plain `model.generate` (KV cache, same
sampling, no per-step scores kept), and compares tokens per second.
"""
from __future__ import annotations

import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from transformers import GenerationConfig
from trl.experimental.ppo import ppo_trainer

SPENT: dict[str, float] = defaultdict(float)


def timed(phase: str, fn, rollout_only: bool = False):
    """fn, adding its time to SPENT[phase]; rollout_only: only calls without gradients (the rollout phase)."""
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            if not (rollout_only and torch.is_grad_enabled()):
                SPENT[phase] += time.perf_counter() - start
    return wrapper


def generation_rates(entry, root: str) -> dict:
    """Tokens per second: TRL's PPO rollout generation against a plain generate, same prompts and batch."""
    from pipeline import demo
    from pipeline.models import load_causal_lm
    from pipeline.registry import Registry

    policy_path = Registry(root).get(entry.parents[0]).path
    model, tok = load_causal_lm(policy_path, False)
    model.eval()
    p = entry.config["ppo"]
    batch = p["rollout_batch_size"]
    prompts = [tok.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True)
               for r in demo.generate_prompts(batch, 7, heldout=True)]
    tok.padding_side = "left"
    queries = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)["input_ids"]
    sampling = dict(max_new_tokens=p["response_length"], min_new_tokens=p["response_length"],
                    temperature=p["temperature"] + 1e-7, top_k=0, top_p=1.0, do_sample=True)
    rates = {}
    with torch.no_grad():
        for name in ("trl", "plain", "trl", "plain"):  # alternately; the best of two each
            torch.manual_seed(0)
            start = time.perf_counter()
            if name == "trl":
                out, _ = ppo_trainer.batch_generation(model, queries, batch, tok.pad_token_id,
                                                      GenerationConfig(**sampling))
            else:
                out = model.generate(input_ids=queries, attention_mask=queries != tok.pad_token_id,
                                     generation_config=GenerationConfig(**sampling, use_cache=True,
                                                                        pad_token_id=tok.pad_token_id))
            tokens = (out.shape[1] - queries.shape[1]) * batch
            rates[name] = max(rates.get(name, 0.0), tokens / (time.perf_counter() - start))
    return {"generation_tokens_per_s": rates["trl"], "plain_generate_tokens_per_s": rates["plain"],
            "generation_vs_plain_ratio": rates["trl"] / rates["plain"], "generation_batch": batch}


def main() -> None:
    out_file, overrides = Path(sys.argv[1]), sys.argv[2:]
    ppo_trainer.batch_generation = timed("generation", ppo_trainer.batch_generation)
    # the reference policy's log-probabilities (the same function runs the policy in training, with gradients)
    ppo_trainer.forward = timed("scoring", ppo_trainer.forward, rollout_only=True)
    ppo_trainer.get_reward = timed("scoring", ppo_trainer.get_reward)  # the value model and the reward model
    ppo_trainer.PPOTrainer.train = timed("total", ppo_trainer.PPOTrainer.train)

    from hydra import compose, initialize_config_dir

    from stages import ppo
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parent.parent / "conf"), version_base="1.3"):
        ppo.main(compose("ppo", overrides=overrides))  # Hydra's main takes a composed config as it is

    from pipeline.registry import Registry
    root = next(o.split("=", 1)[1] for o in overrides if o.startswith("registry.root="))
    entry = Registry(root).resolve("ppo:latest").entry
    total = SPENT["total"]
    result = {
        "ppo_episodes_per_s": entry.metrics["episodes"] / total,
        "ppo_seconds_per_update": total / entry.metrics["ppo_steps"],
        "ppo_generation_share": SPENT["generation"] / total,
        "ppo_scoring_share": SPENT["scoring"] / total,
        "ppo_training_share": 1 - (SPENT["generation"] + SPENT["scoring"]) / total,
    }
    result.update(generation_rates(entry, root))
    out_file.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
