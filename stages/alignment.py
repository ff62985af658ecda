"""One core for the stages that tune a model and compare it with its start: SFT, PPO, DPO, GRPO and RLOO.

The online methods share the reward model as they score with it (rewards normalised by its stored statistics)
and the KL budget and gold-tracking callbacks; every one of them shares one evaluation: the tuned model and its
start sample responses to the same held-out prompts with the same noise, scored for reward (where there is a
reward model), KL to the start, length and eos rate, and on the demo by the gold judge (gold_gain with its paired
bootstrap interval, per-class and per-task figures), with the two side by side in a sample table. Where the
stages differ, it is only in what their TRL trainer needs.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from torch import nn
from transformers import TrainerCallback

from pipeline import demo
from pipeline.config import GenerationEvalConfig
from pipeline.errors import PipelineError
from pipeline.evaluation import (flaw_rates, generate_responses, gold_gain, judge, response_logprobs,
                                 sample_responses, with_interval)
from pipeline.models import load_reward_model
from reward_model.scoring import STATS_FILE, RewardModel


class Standardize(nn.Module):
    """The reward head followed by (score - mean) / std, so the policy sees rewards of unit scale."""

    def __init__(self, head: nn.Module, mean: float, std: float):
        super().__init__()
        self.head, self.mean, self.std = head, mean, std

    def forward(self, hidden):
        return (self.head(hidden) - self.mean) / self.std


def reward_statistics(path: str, normalize: bool) -> dict:
    """The reward model's stored score mean and std (written by `make reward`); mean 0, std 1 without
    normalisation."""
    stats_file = Path(path) / STATS_FILE
    if normalize and not stats_file.exists():
        raise PipelineError(f"{path} has no {STATS_FILE} (score_mean/score_std) to normalise rewards with; train "
                            f"it with `make reward`, or turn reward normalisation off (normalize_rewards=false)")
    return json.loads(stats_file.read_text()) if normalize else {"score_mean": 0.0, "score_std": 1.0}


def load_scorer(path: str, trust_remote_code: bool, stats: dict):
    """The reward model as the online trainers call it: its head standardised by stats."""
    scorer, tok = load_reward_model(path, trust_remote_code)
    if (stats["score_mean"], stats["score_std"]) != (0.0, 1.0):
        scorer.score = Standardize(scorer.score, stats["score_mean"], max(stats["score_std"], 1e-6))
    return scorer, tok


class KLBudget(TrainerCallback):
    """Stop when the policy drifts past the KL budget. TRL's PPO loop has no stop flag, so this raises; the
    stage catches it and keeps the policy of that step."""

    class Exceeded(Exception):
        pass

    def __init__(self, budget: float | None, key: str):
        self.budget, self.key = budget, key  # key: the logged KL (objective/kl for PPO, kl for GRPO/RLOO)
        self.fired_at = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        kl = (logs or {}).get(self.key)
        if self.budget is not None and kl is not None and kl > self.budget:
            self.fired_at = {"step": state.global_step, "kl": kl}
            raise KLBudget.Exceeded()

    def record(self, run, metrics: dict) -> None:
        if self.fired_at:
            run.log(f"KL budget exceeded at step {self.fired_at['step']} (KL {self.fired_at['kl']:.2f} > "
                    f"{self.budget}): stopped early, keeping the policy of that step")
            metrics.update(kl_budget_stop_step=self.fired_at["step"], kl_budget_stop_kl=self.fired_at["kl"])


class GoldTracker(TrainerCallback):
    """The gold judge's score of the policy's responses to held-out demo prompts every few updates, sampled as the
    final evaluation samples them (the stage's eval settings: temperature, seed, length): it shows when the reward
    and real quality part ways. Each check records the seconds it took."""

    def __init__(self, policy, tok, rows: list[dict], every: int, gen: GenerationEvalConfig, score_key: str,
                 kl_key: str):
        self.policy, self.tok, self.rows, self.every, self.gen = policy, tok, rows, every, gen
        self.score_key, self.kl_key = score_key, kl_key
        self.history = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self.every or not self.rows or state.global_step % self.every or self.score_key not in (logs or {}):
            return
        started = time.perf_counter()
        responses = generate_responses(self.policy, self.tok, [r["prompt"] for r in self.rows], self.gen,
                                       "Gold check")
        gold = sum(demo.gold_score(r["prompt"][-1]["content"], x) for r, x in zip(self.rows, responses))
        self.history.append({"step": state.global_step, "gold_score": gold / len(self.rows),
                             "score": logs.get(self.score_key), "kl": logs.get(self.kl_key),
                             "seconds": time.perf_counter() - started})
        logs["gold_score"] = self.history[-1]["gold_score"]


def evaluate_policy(model, ref, tok, rm: RewardModel | None, rows: list[dict], gen: GenerationEvalConfig,
                    judged: bool, desc: str) -> tuple[dict, list[dict]]:
    """Reward (with a reward model), KL to the reference, length and eos rate of responses sampled to held-out
    prompts, and on the demo's own prompts the gold score, its mean per task, and the flaw rates (the demo's judge
    means nothing on other data)."""
    prompts = [r["prompt"] for r in rows]
    pairs = sample_responses(model, tok, prompts, gen, desc)
    texts = [tok.decode(r, skip_special_tokens=True).strip() for _, r in pairs]
    scores = rm.score(prompts, [[{"role": "assistant", "content": t}] for t in texts]) if rm else [None] * len(texts)
    verdicts = [judge(p[-1]["content"], t) if judged else {"gold": None, "flaws": []} for p, t in zip(prompts, texts)]
    temperature = gen.temperature or 1.0  # greedy responses: the KL of the untempered distributions
    lp = response_logprobs(model, pairs, temperature, tok.pad_token_id)
    ref_lp = response_logprobs(ref, pairs, temperature, tok.pad_token_id)
    mean = lambda xs: sum(xs) / max(len(xs), 1)
    metrics = {"kl": mean([a - b for a, b in zip(lp, ref_lp)]),
               "response_length": mean([len(r) for _, r in pairs]),
               "eos_rate": mean([bool(r) and r[-1] == tok.eos_token_id for _, r in pairs])}
    if rm:
        metrics["reward_mean"] = mean(scores)
    samples = [{"task": row.get("task"), "prompt": p[-1]["content"], "response": t, "reward": s, **v}
               for row, p, t, s, v in zip(rows, prompts, texts, scores, verdicts)]
    if judged:
        metrics.update(gold_score=mean([s["gold"] for s in samples]), **flaw_rates(samples))
        for task in sorted({s["task"] for s in samples if s["task"]}):
            metrics[f"gold_score_{task}"] = mean([s["gold"] for s in samples if s["task"] == task])
    return metrics, samples


def evaluate_against_start(run, model, start, tok, rm: RewardModel | None, rows: list[dict],
                           gen: GenerationEvalConfig) -> dict:
    """The tuned model and its start (for the alignment stages, their frozen reference) on the same held-out
    prompts, sampled with the same noise: metrics of the tuned model, baseline_* of the start, gold_gain with its
    interval on the demo; the sample table and the log lines. Main process only."""
    judged = run.cfg.data.kind == "demo"
    name = run.stage.upper()
    origin = run.inputs["init_from"].entry
    before = origin.stage if origin is not None else "start"  # what the table and the log call the start
    if not rows:
        run.warn("no held-out prompts to evaluate on (pairs without a prompt field): the entry has no "
                 "figures of the tuned model's responses")
        return {}
    after, samples = evaluate_policy(model, start, tok, rm, rows, gen, judged, f"Scoring the {name} model")
    baseline, base_samples = evaluate_policy(start, start, tok, rm, rows, gen, judged,
                                             f"Scoring its start ({before})")
    metrics = {**after, **{f"baseline_{k}": v for k, v in baseline.items()}}
    if judged:
        metrics.update(gold_gain([s["gold"] for s in base_samples], [s["gold"] for s in samples]))
    write_samples(run, before, base_samples, samples)
    reward = (f"reward {metrics['baseline_reward_mean']:.3f} -> {metrics['reward_mean']:.3f}; "
              if rm else "")
    gold = (f"gold {metrics['baseline_gold_score']:.3f} -> {metrics['gold_score']:.3f} (gain "
            f"{with_interval(metrics, 'gold_gain')}, 95%, {len(rows)} held-out prompts); " if judged else "")
    run.log(f"{before} -> {run.stage}: {reward}{gold}KL {metrics['kl']:.3f}; length "
            f"{metrics['response_length']:.1f}; eos rate {metrics['eos_rate']:.2f}")
    if judged:
        run.log(f"flaw rates {before} -> {run.stage}: " + ", ".join(
            f"{c} {metrics[f'baseline_flaw_rate/{c}']:.3f} -> {metrics[f'flaw_rate/{c}']:.3f}" for c in demo.FLAWS))
    return metrics


def write_samples(run, start: str, before: list[dict], after: list[dict], n: int = 20) -> None:
    """The start's and the tuned model's responses to the same held-out prompts, side by side (jsonl with every
    prompt, markdown and a wandb table with the first n); the columns are named by the start's stage and the tuned
    model's (sft and ppo, pretrain and sft, ...)."""
    tuned = run.stage
    rows = [{"task": a["task"], "prompt": a["prompt"], start: b["response"], tuned: a["response"],
             f"{start}_reward": b["reward"], f"{tuned}_reward": a["reward"], f"{start}_gold": b["gold"],
             f"{tuned}_gold": a["gold"], f"{start}_flaws": b["flaws"], f"{tuned}_flaws": a["flaws"]}
            for b, a in zip(before, after)]
    out = Path(run.entry.path)
    with open(out / "samples.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    cell = lambda s: str(s).replace("|", "/").replace("\n", " ")
    pair = lambda a, b: f" {a:.2f} → {b:.2f} |" if a is not None else ""
    rewarded, judged = rows[0][f"{start}_reward"] is not None, rows[0][f"{start}_gold"] is not None
    was, now = start.upper(), tuned.upper()
    lines = [f"| prompt | {was} | {now} |" + (f" reward {was} → {now} |" if rewarded else "")
             + (f" gold {was} → {now} |" if judged else ""),
             "|---|---|---|" + ("---|" if rewarded else "") + ("---|" if judged else "")]
    lines += [f"| {cell(r['prompt'][-160:])} | {cell(r[start])} | {cell(r[tuned])} |"
              + pair(r[f"{start}_reward"], r[f"{tuned}_reward"]) + pair(r[f"{start}_gold"], r[f"{tuned}_gold"])
              for r in rows[:n]]
    (out / "samples.md").write_text("\n".join(lines) + "\n")
    if run.report_to == "wandb":
        import wandb
        columns = [k for k in rows[0] if not k.endswith("_flaws")]
        wandb.log({"samples": wandb.Table(columns=columns, data=[[r[k] for k in columns] for r in rows[:n]])})
