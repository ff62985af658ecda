"""The checkpoint registry: resolution, unfinished entries, concurrency, rebuilding, CLI."""
import json
import multiprocessing as mp
import os
import sqlite3
import subprocess

import pytest

from pipeline.errors import PipelineError
from pipeline.registry import Registry
from tests.conftest import PY, ROOT, env_for


def finished(reg, stage="pretrain", parents=(), **metrics):
    e = reg.create(stage, {"stage": stage, "n": len(reg.entries())}, list(parents))
    return reg.complete(e, metrics)


def test_latest_is_newest_complete_and_best_is_best_metric(tmp_path):
    reg = Registry(tmp_path)
    a = finished(reg, eval_loss=2.0)
    b = finished(reg, eval_loss=1.0)
    c = finished(reg, eval_loss=3.0)
    assert reg.resolve("pretrain").entry.id == c.id
    assert reg.resolve("pretrain:latest").entry.id == c.id
    assert reg.resolve("pretrain:best").entry.id == b.id  # lowest eval_loss
    s1 = finished(reg, "sft", [a.id], gold_score=0.4)
    s2 = finished(reg, "sft", [a.id], gold_score=0.7)
    finished(reg, "sft", [a.id], gold_score=0.5)
    assert reg.resolve("sft:best").entry.id == s2.id  # highest gold_score
    assert reg.resolve(s1.id).path == s1.path


def test_running_and_failed_entries_never_resolve(tmp_path):
    reg = Registry(tmp_path)
    done = finished(reg, eval_loss=2.0)
    running = reg.create("pretrain", {"x": 1})
    failed = reg.fail(reg.create("pretrain", {"x": 2}), "boom")
    assert reg.resolve("pretrain:latest").entry.id == done.id
    assert reg.resolve("pretrain:best").entry.id == done.id
    for ref in (running.id, failed.id, running.path):
        with pytest.raises(PipelineError, match="not complete"):
            reg.resolve(ref)


def test_missing_stage_names_root_and_remedy(tmp_path):
    reg = Registry(tmp_path)
    reg.fail(reg.create("pretrain", {}), "died")
    with pytest.raises(PipelineError) as e:
        reg.resolve("pretrain")
    assert str(tmp_path) in str(e.value) and "make pretrain" in str(e.value) and "init_from" in str(e.value)


def test_paths_and_hub_ids_resolve(tmp_path):
    reg = Registry(tmp_path / "reg")
    e = finished(reg, eval_loss=1.0)
    assert reg.resolve(e.path).entry.id == e.id  # a checkpoint directory knows its entry
    plain = tmp_path / "some_model"
    plain.mkdir()
    r = reg.resolve(str(plain))
    assert r.entry is None and r.path == str(plain)
    r = reg.resolve("HuggingFaceTB/SmolLM2-135M")
    assert r.entry is None and r.path == "HuggingFaceTB/SmolLM2-135M"
    with pytest.raises(PipelineError, match="neither"):
        reg.resolve("./no/such/dir")


def _writer(root, n, tag):
    reg = Registry(root)
    for i in range(n):
        e = reg.create("pretrain", {"writer": tag, "i": i})
        reg.complete(e, {"eval_loss": float(i)})


def test_two_processes_writing_at_once_corrupt_nothing(tmp_path):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), 25, t)) for t in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    reg = Registry(tmp_path)
    entries = reg.entries()
    assert len(entries) == 50 and len({e.id for e in entries}) == 50
    assert all(e.status == "complete" for e in entries)
    con = sqlite3.connect(reg.db_path)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    for e in entries:  # each manifest agrees with the index
        m = json.loads((tmp_path / "checkpoints" / e.id / "manifest.json").read_text())
        assert m["status"] == "complete" and m["metrics"] == e.metrics


def test_index_rebuilds_from_manifests(tmp_path):
    reg = Registry(tmp_path)
    a = finished(reg, eval_loss=1.0)
    b = finished(reg, "sft", [a.id], gold_score=0.5)
    reg.create("reward", {}, [b.id])
    before = {e.id: e for e in reg.entries()}
    os.remove(reg.db_path)
    assert reg.entries() == []
    assert reg.rebuild() == 3
    after = {e.id: e for e in reg.entries()}
    assert after == before
    assert reg.resolve("sft").entry.parents == [a.id]


def test_resumable_only_when_owner_is_gone(tmp_path):
    reg = Registry(tmp_path)
    e = reg.create("pretrain", {"a": 1}, cfg_hash="h1")
    assert reg.find_resumable("pretrain", "h1") is None  # this process owns it and is alive
    reg.update(e, pid=2 ** 22 + 12345)  # no such process
    assert reg.find_resumable("pretrain", "h1").id == e.id
    assert reg.find_resumable("pretrain", "other") is None
    reg.complete(e, {})
    assert reg.find_resumable("pretrain", "h1") is None


def test_lineage_follows_parents(tmp_path):
    reg = Registry(tmp_path)
    p = finished(reg, eval_loss=1.0)
    s = finished(reg, "sft", [p.id], gold_score=0.5)
    r = finished(reg, "reward", [s.id], eval_accuracy=0.9)
    o = finished(reg, "ppo", [s.id, r.id], gold_score=0.6)
    chain = [(d, e.id) for d, e in reg.lineage(o.id)]
    assert chain == [(0, o.id), (1, s.id), (2, p.id), (1, r.id), (2, s.id), (3, p.id)]


def test_cli_list_json_has_the_contract_fields(tmp_path):
    reg = Registry(tmp_path)
    p = finished(reg, eval_loss=1.0)
    finished(reg, "sft", [p.id], gold_score=0.5)
    out = subprocess.run([PY, "-m", "pipeline.registry", "list", "--json"], cwd=ROOT, env=env_for(tmp_path),
                         capture_output=True, text=True, check=True)
    rows = json.loads(out.stdout)
    assert len(rows) == 2
    for k in ("id", "stage", "status", "path", "parents", "created_at", "finished_at", "metrics",
              "config_hash", "git_sha"):
        assert k in rows[0]
    assert rows[1]["parents"] == [p.id]
    out = subprocess.run([PY, "-m", "pipeline.registry", "lineage", "sft"], cwd=ROOT, env=env_for(tmp_path),
                         capture_output=True, text=True, check=True)
    assert p.id in out.stdout
    out = subprocess.run([PY, "-m", "pipeline.registry", "show", "ppo"], cwd=ROOT, env=env_for(tmp_path),
                         capture_output=True, text=True)
    assert out.returncode == 2 and "make ppo" in out.stderr


def test_an_evaluation_replaces_its_earlier_self_and_nothing_else(tmp_path):
    reg = Registry(tmp_path)
    e = finished(reg, eval_loss=2.0)
    row = lambda task, value, limit=None: {"task": task, "metric": "acc", "value": value, "stderr": 0.1,
                                           "num_fewshot": 0, "limit": limit, "lm_eval_version": "0.4",
                                           "task_version": 1.0, "created_at": "t"}
    reg.record_evaluations(e.id, [row("a", 0.5), row("b", 0.6)])
    reg.record_evaluations(e.id, [row("a", 0.7), row("a", 0.9, limit=10)])
    got = reg.get(e.id)
    assert sorted((r["task"], r["value"], r["limit"]) for r in got.evaluations) == \
        [("a", 0.7, None), ("a", 0.9, 10), ("b", 0.6, None)]
    assert got.status == "complete" and got.metrics == {"eval_loss": 2.0}  # the training record untouched


def test_an_index_from_before_a_new_column_gains_it(tmp_path):
    reg = Registry(tmp_path)
    e = finished(reg, eval_loss=2.0)
    con = sqlite3.connect(reg.db_path)
    con.execute("ALTER TABLE entries DROP COLUMN evaluations")  # the index as an older version wrote it
    con.commit()
    con.close()
    assert reg.get(e.id).evaluations == []
    reg.record_evaluations(e.id, [{"task": "a", "metric": "acc", "value": 1.0, "stderr": None, "num_fewshot": 0,
                                   "limit": None, "lm_eval_version": "0.4", "task_version": 1.0, "created_at": "t"}])
    assert [r["task"] for r in reg.get(e.id).evaluations] == ["a"] and reg.get(e.id).metrics == {"eval_loss": 2.0}
