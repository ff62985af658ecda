"""RLHF with PPO: the SFT policy optimised against the reward model with TRL's experimental PPOTrainer
(TRL 1.12.0, the last release that ships it), with the details that make PPO for RLHF work.

    make ppo                                       # the demo: sft:latest against reward:latest
    make ppo ARGS="experiment=ci"                  # micro sizes
    make rlhf                                      # reward, then ppo
    make ppo ARGS="data=local data.path=prompts.jsonl ppo.kl_coef=0.1"

policy + reference (init_from) and reward + value models (reward_model) -> handoff checks -> prompts ->
PPOTrainer (per-token KL to the reference, score read at the eos, missing-eos penalty, truncation at the
stop token, one temperature for sampling and log-probabilities, dropout off, value model initialised from
the reward model, GAE, rewards normalised by the reward model's stored statistics, a KL budget) ->
held-out prompts scored for the PPO policy and its SFT start -> registry entry (parents: sft and reward).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import hydra
from datasets import Dataset
from omegaconf import DictConfig
from torch import nn
from transformers import TrainerCallback
from trl.experimental.ppo import PPOConfig
from trl.experimental.ppo import PPOTrainer

from pipeline import demo
from pipeline.config import GenerationEvalConfig, PPOStageConfig, register_schemas
from pipeline.data import load_prompt_data
from pipeline.errors import PipelineError
from pipeline.evaluation import (flaw_rates, generate_responses, gold_gain, judge, response_logprobs,
                                 sample_responses, with_interval)
from pipeline.models import load_causal_lm, load_reward_model, lora_config
from pipeline.registry import Registry
from pipeline.run import (StageRun, StepTimer, check_data_coverage, run_stage, save_hf_directory, trainer_arguments,
                          unwrapped)
from pipeline.tokenizer import tokenizer_fingerprint
from reward_model.scoring import STATS_FILE, RewardModel

register_schemas()


def inputs(cfg: PPOStageConfig, registry: Registry) -> dict:
    return {"init_from": registry.resolve(cfg.init_from), "reward_model": registry.resolve(cfg.reward_model)}


def check_handoff(policy_tok, reward_tok, policy_name: str, reward_name: str) -> None:
    """Refuse a policy and reward model that would read the same tokens differently."""
    for name, tok in ((policy_name, policy_tok), (reward_name, reward_tok)):
        if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
            raise PipelineError(f"{name}: the pad token must differ from eos (pad={tok.pad_token!r}, "
                                f"eos={tok.eos_token!r}); PPO reads the score at the eos and masks the padding")
        if not tok.chat_template:
            raise PipelineError(f"{name}: the tokenizer has no chat template; fine-tune with `make sft` first")
    if tokenizer_fingerprint(policy_tok) != tokenizer_fingerprint(reward_tok):
        diffs = [f"{what}: {a!r} vs {b!r}" for what, a, b in (
            ("vocabulary size", len(policy_tok), len(reward_tok)),
            ("eos", policy_tok.eos_token, reward_tok.eos_token),
            ("pad", policy_tok.pad_token, reward_tok.pad_token),
            ("chat template", policy_tok.chat_template[:40], reward_tok.chat_template[:40])) if a != b]
        raise PipelineError(f"tokenizer mismatch between the policy ({policy_name}) and the reward model "
                            f"({reward_name}): {'; '.join(diffs) or 'the vocabularies or merges differ'}. "
                            f"Train the reward model from this policy's lineage (make reward).")


class Standardize(nn.Module):
    """The reward head followed by (score - mean) / std, so PPO sees rewards of unit scale."""

    def __init__(self, head: nn.Module, mean: float, std: float):
        super().__init__()
        self.head, self.mean, self.std = head, mean, std

    def forward(self, hidden):
        return (self.head(hidden) - self.mean) / self.std


class KLBudget(TrainerCallback):
    """Stop PPO when the policy drifts past the KL budget (PPOTrainer's loop has no stop flag: raise)."""

    class Exceeded(Exception):
        pass

    def __init__(self, budget: float | None):
        self.budget = budget
        self.fired_at = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        kl = (logs or {}).get("objective/kl")
        if self.budget is not None and kl is not None and kl > self.budget:
            self.fired_at = {"step": state.global_step, "kl": kl}
            raise KLBudget.Exceeded()


class GoldTracker(TrainerCallback):
    """The gold judge's score of the policy's greedy responses to held-out prompts, every few updates:
    it shows when the reward model's score and real quality part ways."""

    def __init__(self, policy, tok, rows: list[dict], every: int, gen_cfg):
        self.policy, self.tok, self.rows, self.every, self.gen_cfg = policy, tok, rows, every, gen_cfg
        self.history = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self.every or not self.rows or state.global_step % self.every:
            return
        responses = generate_responses(self.policy, self.tok, [r["prompt"] for r in self.rows], self.gen_cfg,
                                       "Gold check")
        gold = sum(demo.gold_score(r["prompt"][-1]["content"], x) for r, x in zip(self.rows, responses))
        self.history.append({"step": state.global_step, "gold_score": gold / len(self.rows),
                             "score": (logs or {}).get("objective/scores"), "kl": (logs or {}).get("objective/kl")})
        logs["gold_score"] = self.history[-1]["gold_score"]


def evaluate_policy(model, ref, tok, rm: RewardModel, rows: list[dict], cfg: PPOStageConfig, desc: str):
    """Reward, KL to the reference, length and eos rate of sampled responses to held-out prompts, and on the demo's
    own prompts the gold score (the demo's judge means nothing on other data)."""
    gen = GenerationEvalConfig(max_new_tokens=cfg.ppo.response_length, temperature=cfg.ppo.temperature,
                               seed=cfg.eval.seed, batch_size=cfg.eval.batch_size)  # the same noise for both
    prompts = [r["prompt"] for r in rows]
    pairs = sample_responses(model, tok, prompts, gen, desc)
    texts = [tok.decode(r, skip_special_tokens=True).strip() for _, r in pairs]
    scores = rm.score(prompts, [[{"role": "assistant", "content": t}] for t in texts])
    judged = cfg.data.kind == "demo"
    verdicts = [judge(p[-1]["content"], t) if judged else {"gold": None, "flaws": []} for p, t in zip(prompts, texts)]
    lp = response_logprobs(model, pairs, cfg.ppo.temperature, tok.pad_token_id)
    ref_lp = response_logprobs(ref, pairs, cfg.ppo.temperature, tok.pad_token_id)
    mean = lambda xs: sum(xs) / max(len(xs), 1)
    metrics = {"reward_mean": mean(scores), "kl": mean([a - b for a, b in zip(lp, ref_lp)]),
               "response_length": mean([len(r) for _, r in pairs]),
               "eos_rate": mean([bool(r) and r[-1] == tok.eos_token_id for _, r in pairs])}
    samples = [{"prompt": p[-1]["content"], "response": t, "reward": s, **v}
               for p, t, s, v in zip(prompts, texts, scores, verdicts)]
    if judged:
        metrics.update(gold_score=mean([s["gold"] for s in samples]), **flaw_rates(samples))
    return metrics, samples


def ppo_arguments(run: StageRun) -> PPOConfig:
    """TRL's PPOStageConfig from the ppo and trainer sections: one PPO update per trainer step."""
    p, t = run.cfg.ppo, run.cfg.trainer
    rollouts = t.per_device_train_batch_size * t.gradient_accumulation_steps * run.state.num_processes
    return PPOConfig(
        **{**trainer_arguments(t, run), "save_strategy": "no"},  # TRL's PPO cannot resume: no trainer checkpoints
        total_episodes=t.max_steps * rollouts, num_ppo_epochs=p.num_ppo_epochs, num_mini_batches=p.num_mini_batches,
        response_length=p.response_length,
        stop_token="eos",  # truncate each response after its first eos; the score is read there
        temperature=p.temperature, missing_eos_penalty=p.missing_eos_penalty, kl_coef=p.kl_coef,
        kl_estimator=p.kl_estimator, cliprange=p.cliprange, cliprange_value=p.cliprange_value, vf_coef=p.vf_coef,
        gamma=p.gamma, lam=p.lam, whiten_rewards=p.whiten_rewards, local_rollout_forward_batch_size=p.rollout_batch_size,
        num_sample_generations=0, dataset_num_proc=None,
    )


def ppo(run: StageRun) -> dict:
    cfg: PPOStageConfig = run.cfg
    policy_ref, reward_ref = run.inputs["init_from"], run.inputs["reward_model"]
    trust = cfg.trust_remote_code
    policy, tok = load_causal_lm(policy_ref.path, trust)
    reference, _ = load_causal_lm(policy_ref.path, trust)
    rm = RewardModel(*load_reward_model(reward_ref.path, trust))
    check_handoff(tok, rm.tok, cfg.init_from, cfg.reward_model)

    stats_file = Path(reward_ref.path) / STATS_FILE
    if cfg.ppo.normalize_rewards and not stats_file.exists():
        raise PipelineError(f"{reward_ref.path} has no {STATS_FILE} (score_mean/score_std) to normalise rewards "
                            f"with; train it with `make reward`, or set ppo.normalize_rewards=false")
    stats = json.loads(stats_file.read_text()) if stats_file.exists() else {"score_mean": 0.0, "score_std": 1.0}
    scorer, _ = load_reward_model(reward_ref.path, trust)
    if cfg.ppo.normalize_rewards:
        scorer.score = Standardize(scorer.score, stats["score_mean"], max(stats["score_std"], 1e-6))
    value, _ = load_reward_model(reward_ref.path, trust)  # the value model starts as the reward model

    train_rows, eval_rows = load_prompt_data(cfg.data, cfg.seed, run.cache_dir, cfg.eval.num_prompts)
    check_data_coverage(run, tok, [{"prompt": r["prompt"]} for r in train_rows], policy)
    tok.padding_side = "left"  # prompts end where the response begins
    encode = lambda rows: Dataset.from_list(
        [{"input_ids": tok(tok.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False),
                           add_special_tokens=False)["input_ids"]} for r in rows])
    train_ds, eval_ds = encode(train_rows), encode(eval_rows[:max(cfg.trainer.per_device_eval_batch_size, 1)])
    run.log(f"{len(train_rows)} training prompts, {len(eval_rows)} held-out prompts; reward statistics "
            f"mean {stats['score_mean']:.3f} std {stats['score_std']:.3f}")

    args = ppo_arguments(run)
    judged = cfg.data.kind == "demo"
    p = cfg.ppo
    tracker = GoldTracker(policy, tok, eval_rows[:p.gold_prompts] if judged else [], p.gold_every,
                          GenerationEvalConfig(max_new_tokens=p.response_length, temperature=0.0,
                                               batch_size=cfg.eval.batch_size))
    budget = KLBudget(p.kl_budget)
    timer = StepTimer(skip=1)  # an update is long; the first one's warm-up is what is left out
    trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=reference, reward_model=scorer,
                         value_model=value, train_dataset=train_ds, eval_dataset=eval_ds,
                         peft_config=lora_config(cfg.peft, "CAUSAL_LM"), callbacks=[tracker, budget, timer])
    try:
        trainer.train()
    except KLBudget.Exceeded:
        run.log(f"KL budget exceeded at step {budget.fired_at['step']} (KL {budget.fired_at['kl']:.2f} > "
                f"{p.kl_budget}): stopped early, keeping the policy of that step")
    save_hf_directory(trainer, tok, run)

    metrics = {"ppo_steps": trainer.state.global_step, "episodes": trainer.state.episode,
               "steady_seconds_per_step": timer.seconds_per_step()}
    if budget.fired_at:
        metrics.update(kl_budget_stop_step=budget.fired_at["step"], kl_budget_stop_kl=budget.fired_at["kl"])
    run.record(**metrics)  # kept should the evaluation below fail
    if run.is_main:
        tuned = unwrapped(trainer.model.policy if hasattr(trainer.model, "policy") else trainer.policy_model)
        after, samples = evaluate_policy(tuned, reference, tok, rm, eval_rows, cfg, "Scoring the PPO policy")
        before, base_samples = evaluate_policy(reference, reference, tok, rm, eval_rows, cfg, "Scoring the SFT policy")
        metrics.update(after)
        metrics.update({f"baseline_{k}": v for k, v in before.items()})
        if judged:
            metrics.update(gold_gain([s["gold"] for s in base_samples], [s["gold"] for s in samples]))
        write_samples(run, base_samples, samples)
        history = [h for h in trainer.state.log_history if "objective/scores" in h]
        (Path(run.entry.path) / "ppo_history.json").write_text(json.dumps(
            {"log": history, "gold": tracker.history}, indent=1))
        gain = f" (gain {with_interval(metrics, 'gold_gain')}, 95%)" if judged else ""
        run.log(f"reward {metrics['baseline_reward_mean']:.3f} -> {metrics['reward_mean']:.3f}; gold "
                f"{metrics.get('baseline_gold_score', math.nan):.3f} -> {metrics.get('gold_score', math.nan):.3f}"
                f"{gain}; KL {metrics['kl']:.3f}; length {metrics['response_length']:.1f}; eos rate "
                f"{metrics['eos_rate']:.2f}")
        if judged:
            run.log("flaw rates SFT -> PPO: " + ", ".join(
                f"{c} {metrics[f'baseline_flaw_rate/{c}']:.3f} -> {metrics[f'flaw_rate/{c}']:.3f}" for c in demo.FLAWS))
    return metrics


def write_samples(run: StageRun, before: list[dict], after: list[dict], n: int = 20) -> None:
    """SFT and PPO responses to the same held-out prompts, side by side (jsonl, markdown, wandb table)."""
    rows = [{"prompt": a["prompt"], "sft": b["response"], "ppo": a["response"], "sft_reward": b["reward"],
             "ppo_reward": a["reward"], "sft_gold": b["gold"], "ppo_gold": a["gold"]} for b, a in zip(before, after)]
    out = Path(run.entry.path)
    with open(out / "samples.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    cell = lambda s: str(s).replace("|", "/").replace("\n", " ")
    judged = rows[0]["sft_gold"] is not None
    lines = ["| prompt | SFT | PPO | reward SFT → PPO |" + (" gold SFT → PPO |" if judged else ""),
             "|---|---|---|---|" + ("---|" if judged else "")]
    lines += [f"| {cell(r['prompt'][-160:])} | {cell(r['sft'])} | {cell(r['ppo'])} | "
              f"{r['sft_reward']:.2f} → {r['ppo_reward']:.2f} |"
              + (f" {r['sft_gold']:.2f} → {r['ppo_gold']:.2f} |" if judged else "") for r in rows[:n]]
    (out / "samples.md").write_text("\n".join(lines) + "\n")
    if run.report_to == "wandb":
        import wandb
        wandb.log({"samples": wandb.Table(columns=list(rows[0]), data=[list(r.values()) for r in rows[:n]])})


@hydra.main(version_base="1.3", config_path="../conf", config_name="ppo")
def main(cfg: DictConfig) -> float:
    return run_stage("ppo", cfg, ppo, inputs, resumable=False).get("reward_mean", 0.0)


if __name__ == "__main__":
    main()
