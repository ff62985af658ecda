"""The Trainer arguments every stage builds the same way (`trainer_arguments`), and the precision rule."""
from __future__ import annotations

import inspect

import torch
from transformers import TrainingArguments
from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION, SchedulerType

from pipeline.config import CheckpointingTrainerConfig, LengthGroupedTrainerConfig

# transformers renamed gradient checkpointing to activation checkpointing (the old name warns)
CHECKPOINTING = "activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__ \
    else "gradient_checkpointing"
# The stages that auto runs in bf16 on a CPU whose bf16 matmuls are AVX-512 BF16 alone (about twice the fp32 rate,
# not AMX's several times): pretraining, whose large matmuls gain. The fine-tuning stages gain little or lose
# there, SFT in bf16 lost gold (docs/results.md, "Time to quality"), and the reward model in bf16 met its accuracy
# mark at fp32's step on one seed of two, later on the other ("The reward stage in bf16 against fp32").
AVX512_BF16_STAGES = ("pretrain",)
# The stages whose trainer runs in fp32 whatever it is told: TRL's PPOTrainer builds its own Accelerator without
# the mixed precision (its bf16 casts only 4-bit PEFT modules), so PPO's updates are fp32 on every machine.
FP32_STAGES = ("ppo",)


def resolved_precision(setting: str, stage: str) -> str:
    """trainer.mixed_precision as `stage` runs it on this machine: auto is bf16 where bf16 matmuls are native and
    pay (a GPU with bf16; a CPU with AMX tiles; with AVX-512 BF16, the stages of AVX512_BF16_STAGES), else no
    (fp32: emulated bf16 runs at a small fraction of the fp32 rate). "no" for the stages of FP32_STAGES."""
    if stage in FP32_STAGES:
        return "no"
    if setting != "auto":
        return setting
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    if getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)():  # torch >= 2.3
        return "bf16"
    avx512_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    return "bf16" if avx512_bf16 and stage in AVX512_BF16_STAGES else "no"


def scheduler_settings(scheduler: str, settings: dict) -> dict:
    """trainer.lr_scheduler_kwargs that the chosen scheduler takes: a stage's default settings for its own schedule
    (pretraining's num_decay_steps) do not stop a run that picks another (trainer.lr_scheduler_type=linear)."""
    takes = inspect.signature(TYPE_TO_SCHEDULER_FUNCTION[SchedulerType(scheduler)]).parameters
    return {k: v for k, v in settings.items() if k in takes}


def trainer_arguments(run, args_class=TrainingArguments, save_every: int = 0, **own):
    """The stage's arguments for its Trainer (TrainingArguments, or a TRL trainer's config class): the trainer
    section of its config, as every stage takes it, plus the stage's own settings (`own`), which add to those and
    may not replace them. A trainer section without checkpoint settings (PPO's) writes a trainer checkpoint every
    `save_every` steps (0: none), the last two kept."""
    t, stage = run.cfg.trainer, run.stage
    precision = resolved_precision(t.mixed_precision, stage)
    shared = dict(
        output_dir=str(run.trainer_dir),
        max_steps=t.max_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler_type,
        lr_scheduler_kwargs=scheduler_settings(t.lr_scheduler_type, t.lr_scheduler_kwargs),
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_eval_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        **{CHECKPOINTING: t.gradient_checkpointing},
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        logging_steps=t.logging_steps,
        logging_nan_inf_filter=False,  # a NaN loss must show, not be averaged away
        save_strategy="no",
        eval_strategy="no",  # each stage evaluates before and after training, off the hot path
        dataloader_num_workers=t.dataloader_num_workers,
        dataloader_pin_memory=torch.cuda.is_available(),
        use_cpu=not torch.cuda.is_available(),
        report_to=run.report_to,
        run_name=run.entry.id,
        seed=run.cfg.seed,
        disable_tqdm=False,
    )
    if isinstance(t, CheckpointingTrainerConfig):
        shared.update(save_strategy="steps", save_steps=t.save_steps, save_total_limit=t.save_total_limit)
    elif save_every:
        shared.update(save_strategy="steps", save_steps=save_every, save_total_limit=2)
    if isinstance(t, LengthGroupedTrainerConfig):
        shared["train_sampling_strategy"] = "group_by_length" if t.group_by_length else "random"
    clash = sorted(set(own) & set(shared))
    if clash:
        raise ValueError(f"trainer_arguments: the stage's own settings {clash} would replace the trainer section's")
    return args_class(**shared, **own)
