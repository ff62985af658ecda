"""What every stage does around its training: validate the config, open (or resume) its registry entry on
the main process and tell the other ranks, mark the entry complete or failed, and report errors clearly.
"""
from __future__ import annotations

import json
import logging
import math
import resource
import os
import shutil
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import psutil
import torch
from accelerate import PartialState
from accelerate.logging import get_logger
from accelerate.utils import DistributedType, extract_model_from_parallel
from torch.distributed.fsdp import FSDPModule
from omegaconf import DictConfig, OmegaConf
from peft import PeftModel
from transformers import TrainerCallback, TrainingArguments, set_seed

from pipeline import tracking
from pipeline.config import StageConfig, TrainerConfig, validate
from pipeline.data import row_texts
from pipeline.errors import PipelineError
from pipeline.registry import Entry, Registry, Resolved, config_hash
from pipeline.tokenizer import coverage

# The handoff check warns when a stage's data is split this many times as finely as the pretraining corpus,
# or when more than this share of its examples is longer than the pretrained context.
COVERAGE_WARNING = 1.25
LONG_WARNING = 0.01
# Settings that do not change what a run computes: a rerun that differs only in these resumes.
NOT_HASHED = ("resume", "logging")
LOG_HISTORY = "log_history.json"  # the trainer's logged metrics, saved beside each checkpoint
# transformers renamed gradient checkpointing to activation checkpointing (the old name warns)
CHECKPOINTING = "activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__ \
    else "gradient_checkpointing"


@dataclass
class StageRun:
    """Everything a stage's body needs: its typed config, registry entry, and distributed state."""
    stage: str
    cfg: StageConfig  # the stage's own config class (PretrainStageConfig, SFTStageConfig, ...)
    config: dict  # the resolved config as plain data (saved with the checkpoint)
    registry: Registry
    entry: Entry
    state: PartialState
    resume_from: Optional[str] = None  # trainer checkpoint to resume from
    report_to: str = "none"
    inputs: dict[str, Resolved] = field(default_factory=dict)  # the checkpoints this stage starts from
    saved: bool = False  # the trained model is in the entry's directory (set by save_hf_directory)

    @classmethod
    def standalone(cls, stage: str, cfg: StageConfig, root: str | Path) -> "StageRun":
        """A run outside run_stage, for building a stage's pieces in tests and benchmarks: a running entry in a
        registry of its own at root, this process's state, no tracking."""
        registry = Registry(root)
        config = asdict(cfg)
        state = PartialState(cpu=not torch.cuda.is_available())
        return cls(stage, cfg, config, registry, registry.create(stage, config), state)

    @property
    def is_main(self) -> bool:
        return self.state.is_main_process

    @property
    def trainer_dir(self) -> Path:
        return Path(self.entry.path) / "trainer"

    @property
    def cache_dir(self) -> Path:
        return self.registry.root / "cache"

    def log(self, msg: str, level: int = logging.INFO) -> None:
        """A line of the stage's output, from the main process only, through its logger: on the console and in
        Hydra's log of the run (<registry root>/hydra/<stage>/<time>/<stage>.log)."""
        get_logger(self.stage).log(level, msg)  # main_process_only by default

    def warn(self, msg: str) -> None:
        self.log(f"WARNING: {msg}", logging.WARNING)

    def record(self, **metrics) -> None:
        """Store metrics in the entry while the run goes on (e.g. the loss before training, kept for a resume)."""
        self.entry.metrics.update(metrics)
        if self.is_main:
            self.registry.update(self.entry, metrics=self.entry.metrics)


def is_peft_model(model) -> bool:
    return isinstance(model, PeftModel)


def last_trainer_checkpoint(trainer_dir: Path) -> Optional[str]:
    """The newest trainer checkpoint that was written completely (a kill can leave one half-written)."""
    if not trainer_dir.is_dir():
        return None
    ckpts = sorted((p for p in trainer_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
                   key=lambda p: int(p.name.split("-")[-1]), reverse=True)
    for p in ckpts:
        if (p / "trainer_state.json").exists() and (p / "model.safetensors").exists():
            return str(p)
    return None


class StopOnNonFiniteLoss(TrainerCallback):
    """Stop at the first non-finite loss or weights, before a bad trainer checkpoint can be written.

    A NaN/inf gradient turns every weight NaN at the optimizer step (clipping spreads it), so one trained
    tensor shows it. It is checked on the steps the Trainer is about to log or save, ahead of the save (not
    on every step: a device sync on the hot path). The logged loss is checked too.
    """

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if not (control.should_save or control.should_log):  # set by the Trainer's flow callback, run before
            return
        weight = next(p for p in model.parameters() if p.requires_grad).detach()
        weight = weight.to_local() if hasattr(weight, "to_local") else weight  # a sharded (FSDP) parameter
        if weight.numel() and not torch.isfinite(weight).all():
            self._stop("the weights became non-finite", state.global_step, args)

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss):
            self._stop(f"the training loss became {loss}", state.global_step, args)

    @staticmethod
    def _stop(what: str, step: int, args) -> None:
        kept = last_trainer_checkpoint(Path(args.output_dir))
        raise PipelineError(f"{what} at step {step}; lower trainer.learning_rate or check the data. "
                            + (f"The last good trainer checkpoint is kept: {kept}" if kept else
                               "No trainer checkpoint was written before it."))


class StepTimer(TrainerCallback):
    """Steady-state seconds per optimizer step, everything the Trainer does in a step included; the first
    `skip` steps (warm-up: allocations, first-call overheads) are left out."""

    def __init__(self, skip: int = 5):
        self.skip = skip
        self.ends: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())

    def seconds_per_step(self) -> float:
        first = min(self.skip, max(len(self.ends) - 2, 0))
        return (self.ends[-1] - self.ends[first]) / max(len(self.ends) - 1 - first, 1)


class InitialEvalLoss(TrainerCallback):
    """The eval loss before training, measured by the trainer's own evaluation at the start of training
    (`eval_on_start`: after the model is prepared, which FSDP2 and DeepSpeed need before any forward) and kept in
    the entry, so that a resumed run reports it too. Pass `eval_on_start=not InitialEvalLoss.recorded(run)`."""

    def __init__(self, run: "StageRun"):
        self.run = run

    @staticmethod
    def recorded(run: "StageRun") -> bool:
        return "initial_eval_loss" in run.entry.metrics

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if not self.recorded(self.run):
            self.run.record(initial_eval_loss=metrics["eval_loss"])
            self.run.log(f"Eval loss before training: {metrics['eval_loss']:.4f}")


def _open_entry(stage: str, cfg, config: dict, parents: list[str], registry: Registry, state, resumable: bool):
    """On the main process: resume the unfinished entry of the same command, or create a new one."""
    if not state.is_main_process:
        return None, None
    h = config_hash({"config": {k: v for k, v in config.items() if k not in NOT_HASHED}, "parents": parents})
    if cfg.resume == "auto":
        old = registry.find_resumable(stage, h)
        if old is not None:
            ckpt = last_trainer_checkpoint(Path(old.path) / "trainer") if resumable else None
            if ckpt:
                return registry.claim(old), ckpt
            why = "this stage's trainer cannot resume" if not resumable else "it left no trainer checkpoint"
            registry.fail(old, f"abandoned: {why}; a rerun started afresh")
            get_logger(stage).info(f"The unfinished attempt {old.id} cannot be resumed ({why}): it is marked "
                                   f"failed and the stage restarts cleanly")
    return registry.create(stage, config, parents, cfg_hash=h), None


# The stages that auto runs in bf16 on a CPU whose bf16 matmuls are AVX-512 BF16 alone (about twice the fp32 rate,
# not AMX's several times): pretraining, whose large matmuls gain 1.2-1.4x a step. The fine-tuning stages gain
# little or lose there (reward 1.04x, PPO 0.98x), and SFT in bf16 lost 0.03 gold on each of two seeds (README,
# Time to quality).
AVX512_BF16_STAGES = ("pretrain",)


def resolved_precision(setting: str, stage: str) -> str:
    """trainer.mixed_precision as `stage` runs it on this machine: auto is bf16 where bf16 matmuls are native and
    pay (a GPU with bf16; a CPU with AMX tiles; with AVX-512 BF16, the stages of AVX512_BF16_STAGES), else no
    (fp32: emulated bf16 runs at a small fraction of the fp32 rate)."""
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
    import inspect

    from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION, SchedulerType

    takes = inspect.signature(TYPE_TO_SCHEDULER_FUNCTION[SchedulerType(scheduler)]).parameters
    return {k: v for k, v in settings.items() if k in takes}


def trainer_arguments(t: TrainerConfig, run: StageRun) -> dict:
    """The TrainingArguments every stage shares, from the trainer section of its config."""
    precision = resolved_precision(t.mixed_precision, run.stage)
    return dict(
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
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        logging_steps=t.logging_steps,
        logging_nan_inf_filter=False,  # a NaN loss must show, not be averaged away
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        eval_strategy="no",  # each stage evaluates before and after training, off the hot path
        dataloader_num_workers=t.dataloader_num_workers,
        dataloader_pin_memory=torch.cuda.is_available(),
        use_cpu=not torch.cuda.is_available(),
        report_to=run.report_to,
        run_name=run.entry.id,
        seed=run.cfg.seed,
        disable_tqdm=False,
    )


def save_hf_directory(trainer, tok, run: StageRun) -> None:
    """The checkpoint as a plain Hugging Face directory: model, tokenizer, generation config; safetensors only.

    A LoRA run keeps its adapter in adapter/ beside the merged model, which transformers loads alone.
    """
    if not is_peft_model(trainer.model):
        trainer.save_model(run.entry.path)
        if run.is_main:
            (Path(run.entry.path) / "training_args.bin").unlink(missing_ok=True)  # a pickle; the config is YAML
    elif run.is_main:
        trainer.model.save_pretrained(Path(run.entry.path) / "adapter")
        trainer.model = trainer.model.merge_and_unload()  # merging changes the layers in place: keep the result
        trainer.model.save_pretrained(run.entry.path)
    if run.is_main:
        tok.save_pretrained(run.entry.path)
        # the logged training curve, for the run report (trainer checkpoints are removed on completion)
        (Path(run.entry.path) / LOG_HISTORY).write_text(json.dumps(trainer.state.log_history))
    run.state.wait_for_everyone()
    run.saved = True


def check_data_coverage(run: StageRun, tok, rows: list[dict], model, sample: int = 2000) -> None:
    """The handoff from pretraining: does the tokenizer cover this stage's data as it covered the pretraining
    corpus, and does the data fit the context the model was pretrained on? Warns with the remedy and records
    both figures (handoff_tokens_per_word_ratio, handoff_long_share) in the entry."""
    texts = [" ".join(row_texts(r)) for r in rows[:sample]]
    cov = coverage(tok, texts)
    pretrained = next((e for _, e in run.registry.lineage(run.inputs["init_from"].entry.id)
                       if e.stage == "pretrain"), None) if run.inputs["init_from"].entry else None
    pm = pretrained.metrics if pretrained else {}
    context = pm.get("context_length") or model.config.max_position_embeddings
    long_share = sum(n > context for n in cov["lengths"]) / max(len(texts), 1)
    figures = {"handoff_tokens_per_word": cov["tokens_per_word"], "handoff_long_share": long_share}
    split = ", ".join(f"'{w}' ({n} tokens)" for w, n in cov["most_split"].items())
    if "corpus_tokens_per_word" in pm:
        ratio = cov["tokens_per_word"] / pm["corpus_tokens_per_word"]
        figures["handoff_tokens_per_word_ratio"] = ratio
        run.log(f"Tokenizer coverage: {cov['tokens_per_word']:.2f} tokens per word in this data, "
                f"{pm['corpus_tokens_per_word']:.2f} in the pretraining corpus ({pretrained.id})")
        if ratio > COVERAGE_WARNING:
            run.warn(f"the tokenizer splits this stage's words {ratio:.1f}x as finely as the pretraining "
                    f"corpus's; frequent words split most: {split}. The model meets these words as pieces it was "
                    f"never pretrained on and must learn to read them here. Retrain the tokenizer with this text "
                    f"(make pretrain ARGS=\"tokenizer.extra_text=[PATH]\"), or start from a model that knows the "
                    f"language (init_from=HUB_ID)")
    if long_share > LONG_WARNING:
        run.warn(f"{long_share:.0%} of this stage's examples are longer than the {context} tokens the model "
                f"was pretrained on: their later positions were never trained. Pretrain with a longer "
                f"data.block_size, or shorten the examples (data.max_length)")
    run.record(**figures)


def unwrapped(model, run: StageRun | None = None):
    """The plain transformers model of a trained model, for the main process to evaluate alone: LoRA adapters
    merged in, and the forward without the mixed-precision autocast accelerate wraps it in, so that evaluation
    runs in fp32 as before training. A model sharded across the processes (FSDP) cannot run on one of them: the
    checkpoint its run saved, gathered whole, is loaded instead."""
    model = extract_model_from_parallel(model, keep_fp32_wrapper=False)
    if isinstance(model, FSDPModule):
        if run is None:
            raise ValueError("a model sharded with FSDP is evaluated from its run's saved checkpoint: pass the run")
        plain = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))  # fully_shard's subclass
        return plain.from_pretrained(run.entry.path, dtype=torch.float32).to(run.state.device)
    return model.merge_and_unload() if is_peft_model(model) else model


def run_stage(stage: str, cfg: DictConfig, body: Callable[[StageRun], dict],
              inputs: Callable[[object, Registry], dict] = lambda cfg, reg: {}, resumable: bool = True) -> dict:
    """Run a stage body under its registry entry; a PipelineError ends the process with its message and exit 2.

    `inputs` resolves the checkpoints the stage starts from (before any entry is created, so a missing
    upstream checkpoint stops the run at once); their registry entries become the new entry's parents.
    """
    from accelerate.utils import broadcast_object_list

    entry = None
    registry = None
    state = None
    run = None
    log = get_logger(stage)  # speaks on the main process only; used once the state exists
    try:
        typed = validate(cfg)
        config = OmegaConf.to_container(cfg, resolve=True)
        registry = Registry(typed.registry.root)
        state = PartialState(cpu=not torch.cuda.is_available())  # gloo across CPU processes
        resolved = inputs(typed, registry)
        parent_ids = [r.entry.id for r in resolved.values() if r.entry is not None]
        entry, resume_from = _open_entry(stage, typed, config, parent_ids, registry, state, resumable)
        shared = [entry, resume_from]
        if state.num_processes > 1:
            broadcast_object_list(shared)  # the other ranks learn the entry from the main process
        entry, resume_from = shared
        if state.is_main_process:
            (Path(entry.path) / "pipeline_config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
            precision = resolved_precision(typed.trainer.mixed_precision, stage)
            procs = (f"{state.num_processes} process{'es' if state.num_processes > 1 else ''}"
                     f"{', ' + parallelism(state, log) if state.num_processes > 1 else ''}, {state.device.type}, "
                     f"{'fp32' if precision == 'no' else precision + ' autocast'}")
            if resume_from:
                log.info(f"Resuming {entry.id} from {resume_from} ({procs})")
            else:
                log.info(f"New entry {entry.id} at {entry.path} ({procs})")
        report_to = tracking.start_run(typed.logging, stage, entry, config, registry.root) \
            if state.is_main_process else "none"
        run = StageRun(stage, typed, config, registry, entry, state, resume_from, report_to, resolved)
        for name, r in resolved.items():
            run.log(f"{name}: {r.entry.id if r.entry else r.path} ({r.path})")
        set_seed(typed.seed)  # python, numpy and torch: a new head's weights, dropout, the data order
        try:
            metrics = body(run)
        except Exception as e:
            if not run.saved:
                raise
            metrics = _kept_after_failure(run, e)
        if state.is_main_process:
            metrics["wall_time_s"] = time.time() - psutil.Process().create_time()  # the stage's whole process
            metrics["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
            entry = registry.complete(entry, metrics)
            if typed.registry.wandb_artifacts and report_to == "wandb":
                try:
                    tracking.log_checkpoint(entry)
                except Exception as e:  # the checkpoint is complete whether or not wandb takes a copy
                    log.warning(f"WARNING: the checkpoint was not logged to wandb: {e}")
            if not typed.registry.keep_trainer_checkpoints:
                shutil.rmtree(run.trainer_dir, ignore_errors=True)
            log.info(f"Complete: {entry.id}")
            log.info("Metrics: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                             for k, v in sorted(entry.metrics.items())))
        tracking.finish_run()
        return metrics
    except PipelineError as e:
        _fail(registry, entry, state, str(e))
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except BaseException as e:
        _fail(registry, entry, state, "".join(traceback.format_exception_only(e)).strip() or type(e).__name__)
        raise


def parallelism(state, log) -> str:
    """How the processes share the work, as accelerate set it up; a sharding config it could not honour (FSDP
    and DeepSpeed need accelerator devices in accelerate) is warned about, not silently replaced."""
    kind = {DistributedType.FSDP: "FSDP", DistributedType.DEEPSPEED: "DeepSpeed"}.get(state.distributed_type, "DDP")
    for asked, env in (("FSDP", "ACCELERATE_USE_FSDP"), ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED")):
        if os.environ.get(env, "false").lower() == "true" and kind != asked:
            log.warning(
                f"WARNING: the accelerate config asks for {asked}, but accelerate runs it only on GPUs (or other "
                f"accelerators); on {state.device.type} every process holds the whole model and trains "
                f"data-parallel (DDP over {state.backend}).")
    return kind


def _kept_after_failure(run: StageRun, error: Exception) -> dict:
    """An error after the model was saved (evaluation, samples, tracking) does not discard the model: the entry
    completes with the metrics recorded so far, and its note and a warning say what failed."""
    what = str(error) if isinstance(error, PipelineError) else \
        "".join(traceback.format_exception_only(error)).strip() or type(error).__name__
    note = f"the model was saved, but what runs after it failed, so some metrics are missing: {what}"
    if run.is_main:
        traceback.print_exc()
        run.warn(note)
        run.entry = run.registry.update(run.entry, note=note[:2000])
    return dict(run.entry.metrics)


def _fail(registry, entry, state, note: str) -> None:
    if entry is not None and state is not None and state.is_main_process:
        try:
            registry.fail(entry, note)
        except Exception:
            pass
    tracking.finish_run()
