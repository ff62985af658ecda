"""Online RL from groups of sampled responses: the SFT policy optimised with TRL's GRPOTrainer, or its RLOOTrainer
(algorithm=rloo), against the reward model and/or reward functions.

    make grpo                                                   # the demo: sft:latest against reward:latest
    make grpo ARGS="algorithm=rloo"                             # REINFORCE leave-one-out, same setup
    make grpo ARGS="experiment=ci"                              # micro sizes
    make grpo ARGS="reward_model=reward:latest reward_functions=[pipeline.rewards:no_repeated_sentences]"
    make grpo ARGS="reward_functions=[demo_oracle]"             # the demo's judge itself: an upper bound

policy (init_from) + reward sources (the reward model, normalised by its stored statistics as in PPO, with the
same handoff checks; functions named module:function) -> prompts -> GRPOTrainer / RLOOTrainer (each prompt's
group of responses is its own baseline; KL to the start; a KL budget and gold tracking as in PPO) -> held-out
prompts sampled for the policy and its SFT start (the alignment core's evaluation) -> registry entry (stage grpo
or rloo; parents: init_from and the reward model when used).
"""
from __future__ import annotations

import json
from pathlib import Path

import hydra
from datasets import Dataset
from omegaconf import DictConfig
from transformers import PreTrainedModel
from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

from pipeline.callbacks import standard_callbacks
from pipeline.checkpoint import save_hf_directory, unwrapped
from pipeline.config import RLOOStageConfig, refuse_keys_of_other_stages, register_schemas
from pipeline.data import load_prompt_data
from pipeline.handoff import check_data_coverage, check_reward_handoff
from pipeline.models import load_causal_lm, load_reward_model, lora_config
from pipeline.registry import Registry
from pipeline.rewards import ORACLES, resolve_reward_function
from pipeline.run import StageRun, run_stage
from pipeline.trainer import trainer_arguments
from reward_model.scoring import RewardModel
from stages.alignment import (BudgetExceeded, Disagreement, GoldTracker, KLBudget, RewardStall, ensemble_note,
                              evaluate_against_start, load_scorer, reward_statistics)

register_schemas()


def inputs(cfg: RLOOStageConfig, registry: Registry) -> dict:
    for name in cfg.reward_functions:  # a bad name stops the run before any entry exists
        resolve_reward_function(name)
    out = {"init_from": registry.resolve(cfg.init_from)}
    if cfg.reward_model:
        out["reward_model"] = registry.resolve(cfg.reward_model)
    return out


def trainer_and_args(run: StageRun):
    """(TRL trainer class, its config) for the algorithm, built from the grpo and trainer sections (GRPO's loss
    settings where the algorithm is grpo: RLOO's config has no such section)."""
    cfg: RLOOStageConfig = run.cfg  # or GRPOStageConfig, with the loss settings
    g = cfg.grpo
    common = dict(num_generations=g.num_generations, max_completion_length=g.max_completion_length,
                  temperature=g.temperature, beta=g.beta, epsilon=g.epsilon, num_iterations=g.num_iterations,
                  disable_dropout=True, reward_weights=list(cfg.reward_weights) if cfg.reward_weights else None)
    if cfg.algorithm == "rloo":
        return RLOOTrainer, trainer_arguments(run, RLOOConfig, **common)
    return GRPOTrainer, trainer_arguments(run, GRPOConfig, **common, loss_type=g.loss_type,
                                          scale_rewards=g.scale_rewards)


def grpo(run: StageRun) -> dict:
    cfg: RLOOStageConfig = run.cfg
    g, trust = cfg.grpo, cfg.trust_remote_code
    start = run.inputs["init_from"]

    # --- models: policy, reference, and the reward sources
    policy, tok = load_causal_lm(start.path, trust)
    reference, _ = load_causal_lm(start.path, trust)  # the start, for the evaluation against it

    funcs, processing, rm, head = [], [], None, None
    if "reward_model" in run.inputs:
        reward_ref = run.inputs["reward_model"]
        rm = RewardModel(*load_reward_model(reward_ref.path, trust))
        check_reward_handoff(tok, rm.tok, cfg.init_from, cfg.reward_model)
        stats = reward_statistics(reward_ref.path, g.normalize_rewards, rm.members)
        rm.stats = stats  # the evaluation's disagreement on the scale the policy was trained on
        scorer, scorer_tok = load_scorer(reward_ref.path, trust, stats, g.reward_uncertainty, g.reward_uncertainty_coef)
        if not isinstance(scorer, PreTrainedModel):  # separate models stacked: TRL moves only its own kind
            scorer.to(run.state.device)
        funcs.append(scorer)
        processing.append(scorer_tok)
        head = scorer.score
        run.log(f"reward model {reward_ref.entry.id if reward_ref.entry else reward_ref.path}: statistics mean "
                f"{stats['score_mean']:.3f} std {stats['score_std']:.3f}" + ensemble_note(rm.members, g))
    for name in cfg.reward_functions:
        funcs.append(resolve_reward_function(name))
        processing.append(None)
    oracle = any(name in ORACLES for name in cfg.reward_functions)
    if oracle:
        run.warn("training on the demo's gold judge (demo_oracle): an oracle no deployed system has. The entry is "
                 "marked oracle: the upper bound of what RL reaches on the demo, not a result to compare as one")

    # --- data
    train_rows, eval_rows = load_prompt_data(cfg.data, cfg.seed, run.cache_dir, cfg.eval.num_prompts)
    run.record_fingerprints(train_rows, tok)
    check_data_coverage(run, tok, [{"prompt": r["prompt"]} for r in train_rows], policy)
    run.log(f"{cfg.algorithm}: {len(train_rows)} training prompts, {len(eval_rows)} held-out prompts; groups of "
            f"{g.num_generations}; rewards: {', '.join([cfg.reward_model] * bool(rm) + list(cfg.reward_functions))}")

    # --- trainer
    trainer_cls, args = trainer_and_args(run)
    judged = cfg.data.kind == "demo"
    tracker = GoldTracker(policy, tok, eval_rows[:g.gold_prompts] if judged else [], g.gold_every, cfg.eval,
                          "reward", kl_per_response)
    budget = KLBudget(g.kl_budget, kl_per_response)
    stall = RewardStall(g.stall_budget, g.stall_stop, run.warn, "reward", kl_per_response)
    disagreement = None if head is None else Disagreement(head, g.disagreement_budget, g.disagreement_stop, run.warn)
    guards = [budget, stall, *[disagreement] * (disagreement is not None)]
    trainer = trainer_cls(model=policy, reward_funcs=funcs, args=args, train_dataset=Dataset.from_list(train_rows),
                          processing_class=tok, reward_processing_classes=processing,
                          peft_config=lora_config(cfg.peft, "CAUSAL_LM"),
                          callbacks=[*standard_callbacks(run, timer_skip=1), tracker, *guards])

    # --- train and save
    try:
        trainer.train(resume_from_checkpoint=run.resume_from)
    except BudgetExceeded:
        pass  # recorded below
    save_hf_directory(trainer, tok, run)

    # --- evaluate against the start
    metrics = {"global_step": trainer.state.global_step, "oracle": oracle}
    for guard in guards:
        guard.record(run, metrics)
    run.record(**metrics)  # kept should the evaluation below fail
    if run.is_main:
        tuned = unwrapped(trainer.model, run)
        metrics.update(evaluate_against_start(run, tuned, reference, tok, rm, eval_rows, cfg.eval))
        history = [h for h in trainer.state.log_history if "reward" in h]
        (Path(run.entry.path) / f"{run.stage}_history.json").write_text(json.dumps(
            {"log": history, "gold": tracker.history,
             "disagreement": disagreement.history if disagreement is not None else []}, indent=1))
    return metrics


def kl_per_response(log: dict) -> float | None:
    """A log's KL to the reference in nats per response, as PPO logs it: TRL logs GRPO's and RLOO's per token, so
    it is that times the responses' mean length; None in a log without it (beta 0 measures none)."""
    if "kl" not in log or "completions/mean_length" not in log:
        return None
    return log["kl"] * log["completions/mean_length"]


@hydra.main(version_base="1.3", config_path="../conf", config_name="grpo")
def main(cfg: DictConfig) -> float:
    return run_stage(str(cfg.algorithm), cfg, grpo, inputs)


if __name__ == "__main__":
    refuse_keys_of_other_stages("grpo")
    main()
