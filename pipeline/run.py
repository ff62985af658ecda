"""What every stage does around its training: validate the config, open (or resume) its registry entry on
the main process and tell the other ranks, mark the entry complete or failed, and report errors clearly.

A stage file follows one skeleton: its docstring of commands; `inputs` (the checkpoints it starts from); its
data and model; its Trainer, built with `trainer_arguments` and `standard_callbacks` (pipeline/trainer.py,
pipeline/callbacks.py); training; `save_hf_directory`; evaluation; and `main`, which returns the registry's key
metric for the stage (what `stage:best` ranks by, so that a sweep optimises it).
"""
from __future__ import annotations

import json
import logging
import math
import os
import resource
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
from accelerate.utils import DistributedType
from omegaconf import DictConfig, OmegaConf
from transformers import set_seed

from pipeline import tracking
from pipeline.callbacks import StepTimer
from pipeline.checkpoint import last_trainer_checkpoint
from pipeline.config import StageConfig, validate
from pipeline.data import fingerprint
from pipeline.errors import PipelineError
from pipeline.registry import KEY_METRICS, Entry, Registry, Resolved, config_hash
from pipeline.tokenizer import tokenizer_fingerprint
from pipeline.trainer import resolved_precision

# Settings that do not change what a run computes: a rerun that differs only in these resumes.
NOT_HASHED = ("resume", "logging")


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
    timer: Optional[StepTimer] = None  # the step timer of standard_callbacks
    callbacks: list = field(default_factory=list)  # Trainer callbacks a caller adds to the stage's (a benchmark's)

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

    def record_fingerprints(self, rows: list, tok) -> None:
        """The fingerprints of the data the stage trains on (documents, rows or pairs) and of its tokenizer,
        recorded in the entry (and named in its model card)."""
        if self.is_main:
            texts = [r if isinstance(r, str) else json.dumps(r) for r in rows]
            self.registry.update(self.entry, data_fingerprint=fingerprint(texts),
                                 tokenizer_fingerprint=tokenizer_fingerprint(tok))


def _open_entry(stage: str, cfg, config: dict, parents: list[str], registry: Registry, state):
    """On the main process: resume the unfinished entry of the same command, or create a new one."""
    if not state.is_main_process:
        return None, None
    h = config_hash({"config": {k: v for k, v in config.items() if k not in NOT_HASHED}, "parents": parents})
    if cfg.resume == "auto":
        old = registry.find_resumable(stage, h)
        if old is not None:
            ckpt = last_trainer_checkpoint(Path(old.path) / "trainer")
            if ckpt:
                return registry.claim(old), ckpt
            why = "it left no trainer checkpoint"
            registry.fail(old, f"abandoned: {why}; a rerun started afresh")
            get_logger(stage).info(f"The unfinished attempt {old.id} cannot be resumed ({why}): it is marked "
                                   f"failed and the stage restarts cleanly")
    return registry.create(stage, config, parents, cfg_hash=h), None


def key_metric(stage: str, metrics: dict) -> float:
    """The metric `stage:best` ranks the stage's entries by (KEY_METRICS), as a stage's main() returns it for a
    Hydra sweeper to optimise; nan where the run has none (the demo's gold score, on data of one's own)."""
    return float(metrics.get(KEY_METRICS[stage][0], math.nan))


def run_stage(stage: str, cfg: DictConfig, body: Callable[[StageRun], dict],
              inputs: Callable[[object, Registry], dict] = lambda cfg, reg: {}) -> float:
    """Run a stage body under its registry entry, and return the stage's key metric (`key_metric`); a
    PipelineError ends the process with its message and exit 2.

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
        parent_ids = list(dict.fromkeys(r.entry.id for r in resolved.values() if r.entry is not None))
        entry, resume_from = _open_entry(stage, typed, config, parent_ids, registry, state)
        shared = [entry, resume_from]
        if state.num_processes > 1:
            broadcast_object_list(shared)  # the other ranks learn the entry from the main process
        entry, resume_from = shared
        if state.is_main_process:
            (Path(entry.path) / "pipeline_config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
            precision = resolved_precision(typed.trainer.mixed_precision, stage)
            if typed.trainer.mixed_precision not in ("auto", precision):
                log.warning(f"trainer.mixed_precision={typed.trainer.mixed_precision} has no effect on {stage}: "
                            f"its trainer runs in fp32")
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
        if run.timer is not None and len(run.timer.ends) > 1:
            metrics.setdefault("steady_seconds_per_step", run.timer.seconds_per_step())
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
        return key_metric(stage, metrics)
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
