"""Direct preference optimisation: the SFT policy tuned on preference pairs with TRL's DPOTrainer, offline (no
sampling, no reward model), its frozen start as the reference.

    make dpo                                             # the demo: sft:latest on the demo's preference pairs
    make dpo ARGS="experiment=ci"                        # micro sizes
    make dpo ARGS="data=local data.path=pairs.jsonl dpo.beta=0.2"
    make dpo ARGS="dpo.loss_type=[ipo] peft=lora"

init_from (policy and reference) -> pairs (the reward stage's loaders and formats) -> DPOTrainer -> implicit-
reward accuracy on held-out pairs -> held-out prompts sampled for the DPO policy and its SFT start (the alignment
core's evaluation, as PPO's) -> registry entry (parent: init_from).
"""
from __future__ import annotations

import hydra
from datasets import Dataset
from omegaconf import DictConfig
from trl import DPOConfig, DPOTrainer

from pipeline.callbacks import standard_callbacks
from pipeline.checkpoint import save_hf_directory, unwrapped
from pipeline.config import DPOStageConfig, refuse_keys_of_other_stages, register_schemas
from pipeline.data import HELDOUT_FLOOR, demo_heldout_prompts, load_preference_data
from pipeline.handoff import check_data_coverage
from pipeline.models import load_causal_lm, lora_config
from pipeline.registry import Registry
from pipeline.run import StageRun, run_stage
from pipeline.trainer import trainer_arguments
from stages.alignment import evaluate_against_start

register_schemas()


def inputs(cfg: DPOStageConfig, registry: Registry) -> dict:
    return {"init_from": registry.resolve(cfg.init_from)}


def heldout_prompts(cfg: DPOStageConfig, eval_pairs: list[dict]) -> list[dict]:
    """The prompts the policy and its start answer after training: the demo's held-out prompts (those PPO and
    GRPO are evaluated on), or those of the held-out pairs."""
    if cfg.data.kind == "demo":
        return demo_heldout_prompts(cfg.eval.num_prompts, cfg.seed)
    as_chat = lambda p: [{"role": "user", "content": p}] if isinstance(p, str) else p
    return [{"prompt": as_chat(p["prompt"])} for p in eval_pairs if p.get("prompt")][:cfg.eval.num_prompts]


def dpo(run: StageRun) -> dict:
    cfg: DPOStageConfig = run.cfg
    start = run.inputs["init_from"]

    # --- models: policy and reference
    policy, tok = load_causal_lm(start.path, cfg.trust_remote_code)
    reference, _ = load_causal_lm(start.path, cfg.trust_remote_code)

    # --- data
    train_pairs, eval_pairs = load_preference_data(cfg.data, cfg.seed, run.cache_dir, HELDOUT_FLOOR)
    for p in eval_pairs:
        p.pop("flaw", None)  # the demo's class of the rejected response: not a column TRL knows
    run.record_fingerprints(train_pairs, tok)
    run.log(f"{len(train_pairs)} train / {len(eval_pairs)} held-out pairs; beta {cfg.dpo.beta}, loss "
            f"{list(cfg.dpo.loss_type)}; peft={cfg.peft.method}")
    check_data_coverage(run, tok, [{"prompt": p.get("prompt"), "chosen": p["chosen"]} for p in train_pairs], policy)

    # --- trainer
    d = cfg.dpo
    args = trainer_arguments(run, DPOConfig, beta=d.beta, loss_type=list(d.loss_type),
                             loss_weights=list(d.loss_weights) if d.loss_weights else None,
                             label_smoothing=d.label_smoothing, max_length=cfg.data.max_length, disable_dropout=True,
                             dataset_num_proc=None)
    peft = lora_config(cfg.peft, "CAUSAL_LM")
    trainer = DPOTrainer(model=policy, ref_model=None if peft else reference, args=args,
                         train_dataset=Dataset.from_list(train_pairs), eval_dataset=Dataset.from_list(eval_pairs),
                         processing_class=tok, peft_config=peft, callbacks=standard_callbacks(run))

    # --- train and save
    result = trainer.train(resume_from_checkpoint=run.resume_from)
    held = trainer.evaluate()  # the implicit reward, beta x log(policy / reference), on held-out pairs
    save_hf_directory(trainer, tok, run)

    # --- evaluate against the start
    metrics = {"train_loss": result.training_loss, "global_step": result.global_step,
               "train_runtime_s": result.metrics["train_runtime"], "eval_loss": held["eval_loss"],
               "implicit_reward_accuracy": held["eval_rewards/accuracies"],
               "implicit_reward_margin": held["eval_rewards/margins"]}
    run.record(**metrics)  # kept should the evaluation below fail
    run.log(f"held-out pairs: implicit-reward accuracy {metrics['implicit_reward_accuracy']:.3f}, margin "
            f"{metrics['implicit_reward_margin']:.3f}")
    if run.is_main:
        metrics.update(evaluate_against_start(run, unwrapped(trainer.model, run), reference, tok, None,
                                              heldout_prompts(cfg, eval_pairs), cfg.eval))
    return metrics


@hydra.main(version_base="1.3", config_path="../conf", config_name="dpo")
def main(cfg: DictConfig) -> float:
    return run_stage("dpo", cfg, dpo, inputs)


if __name__ == "__main__":
    refuse_keys_of_other_stages("dpo")
    main()
