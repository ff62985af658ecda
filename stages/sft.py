"""Supervised fine-tuning: a model from the registry (or a directory, or a hub id) on chat demonstrations,
with TRL's SFTTrainer, loss on the assistant's tokens only, optionally through LoRA.

    make sft                                                   # the demo: pretrain:latest on demo demonstrations
    make sft ARGS="experiment=ci"                              # micro sizes
    make sft ARGS="init_from=HuggingFaceTB/SmolLM2-135M data=local data.path=chats.jsonl peft=lora"
    make sft ARGS="-m trainer.learning_rate=1e-4,3e-4"         # a sweep: one entry per value, same parent

init_from -> demonstrations (TRL `messages` or `prompt`/`completion`) -> SFTTrainer -> held-out loss and
gold score (next to the starting model's) -> registry entry whose parent is init_from's entry.
"""
from __future__ import annotations

import math

import hydra
from datasets import Dataset
from omegaconf import DictConfig
from trl import SFTConfig, SFTTrainer
from trl.trainer.sft_trainer import FLASH_ATTENTION_VARIANTS

from pipeline import demo
from pipeline.callbacks import InitialEvalLoss, standard_callbacks
from pipeline.checkpoint import save_hf_directory, unwrapped
from pipeline.config import SFTStageConfig, refuse_keys_of_other_stages, register_schemas
from pipeline.data import demo_heldout_prompts, load_sft_data
from pipeline.handoff import check_data_coverage
from pipeline.models import count_parameters, load_causal_lm, lora_config
from pipeline.registry import Registry
from pipeline.run import StageRun, run_stage
from pipeline.trainer import trainer_arguments
from stages.alignment import evaluate_against_start

register_schemas()


def inputs(cfg: SFTStageConfig, registry: Registry) -> dict:
    return {"init_from": registry.resolve(cfg.init_from)}


def padding_free(batching: str, model) -> bool:
    """Whether to flatten batches: as configured, or under "auto" when the attention kernel skips the
    masked blocks of a flattened batch (flash-attention); SDPA and eager compute them and are slower."""
    if batching != "auto":
        return batching == "padding_free"
    return model.config._attn_implementation in FLASH_ATTENTION_VARIANTS


def build_trainer(run: StageRun, model, tok, train_rows: list[dict], eval_rows: list[dict]) -> SFTTrainer:
    cfg: SFTStageConfig = run.cfg
    conversational = "messages" in train_rows[0]
    plain_text = "text" in train_rows[0]
    flat = padding_free(cfg.batching, model)
    args = trainer_arguments(
        run, SFTConfig,
        # TRL does not truncate a padding-free batch; rows longer than max_length are dropped below instead.
        max_length=None if flat else cfg.data.max_length,
        padding_free=flat,
        # The loss covers only what the model should learn to say: the assistant turns ({% generation %}
        # in the chat template) or the completion; plain text has no turns, so every token counts.
        assistant_only_loss=conversational,
        completion_only_loss=not (conversational or plain_text),
        packing=False,
        dataset_num_proc=None,
        eval_on_start=not InitialEvalLoss.recorded(run),
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(train_rows),
                         eval_dataset=Dataset.from_list(eval_rows), processing_class=tok,
                         peft_config=lora_config(cfg.peft, "CAUSAL_LM"),
                         callbacks=[*standard_callbacks(run), InitialEvalLoss(run)])
    if flat:
        fits = lambda row: len(row["input_ids"]) <= cfg.data.max_length
        n = len(trainer.train_dataset)
        trainer.train_dataset = trainer.train_dataset.filter(fits)
        trainer.eval_dataset = trainer.eval_dataset.filter(fits)
        if len(trainer.train_dataset) < n:
            run.log(f"{n - len(trainer.train_dataset)} demonstrations longer than data.max_length="
                    f"{cfg.data.max_length} tokens are left out")
    run.log(f"batches: {'padding-free' if flat else 'padded'} (batching={cfg.batching}, "
            f"attention: {model.config._attn_implementation}); loss on "
            + ("the assistant turns" if conversational else "every token: plain-text rows have no turns to mask"
               if plain_text else "the completions"))
    return trainer


def sft(run: StageRun) -> dict:
    cfg: SFTStageConfig = run.cfg
    start = run.inputs["init_from"]

    # --- model
    model, tok = load_causal_lm(start.path, cfg.trust_remote_code)

    # --- data
    train_rows, eval_rows = load_sft_data(cfg.data, cfg.seed, run.cache_dir)
    run.record_fingerprints(train_rows, tok)
    run.log(f"{len(train_rows)} train / {len(eval_rows)} eval demonstrations; model "
            f"{count_parameters(model) / 1e6:.2f}M parameters; peft={cfg.peft.method}")
    check_data_coverage(run, tok, train_rows, model)

    # --- trainer
    trainer = build_trainer(run, model, tok, train_rows, eval_rows)

    # --- train and save
    result = trainer.train(resume_from_checkpoint=run.resume_from)
    eval_loss = trainer.evaluate()["eval_loss"]
    save_hf_directory(trainer, tok, run)

    # --- evaluate against the start
    metrics = {"initial_eval_loss": run.entry.metrics["initial_eval_loss"], "eval_loss": eval_loss,
               "perplexity": math.exp(min(eval_loss, 50.0)), "train_loss": result.training_loss,
               "train_runtime_s": result.metrics["train_runtime"], "global_step": result.global_step}
    run.record(**metrics)  # kept should the evaluation below fail
    # The gold judge scores the demo's held-out prompts (user data has no judge: only the loss is reported).
    if cfg.data.kind == "demo" and run.is_main:
        begun, _ = load_causal_lm(start.path, cfg.trust_remote_code)
        metrics.update(evaluate_against_start(run, unwrapped(trainer.model, run), begun, tok, None,
                                              demo_heldout_prompts(cfg.eval.num_prompts, cfg.seed), cfg.eval))
        # The demonstrations' own gold: what a model that imitates them exactly scores when sampled, flaws and all
        own = [demo.gold_score(r["messages"][0]["content"], r["messages"][-1]["content"]) for r in train_rows]
        metrics["demonstration_gold_score"] = sum(own) / len(own)
        run.log(f"the demonstrations themselves score {metrics['demonstration_gold_score']:.3f}")
    return metrics


@hydra.main(version_base="1.3", config_path="../conf", config_name="sft")
def main(cfg: DictConfig) -> float:
    return run_stage("sft", cfg, sft, inputs)


if __name__ == "__main__":
    refuse_keys_of_other_stages("sft")
    main()
