"""The checkpoint registry: every checkpoint a stage writes, its status, metrics and lineage.

An SQLite index (`registry.db`) under the registry root, plus a `manifest.json` inside each checkpoint
directory, so that every checkpoint describes itself and the index can be rebuilt from the manifests.
The command line (`python -m pipeline.registry list | show | lineage | rebuild | export | push`) is in
__main__.py.

REF is `stage` or `stage:latest` (newest complete), `stage:best` (best on the stage's key metric),
an entry id, a checkpoint path, or a hub id. Only complete entries resolve.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import sqlite3
import subprocess
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from pipeline.errors import PipelineError

STAGES = ("pretrain", "sft", "reward", "ppo", "dpo", "grpo", "rloo")
# The stages that tune a policy from its SFT start.
ALIGNMENT_STAGES = ("ppo", "dpo", "grpo", "rloo")
# The metric `stage:best` ranks by, and whether higher is better.
KEY_METRICS = {"pretrain": ("eval_loss", False), "sft": ("gold_score", True), "reward": ("eval_accuracy", True),
               **{stage: ("gold_score", True) for stage in ALIGNMENT_STAGES}}
STATUSES = ("running", "complete", "failed")
MANIFEST = "manifest.json"
PACKAGES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "wandb", "hydra-core")


def default_root() -> str:
    return os.environ.get("PIPELINE_HOME", "runs")


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def git_sha() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def package_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            pass
    return versions


@dataclass
class Entry:
    id: str
    stage: str
    status: str
    path: str
    parents: list = field(default_factory=list)
    created_at: str = ""
    finished_at: Optional[str] = None
    metrics: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    config_hash: str = ""
    git_sha: Optional[str] = None
    data_fingerprint: Optional[str] = None
    tokenizer_fingerprint: Optional[str] = None
    versions: dict = field(default_factory=dict)
    pipeline_id: Optional[str] = None
    # The process that owns a running entry: a rerun resumes it only when that process is gone.
    host: Optional[str] = None
    pid: Optional[int] = None
    note: Optional[str] = None
    # lm-evaluation-harness results on this checkpoint (python -m pipeline.evaluate): task, metric, value, stderr,
    # num_fewshot, limit, lm_eval_version, task_version, created_at; never part of its training metrics.
    evaluations: list = field(default_factory=list)

    def owner_alive(self) -> bool:
        if self.status != "running" or self.host != socket.gethostname() or not self.pid:
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


@dataclass
class Resolved:
    """What a reference points to: a directory or hub id to load, and the registry entry if there is one."""
    path: str
    entry: Optional[Entry] = None


_COLUMNS = [f for f in Entry.__dataclass_fields__]
# named in every statement: an index made before a column was added holds them in another order
_NAMES, _SLOTS = ", ".join(_COLUMNS), ", ".join("?" * len(_COLUMNS))
_JSON_COLUMNS = {"parents", "metrics", "config", "versions", "evaluations"}
_LIST_COLUMNS = {"parents", "evaluations"}


class Registry:
    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root or default_root()).resolve()
        self.db_path = self.root / "registry.db"

    # --- storage -------------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        self.root.mkdir(parents=True, exist_ok=True)
        con = sqlite3.connect(self.db_path, timeout=60, isolation_level=None)
        con.execute("PRAGMA busy_timeout = 60000")
        # WAL lets readers work while a stage writes. The mode is stored in the file, so it is set once; the
        # switch takes a lock that does not wait on busy_timeout, so a process that loses the race retries.
        for _ in range(200):
            if con.execute("PRAGMA journal_mode").fetchone()[0] == "wal":
                break
            try:
                con.execute("PRAGMA journal_mode = WAL")
            except sqlite3.OperationalError:
                time.sleep(0.05)
        cols = ", ".join(f"{c} TEXT" if c != "id" else "id TEXT PRIMARY KEY" for c in _COLUMNS)
        con.execute(f"CREATE TABLE IF NOT EXISTS entries ({cols})")
        # an index written before a column was added to Entry gets it (empty), appended as Entry appends it
        present = {row[1] for row in con.execute("PRAGMA table_info(entries)")}
        for c in _COLUMNS:
            if c not in present:
                with contextlib.suppress(sqlite3.OperationalError):  # another process added it first
                    con.execute(f"ALTER TABLE entries ADD COLUMN {c} TEXT")
        return con

    @staticmethod
    def _row(entry: Entry) -> list:
        d = asdict(entry)
        return [json.dumps(d[c]) if c in _JSON_COLUMNS else (None if d[c] is None else str(d[c]))
                for c in _COLUMNS]

    @staticmethod
    def _entry(row) -> Entry:
        d = dict(zip(_COLUMNS, row))
        for c in _JSON_COLUMNS:
            d[c] = json.loads(d[c]) if d[c] else ([] if c in _LIST_COLUMNS else {})
        d["pid"] = int(d["pid"]) if d["pid"] else None
        return Entry(**d)

    def _write(self, entry: Entry) -> None:
        """Write the manifest first, then the index row, so the index never names a missing manifest."""
        path = Path(entry.path)
        path.mkdir(parents=True, exist_ok=True)
        tmp = path / f".{MANIFEST}.{uuid.uuid4().hex}"
        tmp.write_text(json.dumps(asdict(entry), indent=2, default=str))
        os.replace(tmp, path / MANIFEST)
        con = self._connect()
        try:
            con.execute("BEGIN IMMEDIATE")
            con.execute(f"INSERT OR REPLACE INTO entries ({_NAMES}) VALUES ({_SLOTS})",
                        self._row(entry))
            con.execute("COMMIT")
        finally:
            con.close()

    # --- writing -------------------------------------------------------------------------------
    def create(self, stage: str, config: dict, parents: list[str] | None = None, cfg_hash: str | None = None,
               **fields) -> Entry:
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}")
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        entry_id = f"{stage}-{stamp}-{uuid.uuid4().hex[:6]}"
        entry = Entry(id=entry_id, stage=stage, status="running", path=str(self.root / "checkpoints" / entry_id),
                      parents=list(parents or []), created_at=now(), config=config,
                      config_hash=cfg_hash or config_hash(config), git_sha=git_sha(), versions=package_versions(),
                      pipeline_id=os.environ.get("PIPELINE_ID"), host=socket.gethostname(), pid=os.getpid(),
                      **fields)
        self._write(entry)
        return entry

    def update(self, entry: Entry, **changes) -> Entry:
        for k, v in changes.items():
            setattr(entry, k, v)
        self._write(entry)
        return entry

    def claim(self, entry: Entry) -> Entry:
        """Take over an unfinished entry to resume it in this process."""
        return self.update(entry, status="running", host=socket.gethostname(), pid=os.getpid(), finished_at=None)

    def complete(self, entry: Entry, metrics: dict) -> Entry:
        return self.update(entry, status="complete", metrics={**entry.metrics, **metrics}, finished_at=now())

    def record_evaluations(self, entry_id: str, results: list[dict]) -> Entry:
        """Add evaluation results to an entry, each replacing an earlier one of the same task, metric, few-shot
        count and limit; the rest of the entry is read afresh and left as it is."""
        key = lambda r: (r["task"], r["metric"], r["num_fewshot"], r["limit"])
        entry = self.get(entry_id)
        new = {key(r) for r in results}
        return self.update(entry, evaluations=[r for r in entry.evaluations if key(r) not in new] + results)

    def fail(self, entry: Entry, note: str) -> Entry:
        return self.update(entry, status="failed", note=note[:2000], finished_at=now())

    # --- reading -------------------------------------------------------------------------------
    def entries(self, stage: str | None = None) -> list[Entry]:
        if not self.db_path.exists():
            return []
        con = self._connect()
        try:
            if stage:
                rows = con.execute(f"SELECT {_NAMES} FROM entries WHERE stage = ? ORDER BY created_at", (stage,))
            else:
                rows = con.execute(f"SELECT {_NAMES} FROM entries ORDER BY created_at")
            return [self._entry(r) for r in rows.fetchall()]
        finally:
            con.close()

    def get(self, entry_id: str) -> Optional[Entry]:
        return next((e for e in self.entries() if e.id == entry_id), None)

    def pipeline_entries(self, pipeline_id: str) -> list[Entry]:
        """A pipeline run's entry for each stage it ran, in stage order: the newest complete one, else the newest
        attempt."""
        mine = [e for e in self.entries() if e.pipeline_id == pipeline_id]
        if not mine:
            known = sorted({e.pipeline_id for e in self.entries() if e.pipeline_id})
            raise PipelineError(f"no entries of pipeline run '{pipeline_id}' in {self.root}; "
                                f"known runs: {', '.join(known) or 'none'}")
        chosen = []
        for stage in STAGES:
            tries = [e for e in mine if e.stage == stage]
            done = [e for e in tries if e.status == "complete"]
            if tries:
                chosen.append((done or tries)[-1])
        return chosen

    def find_resumable(self, stage: str, cfg_hash: str) -> Optional[Entry]:
        """The newest unfinished entry of this stage and config whose process is gone."""
        for e in reversed(self.entries(stage)):
            if e.config_hash == cfg_hash and e.status in ("running", "failed") and not e.owner_alive():
                return e
        return None

    def resolve(self, ref: str) -> Resolved:
        """Turn a reference into something to load; raise PipelineError naming the remedy if nothing matches."""
        stage, _, which = ref.partition(":")
        if stage in STAGES and which in ("", "latest", "best"):
            done = [e for e in self.entries(stage) if e.status == "complete"]
            if not done:
                raise PipelineError(
                    f"no complete '{stage}' checkpoint in the registry at {self.root}. "
                    f"Run `make {stage}` first, or point to a model directly (init_from=PATH_OR_HUB_ID).")
            if which == "best":
                key, higher = KEY_METRICS[stage]
                scored = [e for e in done if key in e.metrics]
                if not scored:
                    raise PipelineError(f"no complete '{stage}' entry records {key}, so '{ref}' has no best")
                best = max(scored, key=lambda e: e.metrics[key] if higher else -e.metrics[key])
                return Resolved(best.path, best)
            latest = max(done, key=lambda e: (e.finished_at or "", e.created_at))
            return Resolved(latest.path, latest)
        entry = self.get(ref)
        if entry is None and Path(ref).is_dir():
            manifest = Path(ref) / MANIFEST
            if manifest.exists():
                entry = self.get(json.loads(manifest.read_text())["id"])
            if entry is None:
                return Resolved(str(Path(ref).resolve()))
        if entry is not None:
            if entry.status != "complete":
                raise PipelineError(f"checkpoint {entry.id} is {entry.status}, not complete, so it cannot be "
                                    f"used as input; rerun its stage (`make {entry.stage}`) to finish it")
            return Resolved(entry.path, entry)
        if looks_like_hub_id(ref):
            return Resolved(ref)
        raise PipelineError(f"'{ref}' is neither a stage reference ({', '.join(STAGES)}[:latest|:best]), "
                            f"an entry id in the registry at {self.root}, an existing directory, nor a hub id")

    def lineage(self, ref: str) -> list[tuple[int, Entry]]:
        """The entry and all its ancestors as (depth, entry), depth first: a parent follows its child."""
        out: list[tuple[int, Entry]] = []

        def visit(e: Entry, depth: int, path: tuple):
            out.append((depth, e))
            for pid in e.parents:
                parent = self.get(pid)
                if parent is not None and pid not in path:
                    visit(parent, depth + 1, path + (pid,))

        start = self.resolve_any(ref)
        visit(start, 0, (start.id,))
        return out

    def resolve_any(self, ref: str) -> Entry:
        """Like resolve, but for inspection: an entry id in any status is fine."""
        entry = self.get(ref)
        if entry is None:
            entry = self.resolve(ref).entry
        if entry is None:
            raise PipelineError(f"'{ref}' is not in the registry at {self.root}")
        return entry

    # --- maintenance ---------------------------------------------------------------------------
    def rebuild(self) -> int:
        """Recreate the index from the manifests in the checkpoint directories."""
        manifests = sorted((self.root / "checkpoints").glob(f"*/{MANIFEST}"))
        entries = [Entry(**json.loads(m.read_text())) for m in manifests]
        con = self._connect()
        try:
            con.execute("BEGIN IMMEDIATE")
            con.execute("DELETE FROM entries")
            con.executemany(f"INSERT INTO entries ({_NAMES}) VALUES ({_SLOTS})",
                            [self._row(e) for e in entries])
            con.execute("COMMIT")
        finally:
            con.close()
        return len(entries)


def looks_like_hub_id(ref: str) -> bool:
    """`org/name` (optionally a bare name) that is not a local path."""
    parts = ref.split("/")
    return (0 < len(parts) <= 2 and all(parts) and not ref.startswith((".", "~"))
            and not Path(ref).exists() and all(c.isalnum() or c in "-_." for c in ref.replace("/", "")))
