"""Experiment tracking with wandb: one group per pipeline run, job_type = stage, run name = entry id.

Online when the user is logged in (WANDB_API_KEY), otherwise offline files under the registry root.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from pipeline.config import LoggingConfig

logger = logging.getLogger(__name__)


def wandb_dirs(root: Path) -> None:
    """Keep every file wandb writes (runs, cache, settings) under the registry root."""
    # wandb puts its run folders in a "wandb" folder inside WANDB_DIR
    for var, sub in (("WANDB_DIR", "."), ("WANDB_CACHE_DIR", "wandb/cache"),
                     ("WANDB_CONFIG_DIR", "wandb/config"), ("WANDB_DATA_DIR", "wandb/data")):
        os.environ.setdefault(var, str(root / sub))
        Path(os.environ[var]).mkdir(parents=True, exist_ok=True)


def start_run(cfg: LoggingConfig, stage: str, entry, config: dict, root: Path) -> str:
    """Start this stage's wandb run (main process only); return the Trainer's `report_to` value."""
    if cfg.backend == "none":
        return "none"
    init(root, project=cfg.project, group=os.environ.get("PIPELINE_ID") or entry.id, job_type=stage, name=entry.id,
         id=entry.id, resume="allow", config={**config, "registry": {"entry_id": entry.id, "parents": entry.parents}})
    return "wandb"


def init(root: Path, **kwargs):
    """wandb.init with its files under the registry root, offline unless the user is logged in."""
    wandb_dirs(root)
    if not os.environ.get("WANDB_API_KEY") and "WANDB_MODE" not in os.environ:
        os.environ["WANDB_MODE"] = "offline"
    import wandb

    run = wandb.init(dir=os.environ["WANDB_DIR"], **kwargs)
    if run.settings.mode == "offline" or os.environ.get("WANDB_MODE") == "offline":
        logger.info(f"wandb is offline (no WANDB_API_KEY); sync later with: wandb sync {run.dir.rsplit('/files', 1)[0]}")
    return run


def log_evaluation(entry, found: list[dict], root: Path) -> None:
    """One evaluation of an entry as a wandb run of job type `eval`, in the group of the entry's pipeline run, for
    an entry whose stage logged to wandb: each result in its summary and a table."""
    logging_cfg = (entry.config or {}).get("logging") or {}
    if logging_cfg.get("backend", "wandb") == "none" or not found:
        return
    import wandb

    run = init(root, project=logging_cfg.get("project") or LoggingConfig.project, job_type="eval",
               group=entry.pipeline_id or entry.id, name=f"eval-{entry.id}",
               config={"registry": {"entry_id": entry.id, "stage": entry.stage},
                       "tasks": sorted({r["task"] for r in found})},
               settings=wandb.Settings(console="off"))  # the results are its record, not the console
    run.summary.update({f"{r['task']}/{r['metric']}": r["value"] for r in found})
    columns = ["task", "metric", "value", "stderr", "num_fewshot", "limit"]
    run.log({"evaluations": wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in found])})
    run.finish()


def log_checkpoint(entry) -> None:
    """Mirror a complete checkpoint as a wandb model artifact named by its entry id.

    Its metadata names the parents' artifacts; an online run also `use`s them, so that wandb's lineage
    graph follows the registry (a parent that was never mirrored is skipped with a note).
    """
    import wandb

    if wandb.run is None:
        return
    root = Path(entry.path)
    artifact = wandb.Artifact(entry.id, type="model", metadata={
        "stage": entry.stage, "registry_id": entry.id, "parents": [f"{p}:latest" for p in entry.parents],
        "metrics": entry.metrics, "pipeline_id": entry.pipeline_id})
    for f in sorted(root.rglob("*")):
        if f.is_file() and f.relative_to(root).parts[0] != "trainer":  # not the trainer's own checkpoints
            artifact.add_file(str(f), name=str(f.relative_to(root)))
    if not wandb.run.settings._offline:
        for parent in entry.parents:
            try:
                wandb.run.use_artifact(f"{parent}:latest")
            except Exception as e:  # the parent's run did not mirror its checkpoint
                logger.info(f"no artifact for parent {parent} ({e}); lineage starts here")
    wandb.run.log_artifact(artifact, aliases=["latest", entry.stage])


def finish_run() -> None:
    import sys
    if "wandb" in sys.modules:
        import wandb
        if wandb.run is not None:
            wandb.finish()
