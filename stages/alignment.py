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

import torch
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from pipeline import demo
from pipeline.config import GenerationEvalConfig
from pipeline.errors import PipelineError
from pipeline.evaluation import (MIN_EVAL_PROMPTS, flaw_rates, gain, generate_responses, judge, response_logprobs,
                                 sample_responses, with_interval)
from pipeline.models import Unpadded, ensemble_members, load_reward_model
from reward_model.scoring import STATS_FILE, RewardModel


class EnsembleReward(nn.Module):
    """The reward head as the online trainers read it: each member's score normalised, (score - mean) / std with
    the reward model's stored statistics, so that the policy sees rewards of unit scale, and the members combined
    into the one reward the policy is trained on: their mean (none), the mean less coef times their std
    (mean_minus_std), or the lowest (min). A single reward model is an ensemble of one.

    The members' normalised scores at each scored sequence's end (its last attended token, where the trainers read
    the reward) are kept in `read`, one row per sequence, for the Disagreement callback to log; a hook on the
    backbone hands over the attention mask of the call."""

    def __init__(self, head: nn.Module, mean: list[float], std: list[float], combine: str = "none",
                 coef: float = 1.0):
        super().__init__()
        self.head, self.combine, self.coef = head, combine, coef
        self.register_buffer("mean", torch.tensor(mean), persistent=False)
        self.register_buffer("std", torch.tensor(std).clamp(min=1e-6), persistent=False)
        self.mask, self.read = None, []

    def forward(self, hidden):
        z = (self.head(hidden) - self.mean) / self.std  # (..., members)
        if z.shape[-1] == 1:
            return z
        if self.mask is not None and self.mask.shape == z.shape[:-1]:  # (batch, tokens): one row per sequence
            last = self.mask.shape[1] - 1 - self.mask.flip(1).long().argmax(1)
            self.read += z.detach()[torch.arange(len(last)), last].float().tolist()
        if self.combine == "min":
            return z.min(-1, keepdim=True).values
        mean = z.mean(-1, keepdim=True)
        if self.combine == "mean_minus_std":
            return mean - self.coef * z.std(-1, unbiased=False, keepdim=True)
        return mean


def reward_statistics(path: str, normalize: bool, members: int = 1) -> dict:
    """The reward model's stored score statistics (written by `make reward`): member_mean and member_std per
    member (score_mean/score_std of an entry written before ensembles); 0 and 1 without normalisation."""
    stats_file = Path(path) / STATS_FILE
    if normalize and not stats_file.exists():
        raise PipelineError(f"{path} has no {STATS_FILE} (score_mean/score_std) to normalise rewards with; train "
                            f"it with `make reward`, or turn reward normalisation off (normalize_rewards=false)")
    if not normalize:
        return {"score_mean": 0.0, "score_std": 1.0, "member_mean": [0.0] * members, "member_std": [1.0] * members}
    stats = json.loads(stats_file.read_text())
    stats.setdefault("member_mean", [stats["score_mean"]])
    stats.setdefault("member_std", [stats["score_std"]])
    return stats


def load_scorer(path: str, trust_remote_code: bool, stats: dict, combine: str = "none", coef: float = 1.0):
    """The reward model as the online trainers call it: its backbone reading only the tokens the attention mask
    keeps (Unpadded), its head replaced by EnsembleReward (normalised members, combined into one reward)."""
    scorer, tok = load_reward_model(path, trust_remote_code)
    head = EnsembleReward(scorer.score, stats["member_mean"], stats["member_std"], combine, coef)
    backbone = Unpadded(getattr(scorer, scorer.base_model_prefix))  # rollouts are padded on both sides
    setattr(scorer, scorer.base_model_prefix, backbone)
    backbone.register_forward_pre_hook(lambda module, args, kwargs: setattr(head, "mask", kwargs.get(
        "attention_mask")), with_kwargs=True)
    scorer.score = head
    return scorer, tok


def value_model(path: str, trust_remote_code: bool):
    """PPO's value model, started as the reward model: a one-output head, a heads ensemble's the mean of its
    members', an ensemble of separate models its first member."""
    members = ensemble_members(path)
    value, _ = load_reward_model(str(members[0]) if members else path, trust_remote_code)
    head = value.score
    if head.out_features > 1:
        mean = nn.Linear(head.in_features, 1, bias=head.bias is not None)
        with torch.no_grad():
            mean.weight.copy_(head.weight.mean(0, keepdim=True))
            if head.bias is not None:
                mean.bias.copy_(head.bias.mean(0, keepdim=True))
        value.score, value.config.num_labels = mean, 1
    return value


def ensemble_note(members: int, settings) -> str:
    """What the log says of the reward the policy is trained on, for an ensemble; nothing for a single model."""
    if members == 1:
        if settings.reward_uncertainty != "none":
            return f"; reward_uncertainty={settings.reward_uncertainty} has no effect on a single reward model"
        return ""
    combined = {"none": "their mean", "min": "the lowest member's score",
                "mean_minus_std": f"their mean - {settings.reward_uncertainty_coef} x their std"}
    return f"; an ensemble of {members}, the reward {combined[settings.reward_uncertainty]}"


class BudgetExceeded(Exception):
    """A guard stopped the run (TRL's PPO loop has no stop flag, so the guards raise); the stage catches it and
    keeps the policy of that step."""


class Kept(ExportableState):
    """A callback whose `kept` attributes a resumed run restores: the Trainer saves them with each checkpoint, in its
    trainer_state.json (transformers' ExportableState), and a resumed run reads them back when training begins."""
    kept: tuple[str, ...] = ()

    def state(self) -> dict:
        return {"args": {}, "attributes": {k: getattr(self, k) for k in self.kept}}

    def restore(self, state) -> None:
        saved = state.stateful_callbacks.get(type(self).__name__)
        if saved:
            self.__dict__.update(saved["attributes"])

    def on_train_begin(self, args, state, control, **kwargs):
        self.restore(state)  # a fresh run's state holds the callback's own


class KLBudget(Kept, TrainerCallback):
    """Stop when the policy drifts past the KL budget."""
    kept = ("fired_at",)

    def __init__(self, budget: float | None, kl_of):
        self.budget, self.kl_of = budget, kl_of  # a log's KL in nats per response (None where it has none)
        self.fired_at = None

    @property
    def stopped(self) -> bool:
        return self.fired_at is not None

    def on_log(self, args, state, control, logs=None, **kwargs):
        kl = self.kl_of(logs or {})
        if self.budget is not None and kl is not None and kl > self.budget:
            self.fired_at = {"step": state.global_step, "kl": kl}
            raise BudgetExceeded()

    def record(self, run, metrics: dict) -> None:
        if self.fired_at:
            run.log(f"KL budget exceeded at step {self.fired_at['step']} (KL {self.fired_at['kl']:.2f} > "
                    f"{self.budget}): stopped early, keeping the policy of that step")
            metrics.update(kl_budget_stop_step=self.fired_at["step"], kl_budget_stop_kl=self.fired_at["kl"])


class RewardStall(Kept, TrainerCallback):
    """The policy still moving away from its start after the reward it is trained on stopped rising: past the
    reward's top, what KL buys is what the reward model cannot judge, where over-optimisation happens (Gao et al.'s
    gold falls past the proxy's knee). Over `WINDOW` logs' means, the best reward so far and the KL where it was
    reached; when the KL has grown past `budget` times that with the reward no more than `MARGIN` above its best,
    a warning (and with `stop`, the end of training), recorded in the entry. It reads only the reward and the KL,
    so it needs neither a gold judge nor an ensemble."""

    WINDOW = 8  # one update's 64 rollouts move the reward by more than the policy moves it over several
    MARGIN = 0.05  # of the normalised reward: a rise smaller than this is noise, not a rise
    FLOOR = 0.5  # nats: a KL this small is the start's neighbourhood, where growth by a ratio means nothing
    kept = ("rewards", "kls", "best", "fired_at")

    def __init__(self, budget: float | None, stop: bool, warn, reward_key: str, kl_of):
        self.budget, self.stop, self.warn = budget, stop, warn
        # the stage's logged reward, and its KL in nats per response (from a log; None where it has none)
        self.reward_key, self.kl_of = reward_key, kl_of
        self.rewards: list[float] = []
        self.kls: list[float] = []
        self.best = None  # {"step", "reward", "kl"}: where the windowed reward last rose by MARGIN
        self.fired_at = None

    @property
    def stopped(self) -> bool:
        return self.fired_at is not None and self.stop

    def observe(self, step: int, reward: float, kl: float) -> bool:
        """One log's reward and KL; True when the warning fires with it."""
        self.rewards.append(reward)
        self.kls.append(kl)
        if self.budget is None or self.fired_at is not None or len(self.rewards) < self.WINDOW:
            return False
        mean_reward = sum(self.rewards[-self.WINDOW:]) / self.WINDOW
        mean_kl = sum(self.kls[-self.WINDOW:]) / self.WINDOW
        if self.best is None or mean_reward > self.best["reward"] + self.MARGIN:
            self.best = {"step": step, "reward": mean_reward, "kl": mean_kl}
            return False
        if mean_kl < self.budget * max(self.best["kl"], self.FLOOR):
            return False
        self.fired_at = {"step": step, "kl": mean_kl, "reward": mean_reward, "best": dict(self.best)}
        return True

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        kl = self.kl_of(logs)
        if self.reward_key not in logs or kl is None:
            return
        if not self.observe(state.global_step, logs[self.reward_key], kl):
            return
        b = self.fired_at["best"]
        self.warn(f"the reward stopped rising at update {b['step']} ({b['reward']:.3f}, KL {b['kl']:.2f}); by update "
                  f"{state.global_step} the KL is {self.fired_at['kl']:.2f} (stall_budget {self.budget}x) with the "
                  f"reward at {self.fired_at['reward']:.3f} ({self.WINDOW}-update means): the policy is moving "
                  f"where the reward model sees no gain, buying KL and not reward; past this point a reward "
                  f"model's errors are what is left to learn"
                  + ("; stopping" if self.stop else "; stall_stop=true would stop the run here"))
        if self.stop:
            raise BudgetExceeded()

    def record(self, run, metrics: dict) -> None:
        if not self.fired_at:
            return
        metrics.update(stall_warning_step=self.fired_at["step"], stall_best_step=self.fired_at["best"]["step"])
        if self.stop:
            metrics["stall_stop_step"] = self.fired_at["step"]
            run.log(f"stall budget exceeded at update {self.fired_at['step']}: stopped early, keeping the policy of "
                    f"that update")


class Disagreement(Kept, TrainerCallback):
    """The reward ensemble's disagreement on the policy's own rollouts: per update, the mean std of the members'
    normalised scores over the responses it scored, and each member's mean score; each log carries their means
    since the last one (reward/ensemble_std and reward/member_<i>, in the log history), so that a member that
    parts ways with the others shows as its own curve. The std is measured against its value at the first update,
    the start's rollouts: past `budget` times that, a warning (and with `stop`, the end of training), recorded in
    the entry. It needs no gold judge."""

    KEY = "reward/ensemble_std"
    MEMBER = "reward/member_{}"
    kept = ("history", "logged", "fired_at")

    def __init__(self, head: EnsembleReward, budget: float | None, stop: bool, warn):
        self.head, self.budget, self.stop, self.warn = head, budget, stop, warn
        self.history: list[dict] = []  # {"step", "ensemble_std", "members"} per update
        self.logged = 0  # updates already reported in a log
        self.fired_at = None

    @property
    def stopped(self) -> bool:
        return self.fired_at is not None and self.stop

    def _close_update(self, step: int) -> None:
        """The scores taken since the last call, as the update's figures (PPO logs before its step ends, GRPO
        after: whichever comes first closes the update), and the budget checked against them."""
        if not self.head.read:
            return
        z = torch.tensor(self.head.read, dtype=torch.float64, device=self.head.mean.device)  # (responses, members)
        self.head.read.clear()
        total = torch.cat([z.std(1, unbiased=False).sum(0, keepdim=True), z.new_tensor([len(z)]), z.sum(0)])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(total)  # every process's rollouts: one figure, one decision to stop
        std, members = (total[0] / total[1]).item(), (total[2:] / total[1]).tolist()
        self.history.append({"step": step, "ensemble_std": std, "members": members})
        start = self.history[0]["ensemble_std"]
        if self.budget is None or self.fired_at is not None or len(self.history) < 2 or std <= self.budget * start:
            return
        self.fired_at = {"step": step, "ensemble_std": std, "start": start}
        self.warn(f"the reward ensemble's disagreement on the policy's responses rose to {std:.3f} at update {step}, "
                  f"{std / max(start, 1e-9):.1f}x its {start:.3f} on the start's (disagreement_budget "
                  f"{self.budget}x): the policy reaches responses its reward models do not agree on, where the "
                  f"reward is not to be trusted" + ("; stopping" if self.stop else
                                                    "; disagreement_stop=true would stop the run here"))
        if self.stop:
            raise BudgetExceeded()

    def on_step_end(self, args, state, control, **kwargs):
        self._close_update(state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        self._close_update(state.global_step)
        new = self.history[self.logged:]
        if not new:
            return
        self.logged = len(self.history)
        means = {self.KEY: sum(h["ensemble_std"] for h in new) / len(new)}
        for i in range(len(new[0]["members"])):
            means[self.MEMBER.format(i)] = sum(h["members"][i] for h in new) / len(new)
        if logs is not None:
            logs.update(means)
        if state.log_history:  # the Trainer appends a copy of the logs before the callbacks see them
            state.log_history[-1].update(means)

    def record(self, run, metrics: dict) -> None:
        if not self.history:
            return
        metrics.update(ensemble_std_start=self.history[0]["ensemble_std"],
                       ensemble_std_final=self.history[-1]["ensemble_std"])
        if self.fired_at:
            metrics["disagreement_warning_step"] = self.fired_at["step"]
            if self.stop:
                metrics["disagreement_stop_step"] = self.fired_at["step"]
                run.log(f"disagreement budget exceeded at update {self.fired_at['step']}: stopped early, keeping "
                        f"the policy of that update")


class GoldTracker(Kept, TrainerCallback):
    """The gold judge's score of the policy's responses to held-out demo prompts every few updates, sampled as the
    final evaluation samples them (the stage's eval settings: temperature, seed, length): it shows when the reward
    and real quality part ways. Each check records the seconds it took."""
    kept = ("history",)

    def __init__(self, policy, tok, rows: list[dict], every: int, gen: GenerationEvalConfig, score_key: str,
                 kl_of):
        self.policy, self.tok, self.rows, self.every, self.gen = policy, tok, rows, every, gen
        self.score_key, self.kl_of = score_key, kl_of  # kl_of: a log's KL in nats per response, as KLBudget's
        self.history = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self.every or not self.rows or state.global_step % self.every or self.score_key not in (logs or {}):
            return
        started = time.perf_counter()
        responses = generate_responses(self.policy, self.tok, [r["prompt"] for r in self.rows], self.gen,
                                       "Gold check")
        gold = sum(demo.gold_score(r["prompt"][-1]["content"], x) for r, x in zip(self.rows, responses))
        self.history.append({"step": state.global_step, "gold_score": gold / len(self.rows),
                             "score": logs.get(self.score_key), "kl": self.kl_of(logs),
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
    scores, spread = [None] * len(texts), None
    if rm:
        scores, spread = rm.score_with_disagreement(prompts, [[{"role": "assistant", "content": t}] for t in texts])
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
    if rm and rm.members > 1:
        metrics["ensemble_std"] = mean(spread)  # the members' disagreement on these responses
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
    k = gen.samples_per_prompt
    answered = [r for r in rows for _ in range(k)]  # each prompt's k responses together
    after, samples = evaluate_policy(model, start, tok, rm, answered, gen, judged, f"Scoring the {name} model")
    baseline, base_samples = evaluate_policy(start, start, tok, rm, answered, gen, judged,
                                             f"Scoring its start ({before})")
    metrics = {**after, **{f"baseline_{key}": v for key, v in baseline.items()},
               "eval_prompts": len(rows), "eval_samples_per_prompt": k}
    if rm:
        metrics.update(gain("reward_gain", [s["reward"] for s in base_samples], [s["reward"] for s in samples], k))
    if judged:
        metrics.update(gain("gold_gain", [s["gold"] for s in base_samples], [s["gold"] for s in samples], k))
    write_samples(run, before, base_samples, samples)
    reward = (f"reward {metrics['baseline_reward_mean']:.3f} -> {metrics['reward_mean']:.3f} (gain "
              f"{with_interval(metrics, 'reward_gain')}, 95%, {len(rows)} held-out prompts"
              f"{f' x {k} responses' if k > 1 else ''}); " if rm else "")
    if "ensemble_std" in metrics:
        reward += (f"reward ensemble's disagreement {metrics['baseline_ensemble_std']:.3f} -> "
                   f"{metrics['ensemble_std']:.3f}; ")
    gold = (f"gold {metrics['baseline_gold_score']:.3f} -> {metrics['gold_score']:.3f} (gain "
            f"{with_interval(metrics, 'gold_gain')}, 95%, {len(rows)} held-out prompts); " if judged else "")
    run.log(f"{before} -> {run.stage}: {reward}{gold}KL {metrics['kl']:.3f}; length "
            f"{metrics['response_length']:.1f}; eos rate {metrics['eos_rate']:.2f}")
    if len(rows) < MIN_EVAL_PROMPTS:
        run.warn(f"only {len(rows)} held-out prompts: too few for the reward or gold gain to support a conclusion "
                 f"either way (its interval shows how little they pin down). Hold out more prompts (data.eval_fraction, "
                 f"with eval.num_prompts at least as many), or answer each several times (eval.samples_per_prompt)")
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
