"""Reward-model training: a sequence-classification head on the SFT model, trained on preference pairs with TRL's
RewardTrainer (Bradley-Terry loss). With reward.ensemble_size=K, an ensemble in one entry, scored as one model (the
members' mean, and their disagreement): K separately trained reward models, each on its own share of the pairs
(reward.ensemble_kind=models, the default), or K score heads on one backbone (heads).

    make reward                                            # the demo: sft:latest on demo preference pairs
    make reward ARGS="experiment=ci"                       # micro sizes
    make reward ARGS="data=local data.path=pairs.jsonl"    # prompt/chosen/rejected, or chosen/rejected
    make reward ARGS="data=ultrafeedback"                  # a hub preference set (needs a network)
    make reward ARGS="reward.ensemble_size=4"              # an ensemble of 4 models, one entry
    make reward ARGS="reward.ensemble_size=4 reward.ensemble_kind=heads"   # 4 heads on one backbone
    make reward ARGS="reward.ensemble_size=2 reward.ensemble_init=[sft-A,sft-B]"  # members from their own backbones

init_from -> pairs -> RewardTrainer -> held-out accuracy and margin, score mean/std and each member's (stored with
the checkpoint for the online methods to normalize rewards), score-length correlation, an ensemble's member
accuracies and disagreement -> registry entry (parent: init_from).
"""
from __future__ import annotations

import json
import math
import random
import shutil
import statistics
from pathlib import Path

import hydra
import torch
from datasets import Dataset
from omegaconf import DictConfig
from torch import nn
from transformers import set_seed
from transformers.trainer_pt_utils import LengthGroupedSampler
from trl import RewardConfig, RewardTrainer

from pipeline.callbacks import standard_callbacks
from pipeline.checkpoint import LOG_HISTORY, last_trainer_checkpoint, save_hf_directory, unwrapped
from pipeline.config import RewardStageConfig, refuse_keys_of_other_stages, register_schemas
from pipeline.data import load_preference_data
from pipeline.handoff import check_data_coverage
from pipeline.errors import PipelineError
from pipeline.models import (ENSEMBLE_FILE, MemberStack, count_parameters, load_reward_model, load_tokenizer,
                             lora_config)
from pipeline.registry import Registry
from pipeline.run import StageRun, run_stage
from pipeline.trainer import trainer_arguments
from reward_model.scoring import STATS_FILE, RewardModel

register_schemas()


def inputs(cfg: RewardStageConfig, registry: Registry) -> dict:
    """The backbone (init_from), or each member's (reward.ensemble_init: member 0's is the init_from the stage
    loads its tokenizer from); all of them must read text the same way, as one tokenizer feeds the stack."""
    refs = cfg.reward.ensemble_init or [cfg.init_from]
    resolved = {"init_from": registry.resolve(refs[0])}
    resolved.update({f"member_{i}": registry.resolve(ref) for i, ref in enumerate(refs) if i > 0})
    if len(refs) > 1:
        vocab = load_tokenizer(resolved["init_from"].path, cfg.trust_remote_code).get_vocab()
        for i, ref in enumerate(refs[1:], 1):
            if load_tokenizer(resolved[f"member_{i}"].path, cfg.trust_remote_code).get_vocab() != vocab:
                raise PipelineError(f"reward.ensemble_init: member {i}'s backbone '{ref}' has a tokenizer other than "
                                    f"member 0's '{refs[0]}'; an ensemble scores every member on the same tokens, so "
                                    f"give backbones pretrained with one tokenizer (pretrain with "
                                    f"tokenizer.path=<member 0's checkpoint>)")
    return resolved


class PairTrainer(RewardTrainer):
    """TRL's RewardTrainer; with trainer.group_by_length it batches pairs by their longer side (the Trainer's own
    length grouping looks for an input_ids column, which preference pairs lack); with an ensemble (a score head of
    several outputs), each member's Bradley-Terry loss on its own bootstrap share of the batch."""

    def __init__(self, model, *args, members: int = 1, subsample: float = 1.0, seed: int = 0, **kwargs):
        # TRL refuses a head of several outputs; each of an ensemble's is a member's own score, and its loss is
        # the one below, so the check is passed with the config's count, set back after
        model.config.num_labels = 1
        try:
            super().__init__(model, *args, **kwargs)
        finally:
            model.config.num_labels = members
        self.members, self.subsample, self.seed = members, subsample, seed

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.members == 1 or not model.training:  # TRL's loss: the mean of the members' losses on every pair
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inputs["use_cache"] = False
        outputs = model(**inputs)
        chosen, rejected = torch.chunk(outputs.logits, chunks=2)  # (pairs, members) each
        losses = -nn.functional.logsigmoid(chosen - rejected)
        # which pairs each member trains on: drawn from the step, so a resumed run draws the same
        draw = torch.Generator().manual_seed(self.seed * 1_000_003 + self.state.global_step)
        weights = (torch.rand(losses.shape, generator=draw) < self.subsample).to(losses.device, losses.dtype)
        loss = (losses * weights).sum() / weights.sum().clamp(min=1.0)
        if self.args.center_rewards_coefficient is not None:  # TRL's centring term, for each member's scores
            loss = loss + self.args.center_rewards_coefficient * torch.mean((chosen + rejected) ** 2)
        with torch.no_grad():
            margin = (chosen - rejected).mean(1)  # the ensemble's: its mean score
            self._metrics["train"]["accuracy"].append(self.accelerator.gather_for_metrics(
                (margin > 0).float().mean()).mean().item())
            self._metrics["train"]["margin"].append(self.accelerator.gather_for_metrics(margin.mean()).mean().item())
        return (loss, outputs) if return_outputs else loss

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


def evaluate_pairs(rm: RewardModel, pairs: list[dict], classes: list[str | None] | None = None) -> tuple[dict, dict]:
    """(metrics, statistics) on held-out pairs. Metrics: accuracy and margin of the score (an ensemble's: its
    members' mean), and per class of rejected response where the pairs name one (eval_accuracy/<class>); mean/std of
    the scores of their responses; score-length correlation; for an ensemble, each member's accuracy and the
    members' disagreement (eval_disagreement: per pair, the std over members of their normalised scores of each
    response, averaged over the two), overall and per class. Statistics: the score's mean and std, and each
    member's (what the online methods normalise rewards with)."""
    chosen_m, rejected_m = rm.pair_member_scores(pairs)  # (pairs, members)
    members = torch.cat([chosen_m, rejected_m])
    chosen, rejected = chosen_m.mean(1).tolist(), rejected_m.mean(1).tolist()
    scores, responses = chosen + rejected, [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
    stats = {"score_mean": statistics.fmean(scores), "score_std": statistics.pstdev(scores),
             "member_mean": members.mean(0).tolist(), "member_std": members.std(0, unbiased=False).tolist()}
    rm.stats = stats
    margins = [c - r for c, r in zip(chosen, rejected)]
    accuracy, margin = sum(m > 0 for m in margins) / len(margins), statistics.fmean(margins)
    # per pair: the members' std on each of its two responses, averaged, as the online methods measure it on their
    # rollouts (the std of the margins would grow with the margins, and read lowest where the members are blind)
    spread = lambda scores: rm.normalised(scores).std(1, unbiased=False)
    disagreement = ((spread(chosen_m) + spread(rejected_m)) / 2).tolist()
    by_class = {}
    for c, m, d in zip(classes or [], margins, disagreement):
        if c is not None:
            by_class.setdefault(c, []).append((m > 0, d))
    lengths = [len(r if isinstance(r, str) else r[-1]["content"]) for r in responses]
    metrics = {"eval_accuracy": accuracy, "eval_margin": margin, "score_mean": stats["score_mean"],
               "score_std": stats["score_std"], "length_correlation": pearson(scores, lengths),
               **{f"eval_accuracy/{c}": statistics.fmean(r for r, _ in v) for c, v in sorted(by_class.items())},
               **{f"eval_pairs/{c}": len(v) for c, v in sorted(by_class.items())}}
    if rm.members > 1:
        metrics.update(ensemble_size=rm.members, eval_disagreement=statistics.fmean(disagreement),
                       **{f"eval_accuracy/member_{i}": (chosen_m[:, i] > rejected_m[:, i]).float().mean().item()
                          for i in range(rm.members)},
                       **{f"eval_disagreement/{c}": statistics.fmean(d for _, d in v)
                          for c, v in sorted(by_class.items())})
    return metrics, stats


def wilson(right: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of a share of right answers out of n > 0."""
    share, scale = right / n, 1 + z * z / n
    centre = (share + z * z / (2 * n)) / scale
    half = z * math.sqrt(share * (1 - share) / n + z * z / (4 * n * n)) / scale
    return centre - half, centre + half


def own_data_accuracy(members: list[RewardModel], held: list[list[dict]]) -> tuple[dict, list[str]]:
    """(metrics, doubts): each member's accuracy on the held-out pairs of its own data (reward.ensemble_data[i]),
    overall and per class of rejected response where the pairs name one (eval_accuracy/member_<i>/own[/<class>]);
    a doubt for each whose 95% interval reaches down to chance. A member's own data is what sets it apart from the
    others: one that did not learn from it adds nothing the others do not see, and its ensemble's disagreement
    cannot flag what it was meant to."""
    metrics, doubts = {}, []
    for i, (rm, pairs) in enumerate(zip(members, held)):
        classes = [p.get("flaw") for p in pairs]
        own, _ = evaluate_pairs(rm, [{k: v for k, v in p.items() if k != "flaw"} for p in pairs], classes)
        for c in ["", *sorted(set(filter(None, classes)))]:
            key, n = f"eval_accuracy/member_{i}/own" + (f"/{c}" if c else ""), own.get(f"eval_pairs/{c}", len(pairs))
            metrics[key] = own[f"eval_accuracy/{c}" if c else "eval_accuracy"]
            low, high = wilson(round(metrics[key] * n), n)
            if low <= 0.5:
                doubts.append(f"member {i} scores {metrics[key]:.3f} [{low:.2f}, {high:.2f}] on the {n} held-out "
                              f"{c + ' ' if c else ''}pairs of its own data (reward.ensemble_data[{i}]): no better "
                              f"than chance")
    return metrics, doubts


def pair_trainer(run: StageRun, model, tok, train_pairs: list[dict], eval_pairs: list[dict], members: int = 1,
                 seed: int | None = None, trainer_dir: Path | None = None, max_steps: int | None = None):
    """The stage's PairTrainer on these pairs; an ensemble's member has its own seed, trainer directory and steps."""
    cfg: RewardStageConfig = run.cfg
    args = trainer_arguments(run, RewardConfig, max_length=cfg.data.max_length, disable_dropout=True,
                             dataset_num_proc=None, center_rewards_coefficient=cfg.reward.center_rewards_coefficient)
    if seed is None:
        seed = cfg.seed
    else:  # an ensemble's member: its own data order, directory and steps
        args.seed, args.output_dir, args.max_steps = seed, str(trainer_dir), max_steps
    trainer = PairTrainer(members=members, subsample=cfg.reward.ensemble_subsample, seed=seed,
                          model=model, args=args, train_dataset=Dataset.from_list(train_pairs),
                          eval_dataset=Dataset.from_list(eval_pairs), processing_class=tok,
                          peft_config=lora_config(cfg.peft, "SEQ_CLS"), callbacks=standard_callbacks(run))
    dropped = len(train_pairs) - len(trainer.train_dataset)  # TRL leaves out pairs longer than max_length
    run.record(pairs_over_max_length=dropped)
    if dropped:
        run.log(f"{'WARNING: ' if dropped > 0.01 * len(train_pairs) else ''}{dropped} of {len(train_pairs)} pairs are "
                f"longer than data.max_length={cfg.data.max_length} tokens and are left out of training; raise "
                f"data.max_length to keep them")
    return trainer


def train_members(run: StageRun, model, tok, member_pairs: list[list[dict]],
                  eval_pairs: list[dict]) -> tuple[MemberStack, dict]:
    """An ensemble of separately trained reward models (reward.ensemble_kind=models): member i has seed + i (its
    head's initialisation and its data order), its own backbone where reward.ensemble_init names one (else
    init_from's) and its own random share of the pairs (of its own pairs, member_pairs[i], where
    reward.ensemble_data gives them), trained for as many passes over it as one model makes over all of them; saved
    in members/<i>/, listed in ensemble.json, scored as one MemberStack. A member already saved is kept when the
    stage is run again; one cut short resumes from its last trainer checkpoint."""
    cfg: RewardStageConfig = run.cfg
    k, share = cfg.reward.ensemble_size, cfg.reward.ensemble_subsample
    steps = max(1, math.ceil(cfg.trainer.max_steps * share))
    root = Path(run.entry.path)
    trained, results = [], []
    for i in range(k):
        folder = root / "members" / str(i)
        if (folder / "model.safetensors").exists():
            run.log(f"member {i}: kept from the earlier run ({folder})")
            trained.append(load_reward_model(str(folder), cfg.trust_remote_code, 1)[0])
            continue
        seed = cfg.seed + i
        if i > 0:  # member 0 is the model loaded above; each other one gets its own head, drawn from its seed
            set_seed(seed)
            backbone = run.inputs.get(f"member_{i}", run.inputs["init_from"]).path
            model, _ = load_reward_model(backbone, cfg.trust_remote_code, 1)
        own = member_pairs[i]
        pairs = random.Random(seed).sample(own, max(1, round(len(own) * share)))
        trainer = pair_trainer(run, model, tok, pairs, eval_pairs, seed=seed, max_steps=steps,
                               trainer_dir=run.trainer_dir / f"member_{i}")
        run.log(f"member {i}: seed {seed}, {len(pairs)} pairs, {steps} steps"
                + (f", from {cfg.reward.ensemble_init[i]}" if cfg.reward.ensemble_init else "")
                + (f", data {dict(cfg.reward.ensemble_data[i])}" if cfg.reward.ensemble_data else ""))
        result = trainer.train(resume_from_checkpoint=last_trainer_checkpoint(run.trainer_dir / f"member_{i}"))
        results.append({"train_loss": result.training_loss, "train_runtime_s": result.metrics["train_runtime"],
                        "global_step": result.global_step})  # each member's accuracy is measured with the rest
        save_hf_directory(trainer, tok, run, folder)
        trained.append(unwrapped(trainer.model, run))
    if run.is_main:
        tok.save_pretrained(root)
        (root / ENSEMBLE_FILE).write_text(json.dumps({"kind": "models", "members": [f"members/{i}" for i in range(k)]}))
        shutil.copy(root / "members" / "0" / LOG_HISTORY, root / LOG_HISTORY)  # the report's curve: member 0's
    run.state.wait_for_everyone()
    run.saved = True
    metrics = {"train_runtime_s": sum(r["train_runtime_s"] for r in results),
               "global_step": sum(r["global_step"] for r in results)}
    if results:  # the members trained in this run
        metrics["train_loss"] = statistics.fmean(r["train_loss"] for r in results)
    return MemberStack(trained), metrics


def reward(run: StageRun) -> dict:
    cfg: RewardStageConfig = run.cfg
    k = cfg.reward.ensemble_size
    separate = cfg.reward.ensemble_kind == "models" and k > 1

    # --- model
    model, tok = load_reward_model(run.inputs["init_from"].path, cfg.trust_remote_code,
                                   1 if separate else k)  # a new score head

    # --- data
    train_pairs, eval_pairs = load_preference_data(cfg.data, cfg.seed, run.cache_dir)
    eval_classes = [p.pop("flaw", None) for p in eval_pairs]  # the demo's: for the per-class accuracies only
    # each member's own pairs (reward.ensemble_data), split as the stage's are; every member is evaluated on the
    # stage's held-out pairs, and each on its own
    member_data = [load_preference_data(cfg.member_data(i), cfg.seed + i, run.cache_dir)
                   for i in range(k)] if cfg.reward.ensemble_data else []
    member_pairs = [train for train, _ in member_data] or [train_pairs] * k
    run.record_fingerprints([p for pairs in member_pairs for p in pairs] if cfg.reward.ensemble_data else train_pairs,
                            tok)
    run.log(f"{len(train_pairs)} train / {len(eval_pairs)} held-out pairs; model "
            f"{count_parameters(model) / 1e6:.2f}M parameters; peft={cfg.peft.method}"
            + (f"; an ensemble of {k} {cfg.reward.ensemble_kind}" if k > 1 else ""))
    check_data_coverage(run, tok, [{"prompt": p.get("prompt"), "chosen": p["chosen"]} for p in train_pairs], model)
    if run.is_main and "initial_eval_accuracy" not in run.entry.metrics:
        run.record(initial_eval_accuracy=RewardModel(model, tok).pair_accuracy(eval_pairs)[0])

    # --- train and save
    if separate:
        scorer, metrics = train_members(run, model, tok, member_pairs, eval_pairs)
    else:
        trainer = pair_trainer(run, model, tok, train_pairs, eval_pairs, members=k)
        result = trainer.train(resume_from_checkpoint=run.resume_from)
        eval_loss = trainer.evaluate()["eval_loss"]
        save_hf_directory(trainer, tok, run)
        scorer = unwrapped(trainer.model, run)
        metrics = {"eval_loss": eval_loss, "train_loss": result.training_loss,
                   "train_runtime_s": result.metrics["train_runtime"], "global_step": result.global_step}
    run.record(**metrics)  # kept should the evaluation below fail

    # --- evaluate the held-out pairs
    if run.is_main:
        held_out, stats = evaluate_pairs(RewardModel(scorer, tok), eval_pairs, eval_classes)
        metrics.update(held_out, initial_eval_accuracy=run.entry.metrics["initial_eval_accuracy"])
        (Path(run.entry.path) / STATS_FILE).write_text(json.dumps(stats, indent=2))
        run.log(f"held-out accuracy {metrics['initial_eval_accuracy']:.3f} -> {metrics['eval_accuracy']:.3f}, "
                f"margin {metrics['eval_margin']:.3f}, score {metrics['score_mean']:.3f} ± {metrics['score_std']:.3f}")
        if k > 1:
            run.log(f"ensemble of {k}: member accuracies " + ", ".join(
                f"{metrics[f'eval_accuracy/member_{i}']:.3f}" for i in range(k))
                + f"; disagreement {metrics['eval_disagreement']:.3f} (std of the members' normalised scores)")
        per_class = {k.split("/", 1)[1]: v for k, v in metrics.items()
                     if k.startswith("eval_accuracy/") and not k.startswith("eval_accuracy/member_")}
        if per_class:
            run.log("held-out accuracy by flaw class of the rejected response: " + ", ".join(
                f"{c} {v:.3f} ({metrics[f'eval_pairs/{c}']}"
                + (f", disagreement {metrics[f'eval_disagreement/{c}']:.3f})" if k > 1 else ")")
                for c, v in per_class.items()))
        if member_data:
            own, doubts = own_data_accuracy([RewardModel(m, tok) for m in scorer.members],  # each alone
                                            [held for _, held in member_data])
            metrics.update(own)
            if doubts:
                run.warn("; ".join(doubts) + ". Such a member has not learned what its data sets apart, and the "
                         "ensemble's disagreement is blind there too: train longer (trainer.max_steps) or give its "
                         "data more of those pairs")
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
