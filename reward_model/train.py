"""Reward-model training: a sequence-classification head with one output on the SFT model, trained on
preference pairs with TRL's RewardTrainer (Bradley-Terry loss).

    make reward                                            # the demo: sft:latest on demo preference pairs
    make reward ARGS="experiment=ci"                       # micro sizes
    make reward ARGS="data=local data.path=pairs.jsonl"    # prompt/chosen/rejected, or chosen/rejected
    make reward ARGS="data=ultrafeedback"                  # a hub preference set (needs a network)

init_from -> pairs -> RewardTrainer -> held-out accuracy and margin, score mean/std (stored with the
checkpoint for PPO to normalize rewards), score-length correlation -> registry entry (parent: init_from).
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

import hydra
from datasets import Dataset
from omegaconf import DictConfig
from transformers.trainer_pt_utils import LengthGroupedSampler
from trl import RewardConfig, RewardTrainer

from pipeline.callbacks import standard_callbacks
from pipeline.checkpoint import save_hf_directory, unwrapped
from pipeline.config import RewardStageConfig, refuse_keys_of_other_stages, register_schemas
from pipeline.data import load_preference_data
from pipeline.handoff import check_data_coverage
from pipeline.models import count_parameters, load_reward_model, lora_config
from pipeline.registry import Registry
from pipeline.run import StageRun, run_stage
from pipeline.trainer import trainer_arguments
from reward_model.scoring import STATS_FILE, RewardModel

register_schemas()


def inputs(cfg: RewardStageConfig, registry: Registry) -> dict:
    return {"init_from": registry.resolve(cfg.init_from)}


class PairTrainer(RewardTrainer):
    """TRL's RewardTrainer; with trainer.group_by_length it batches pairs by their longer side.

    (The Trainer's own length grouping looks for an input_ids column, which preference pairs lack.)
    """

    def _get_train_sampler(self, train_dataset=None):
        dataset = self.train_dataset if train_dataset is None else train_dataset
        if self.args.train_sampling_strategy != "group_by_length":
            return super()._get_train_sampler(train_dataset)
        lengths = [max(len(c), len(r)) for c, r in zip(dataset["chosen_ids"], dataset["rejected_ids"])]
        return LengthGroupedSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                    lengths=lengths)


def pearson(xs: list[float], ys: list[float]) -> float:
    if len(xs) < 2 or statistics.pstdev(xs) == 0 or statistics.pstdev(ys) == 0:
        return 0.0
    return statistics.correlation(xs, ys)


def evaluate_pairs(rm: RewardModel, pairs: list[dict], classes: list[str | None] | None = None) -> dict:
    """Accuracy and margin on held-out pairs, and the accuracy per class of rejected response where the pairs
    name one (eval_accuracy/<class>); mean/std of scores of their responses; score-length correlation."""
    chosen, rejected = rm.pair_scores(pairs)
    scores, responses = chosen + rejected, [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
    margins = [c - r for c, r in zip(chosen, rejected)]
    accuracy, margin = sum(m > 0 for m in margins) / len(margins), statistics.fmean(margins)
    per_class = {}
    for c, m in zip(classes or [], margins):
        if c is not None:
            per_class.setdefault(c, []).append(m > 0)
    lengths = [len(r if isinstance(r, str) else r[-1]["content"]) for r in responses]
    return {"eval_accuracy": accuracy, "eval_margin": margin, "score_mean": statistics.fmean(scores),
            "score_std": statistics.pstdev(scores), "length_correlation": pearson(scores, lengths),
            **{f"eval_accuracy/{c}": statistics.fmean(v) for c, v in sorted(per_class.items())},
            **{f"eval_pairs/{c}": len(v) for c, v in sorted(per_class.items())}}


def reward(run: StageRun) -> dict:
    cfg: RewardStageConfig = run.cfg

    # --- model
    model, tok = load_reward_model(run.inputs["init_from"].path, cfg.trust_remote_code)  # a new score head

    # --- data
    train_pairs, eval_pairs = load_preference_data(cfg.data, cfg.seed, run.cache_dir)
    eval_classes = [p.pop("flaw", None) for p in eval_pairs]  # the demo's: for the per-class accuracies only
    run.record_fingerprints(train_pairs, tok)
    run.log(f"{len(train_pairs)} train / {len(eval_pairs)} held-out pairs; model "
            f"{count_parameters(model) / 1e6:.2f}M parameters; peft={cfg.peft.method}")
    check_data_coverage(run, tok, [{"prompt": p.get("prompt"), "chosen": p["chosen"]} for p in train_pairs], model)
    if run.is_main and "initial_eval_accuracy" not in run.entry.metrics:
        run.record(initial_eval_accuracy=RewardModel(model, tok).pair_accuracy(eval_pairs)[0])

    # --- trainer
    args = trainer_arguments(run, RewardConfig, max_length=cfg.data.max_length, disable_dropout=True,
                             dataset_num_proc=None)
    trainer = PairTrainer(model=model, args=args, train_dataset=Dataset.from_list(train_pairs),
                          eval_dataset=Dataset.from_list(eval_pairs), processing_class=tok,
                          peft_config=lora_config(cfg.peft, "SEQ_CLS"), callbacks=standard_callbacks(run))
    dropped = len(train_pairs) - len(trainer.train_dataset)  # TRL leaves out pairs longer than max_length
    run.record(pairs_over_max_length=dropped)
    if dropped:
        run.log(f"{'WARNING: ' if dropped > 0.01 * len(train_pairs) else ''}{dropped} of {len(train_pairs)} pairs are "
                f"longer than data.max_length={cfg.data.max_length} tokens and are left out of training; raise "
                f"data.max_length to keep them")

    # --- train and save
    result = trainer.train(resume_from_checkpoint=run.resume_from)
    eval_loss = trainer.evaluate()["eval_loss"]
    save_hf_directory(trainer, tok, run)

    # --- evaluate the held-out pairs
    metrics = {"eval_loss": eval_loss, "train_loss": result.training_loss,
               "train_runtime_s": result.metrics["train_runtime"], "global_step": result.global_step}
    run.record(**metrics)  # kept should the evaluation below fail
    if run.is_main:
        metrics.update(evaluate_pairs(RewardModel(unwrapped(trainer.model, run), tok), eval_pairs, eval_classes),
                       initial_eval_accuracy=run.entry.metrics["initial_eval_accuracy"])
        stats = {k: metrics[k] for k in ("score_mean", "score_std")}
        (Path(run.entry.path) / STATS_FILE).write_text(json.dumps(stats, indent=2))
        run.log(f"held-out accuracy {metrics['initial_eval_accuracy']:.3f} -> {metrics['eval_accuracy']:.3f}, "
                f"margin {metrics['eval_margin']:.3f}, score {metrics['score_mean']:.3f} ± {metrics['score_std']:.3f}")
        per_class = {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("eval_accuracy/")}
        if per_class:
            run.log("held-out accuracy by flaw class of the rejected response: "
                    + ", ".join(f"{c} {v:.3f} ({metrics[f'eval_pairs/{c}']})" for c, v in per_class.items()))
        if abs(metrics["length_correlation"]) > cfg.length_correlation_warning:
            run.warn(f"the score correlates with response length (r = {metrics['length_correlation']:.2f}): "
                    f"the reward model may just like {'long' if metrics['length_correlation'] > 0 else 'short'} "
                    f"answers, and PPO will exploit it")
    return metrics


@hydra.main(version_base="1.3", config_path="../conf", config_name="reward")
def main(cfg: DictConfig) -> float:
    return run_stage("reward", cfg, reward, inputs)


if __name__ == "__main__":
    refuse_keys_of_other_stages("reward")
    main()
