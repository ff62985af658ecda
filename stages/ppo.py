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
from pathlib import Path

import hydra
import torch
from datasets import Dataset
from omegaconf import DictConfig
from transformers import TrainerCallback
from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME, TRAINER_STATE_NAME
from trl.experimental.ppo import PPOConfig
from trl.experimental.ppo import PPOTrainer

from pipeline.callbacks import standard_callbacks
from pipeline.checkpoint import load_trainer_weights, save_hf_directory, unwrapped
from pipeline.config import PPOStageConfig, refuse_keys_of_other_stages, register_schemas
from pipeline.data import load_prompt_data
from pipeline.handoff import check_data_coverage, check_reward_handoff
from pipeline.models import load_causal_lm, load_reward_model, lora_config
from pipeline.registry import Registry
from pipeline.run import StageRun, run_stage
from pipeline.trainer import trainer_arguments
from reward_model.scoring import RewardModel
from stages.alignment import (BudgetExceeded, Disagreement, GoldTracker, KLBudget, Kept, RewardStall, ensemble_note,
                              evaluate_against_start, load_scorer, reward_statistics, value_model)

register_schemas()


class PromptLoader:
    """TRL's PPO prompt loader with its position kept: the RNG states each pass over the prompts drew its order from
    (the torch generator, and the sampler's own where accelerate gave it one), and the batches taken since. A
    resumed run replays to that position from those states, then restores the save's RNG states (`resume`)."""

    def __init__(self, loader):
        self.loader = loader
        self.passes, self.start, self.taken = 0, None, 0
        self._resume = None

    def __len__(self) -> int:
        return len(self.loader)

    def state_dict(self) -> dict:
        return {"passes": self.passes, "start": self.start, "taken": self.taken}

    def resume(self, state: dict, restore_rng) -> None:
        """Replay to `state` when the loop asks for its next batch; then call restore_rng."""
        self._resume = (state, restore_rng)

    def __iter__(self):
        gen = getattr(self.loader, "synchronized_generator", None)
        resume, self._resume = self._resume, None
        if resume:
            state, restore_rng = resume
            self.passes = state["passes"] - 1
            self.loader.set_epoch(self.passes)
            torch.set_rng_state(state["start"]["torch"])
            if gen is not None:
                gen.set_state(state["start"]["generator"])
        self.start = {"torch": torch.get_rng_state(), "generator": gen.get_state() if gen is not None else None}
        self.passes, self.taken = self.passes + 1, 0
        batches = iter(self.loader)
        if resume:
            for _ in range(state["taken"]):
                next(batches)
                self.taken += 1
            restore_rng()
        for batch in batches:
            self.taken += 1
            yield batch


class ResumablePPOTrainer(PPOTrainer):
    """TRL's PPOTrainer, resumable. Its loop already writes Trainer checkpoints when the save strategy asks (the
    policy, optimizer, scheduler, RNG states and trainer state); TRL cannot resume from them. With each one this
    also saves the value model and the prompt loader's position (the guards' state goes in trainer_state.json, as
    the Trainer saves every ExportableState callback's), and `resume_from` restores all of it when the loop begins,
    which then runs only the updates left."""

    LOADER = "prompt_loader_{}.pt"

    def __init__(self, *args, resume_from: str | None = None, on_resume=lambda update: None, **kwargs):
        super().__init__(*args, **kwargs)
        self.dataloader = PromptLoader(self.dataloader)
        self.on_resume = on_resume
        if resume_from:
            self.callback_handler.callbacks.insert(0, _Restore(self, resume_from))  # before the progress bar

    def _save_checkpoint(self, model, trial):
        # written before the Trainer's files: its trainer_state.json, last, marks the checkpoint whole
        out = Path(self._get_output_dir(trial)) / f"checkpoint-{self.state.global_step}"
        out.mkdir(parents=True, exist_ok=True)
        value = self.accelerator.unwrap_model(self.model).value_model
        if self.accelerator.is_main_process:
            value.save_pretrained(out / "value_model")
        torch.save(self.dataloader.state_dict(), out / self.LOADER.format(self.accelerator.process_index))
        super()._save_checkpoint(model, trial)

    def save_stop(self) -> None:
        """A checkpoint at a guard's stop: a rerun resumes there, and trains no further."""
        if self.args.save_strategy != "no":
            self._save_checkpoint(self.model, None)

    def restore(self, ckpt: str) -> None:
        saved = type(self.state).load_from_json(str(Path(ckpt) / TRAINER_STATE_NAME))  # TRL's OnlineTrainerState
        for k in ("global_step", "episode", "epoch", "log_history", "stateful_callbacks"):
            setattr(self.state, k, getattr(saved, k))
        plain = self.accelerator.unwrap_model(self.model)
        load_trainer_weights(plain.policy, Path(ckpt))
        load_trainer_weights(plain.value_model, Path(ckpt) / "value_model")
        # as the Trainer's _load_optimizer_and_scheduler loads them (which needs attributes PPOTrainer lacks)
        self.optimizer.load_state_dict(torch.load(Path(ckpt) / OPTIMIZER_NAME, map_location=self.accelerator.device,
                                                  weights_only=True))
        self.lr_scheduler.load_state_dict(torch.load(Path(ckpt) / SCHEDULER_NAME, weights_only=True))
        guards = [cb for cb in self.callback_handler.callbacks if isinstance(cb, Kept)]
        for cb in guards:
            cb.restore(self.state)
        stopped = any(getattr(cb, "stopped", False) for cb in guards)
        # the loop runs args.num_total_batches updates from here: those left, none after a guard's stop
        self.args.num_total_batches = 0 if stopped else self.state.max_steps - saved.global_step
        loader = torch.load(Path(ckpt) / self.LOADER.format(self.accelerator.process_index), weights_only=True)
        self.dataloader.resume(loader, lambda: self._load_rng_state(ckpt))
        self.on_resume(saved.global_step)


class _Restore(TrainerCallback):
    """Restores a PPO checkpoint when the loop begins (after TRL's train() has reset the trainer state)."""

    def __init__(self, trainer: ResumablePPOTrainer, ckpt: str):
        self.trainer, self.ckpt = trainer, ckpt

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer.restore(self.ckpt)


def inputs(cfg: PPOStageConfig, registry: Registry) -> dict:
    return {"init_from": registry.resolve(cfg.init_from), "reward_model": registry.resolve(cfg.reward_model)}


def ppo_arguments(run: StageRun) -> PPOConfig:
    """TRL's PPOConfig from the ppo and trainer sections: one PPO update per trainer step, a Trainer checkpoint
    every ppo.save_every updates."""
    p, t = run.cfg.ppo, run.cfg.trainer
    rollouts = t.per_device_train_batch_size * t.gradient_accumulation_steps * run.state.num_processes
    return trainer_arguments(
        run, PPOConfig, save_every=p.save_every,
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

    # --- models: policy, reference, reward and value
    policy, tok = load_causal_lm(policy_ref.path, trust)
    reference, _ = load_causal_lm(policy_ref.path, trust)
    rm = RewardModel(*load_reward_model(reward_ref.path, trust))
    check_reward_handoff(tok, rm.tok, cfg.init_from, cfg.reward_model)

    p = cfg.ppo
    stats = reward_statistics(reward_ref.path, p.normalize_rewards, rm.members)
    rm.stats = stats  # the evaluation's disagreement on the scale the policy was trained on
    scorer, _ = load_scorer(reward_ref.path, trust, stats, p.reward_uncertainty, p.reward_uncertainty_coef)
    value = value_model(reward_ref.path, trust)  # the value model starts as the reward model

    # --- data
    train_rows, eval_rows = load_prompt_data(cfg.data, cfg.seed, run.cache_dir, cfg.eval.num_prompts)
    run.record_fingerprints(train_rows, tok)
    check_data_coverage(run, tok, [{"prompt": r["prompt"]} for r in train_rows], policy)
    tok.padding_side = "left"  # prompts end where the response begins
    encode = lambda rows: Dataset.from_list(
        [{"input_ids": tok(tok.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False),
                           add_special_tokens=False)["input_ids"]} for r in rows])
    train_ds, eval_ds = encode(train_rows), encode(eval_rows[:max(cfg.trainer.per_device_eval_batch_size, 1)])
    run.log(f"{len(train_rows)} training prompts, {len(eval_rows)} held-out prompts; reward statistics "
            f"mean {stats['score_mean']:.3f} std {stats['score_std']:.3f}" + ensemble_note(rm.members, p))

    # --- trainer
    args = ppo_arguments(run)
    tracker = GoldTracker(policy, tok, eval_rows[:p.gold_prompts] if cfg.data.kind == "demo" else [], p.gold_every,
                          cfg.eval, "objective/scores", kl_per_response)
    budget = KLBudget(p.kl_budget, kl_per_response)
    disagreement = Disagreement(scorer.score, p.disagreement_budget, p.disagreement_stop, run.warn)
    stall = RewardStall(p.stall_budget, p.stall_stop, run.warn, "objective/scores", kl_per_response)
    # an update is long: the first one's warm-up is all the step timer leaves out
    callbacks = [*standard_callbacks(run, timer_skip=1), tracker, budget, disagreement, stall]
    trainer = ResumablePPOTrainer(args=args, processing_class=tok, model=policy, ref_model=reference,
                                  reward_model=scorer, value_model=value, train_dataset=train_ds, eval_dataset=eval_ds,
                                  peft_config=lora_config(cfg.peft, "CAUSAL_LM"), callbacks=callbacks,
                                  resume_from=run.resume_from,
                                  on_resume=lambda n: run.log(f"Resuming {run.entry.id} from update {n} of "
                                                              f"{cfg.trainer.max_steps}"))

    # --- train and save
    try:
        trainer.train()
    except BudgetExceeded:
        trainer.save_stop()  # recorded below
    save_hf_directory(trainer, tok, run)

    # --- evaluate against the start
    metrics = {"ppo_steps": trainer.state.global_step, "episodes": trainer.state.episode}
    budget.record(run, metrics)
    disagreement.record(run, metrics)
    stall.record(run, metrics)
    run.record(**metrics)  # kept should the evaluation below fail
    if run.is_main:
        tuned = unwrapped(trainer.model.policy if hasattr(trainer.model, "policy") else trainer.policy_model, run)
        metrics.update(evaluate_against_start(run, tuned, reference, tok, rm, eval_rows, cfg.eval))
        history = [h for h in trainer.state.log_history if "objective/scores" in h]
        (Path(run.entry.path) / "ppo_history.json").write_text(json.dumps(
            {"log": history, "gold": tracker.history, "disagreement": disagreement.history}, indent=1))
    return metrics


def kl_per_response(log: dict) -> float | None:
    """A log's KL to the reference in nats per response: TRL's PPO logs it so (objective/kl)."""
    return log.get("objective/kl")


@hydra.main(version_base="1.3", config_path="../conf", config_name="ppo")
def main(cfg: DictConfig) -> float:
    return run_stage("ppo", cfg, ppo, inputs)


if __name__ == "__main__":
    refuse_keys_of_other_stages("ppo")
    main()
