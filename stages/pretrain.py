"""Pretraining: a causal language model on a text corpus, packed into fixed blocks, with the Trainer.

    make pretrain                                             # the demo: a Llama of a few million parameters on stories
    make pretrain ARGS="experiment=ci"                        # micro sizes
    make pretrain ARGS="data=local data.path=my_corpus.jsonl" # your own text (.txt / .jsonl / .parquet)
    make pretrain NPROC=2 ARGS="experiment=ci"                # two processes (DDP)
    make pretrain ARGS="seed=1 tokenizer.path=pretrain:latest" # another seed, reading text as the last run did
    accelerate launch -m stages.pretrain trainer.max_steps=500

corpus -> tokenizer -> packed blocks -> Trainer -> held-out loss before and after -> registry entry.
"""
from __future__ import annotations

import math
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig
from transformers import AutoTokenizer, Trainer, default_data_collator

from pipeline.callbacks import InitialEvalLoss, standard_callbacks
from pipeline.checkpoint import save_hf_directory
from pipeline.config import PretrainStageConfig, refuse_keys_of_other_stages, register_schemas
from pipeline.data import extra_tokenizer_text, load_corpus, non_padding_share, pack_into_blocks
from pipeline.evaluation import copy_rate
from pipeline.models import build_llama, count_parameters, load_causal_lm, load_tokenizer
from pipeline.optim import trainer_optimizer
from pipeline.registry import Registry
from pipeline.run import StageRun, run_stage
from pipeline.tokenizer import coverage, train_bpe
from pipeline.trainer import trainer_arguments

register_schemas()


def inputs(cfg: PretrainStageConfig, registry: Registry) -> dict:
    return {"tokenizer": registry.resolve(cfg.tokenizer.path)} if cfg.tokenizer.path else {}


def prepare_tokenizer(run: StageRun, train_docs: list[str]):
    """The model's own tokenizer, the one tokenizer.path names, or a BPE trained by the main process (on a sample of the corpus and the later
    stages' text, tokenizer.extra_text) and shared through disk."""
    cfg: PretrainStageConfig = run.cfg
    out = Path(run.entry.path)
    if run.resume_from and (out / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(out)  # the tokenizer the checkpoint was trained with
    if cfg.model.name_or_path:
        return load_tokenizer(cfg.model.name_or_path, cfg.model.trust_remote_code)
    if "tokenizer" in run.inputs:
        return load_tokenizer(run.inputs["tokenizer"].path)
    t = cfg.tokenizer
    sources = t.extra_text if t.extra_text is not None else ["demo"] if cfg.data.kind == "demo" else []
    with run.state.main_process_first():
        if run.is_main:
            docs = train_docs[:t.train_documents]
            extra = extra_tokenizer_text(sources, cfg.seed, run.cache_dir, t.extra_documents)
            trained_on = ", ".join([f"{len(docs)} corpus documents"]
                                   + [f"{len(v)} texts of {k}" for k, v in extra.items()])
            run.log(f"Training a byte-level BPE (vocab {t.vocab_size}) on {trained_on}")
            tok = train_bpe(docs + [x for v in extra.values() for x in v], t.vocab_size, cfg.data.block_size)
            tok.save_pretrained(out)
            run.record(tokenizer_trained_on=trained_on, tokenizer_vocab_size=len(tok))
            if len(tok) < 0.9 * t.vocab_size:
                run.warn(f"the BPE stopped at {len(tok)} of the {t.vocab_size} tokens asked for: its training "
                        f"text holds too few distinct words to fill the vocabulary. Lower tokenizer.vocab_size to "
                        f"about {len(tok)}, or add the text your model will be fine-tuned on (tokenizer.extra_text)")
    return AutoTokenizer.from_pretrained(out)


def pretrain(run: StageRun) -> dict:
    cfg: PretrainStageConfig = run.cfg

    # --- data and tokenizer
    train_docs, eval_docs = load_corpus(cfg.data, cfg.seed, run.cache_dir)
    tok = prepare_tokenizer(run, train_docs)
    run.record_fingerprints(train_docs, tok)
    train_blocks = pack_into_blocks(train_docs, tok, cfg.data.block_size, "train corpus")
    eval_blocks = pack_into_blocks(eval_docs, tok, cfg.data.block_size, "eval corpus")
    eval_blocks = eval_blocks.select(range(min(len(eval_blocks), cfg.data.max_eval_blocks)))
    packing = non_padding_share(train_blocks, tok.pad_token_id)
    # what later stages' handoff checks compare their data with
    corpus_tokens_per_word = coverage(tok, train_docs[:2000])["tokens_per_word"]
    run.log(f"{len(train_docs)} train / {len(eval_docs)} eval documents -> {len(train_blocks)} train / "
            f"{len(eval_blocks)} eval blocks of {cfg.data.block_size} tokens; non-padding share {packing:.4f}")

    # --- model
    if cfg.model.name_or_path:
        model, _ = load_causal_lm(cfg.model.name_or_path, cfg.model.trust_remote_code)  # matched to the same tokenizer
    else:
        model = build_llama(cfg.model, tok, cfg.data.block_size)
    run.log(f"Model: {count_parameters(model) / 1e6:.2f}M parameters, vocabulary {len(tok)}")

    # --- trainer
    args = trainer_arguments(run, eval_on_start=not InitialEvalLoss.recorded(run))
    # blocks as tensors: the collator stacks them, where from lists it builds each batch's tensors element by
    # element (a few ms a step, the largest cost the stage adds to a bare loop's step: make bench's gap table)
    trainer = Trainer(model=model, args=args, train_dataset=train_blocks.with_format("torch"),
                      eval_dataset=eval_blocks.with_format("torch"),
                      data_collator=default_data_collator, processing_class=tok,
                      callbacks=[*standard_callbacks(run), InitialEvalLoss(run)],
                      optimizer_cls_and_kwargs=trainer_optimizer(cfg.optimizer, args, run.state.distributed_type))

    # --- train and save
    result = trainer.train(resume_from_checkpoint=run.resume_from)
    eval_loss = trainer.evaluate()["eval_loss"]
    run.log(f"Eval loss after training: {eval_loss:.4f} (perplexity {math.exp(eval_loss):.2f})")

    save_hf_directory(trainer, tok, run)

    # --- evaluate: held-out loss (above), speed, and on the demo the copying the later stages need
    steps_run = result.global_step - (int(run.resume_from.rsplit("-", 1)[1]) if run.resume_from else 0)
    t = cfg.trainer
    tokens = steps_run * t.per_device_train_batch_size * t.gradient_accumulation_steps \
        * run.state.num_processes * cfg.data.block_size
    metrics = {
        "initial_eval_loss": run.entry.metrics["initial_eval_loss"],
        "eval_loss": eval_loss,
        "perplexity": math.exp(min(eval_loss, 50.0)),
        "train_loss": result.training_loss,
        "packing_efficiency": packing,
        "corpus_tokens_per_word": corpus_tokens_per_word,
        "context_length": cfg.data.block_size,
        "train_tokens_per_s": tokens / max(result.metrics["train_runtime"], 1e-9),
        # past the first steps: what `make bench` compares with a bare PyTorch loop (run_stage records the seconds)
        "steady_tokens_per_s": tokens / max(steps_run, 1) / run.timer.seconds_per_step(),
        "train_runtime_s": result.metrics["train_runtime"],
        "parameters": count_parameters(model),
        "global_step": result.global_step,
    }
    run.record(**metrics)  # kept should the measurement below fail
    if cfg.data.kind == "demo":  # what the later stages' tasks need most: repeating what the text named
        metrics.update({f"copy_rate/{k}": v for k, v in copy_rate(model, tok, eval_docs).items()})
        run.log("Copy rate (later mentions predicted with p > 0.5): "
                + ", ".join(f"{k.split('/')[1]} {v:.2f}" for k, v in metrics.items() if k.startswith("copy_rate/")))
    return metrics


@hydra.main(version_base="1.3", config_path="../conf", config_name="pretrain")
def main(cfg: DictConfig) -> float:
    torch.set_float32_matmul_precision("high")
    return run_stage("pretrain", cfg, pretrain, inputs)


if __name__ == "__main__":
    refuse_keys_of_other_stages("pretrain")
    main()
