"""`make all`, run as the README's quickstart says (so the README cannot go stale): the four stages under
one pipeline run id, their lineage, the run report, and the pipeline's wandb runs and model artifacts
(offline)."""
import json
import re
import subprocess

import pytest

from pipeline import demo
from tests.conftest import ROOT, complete_entries, env_for, make, make_vars, registry_entries
from tests.wandb_records import runs_and_artifacts

PIPELINE_ID = "pipeline-test"


def quickstart_commands() -> list[str]:
    """The commands of the Quickstart's code blocks, but `make test`: the test suite itself."""
    section = re.search(r"## Quickstart\n(.*?)\n## ", (ROOT / "README.md").read_text(), re.S).group(1)
    lines = [line.split("#")[0].strip() for block in re.findall(r"```bash\n(.*?)```", section, re.S)
             for line in block.splitlines()]
    assert "make test" in lines
    return [line for line in lines if line and line != "make test"]


@pytest.fixture(scope="module")
def pipeline_home(tmp_path_factory):
    """The quickstart's commands as written, at micro size (and with wandb artifacts on)."""
    home = tmp_path_factory.mktemp("all") / "runs"
    outputs = []
    for cmd in quickstart_commands():
        if cmd.startswith("make "):
            cmd += f' ARGS="experiment=ci logging=wandb registry.wandb_artifacts=true" PIPELINE_ID={PIPELINE_ID} '
            cmd += " ".join(make_vars())
        cmd = cmd.replace("python ", ".venv/bin/python ", 1) if cmd.startswith("python ") else cmd
        r = subprocess.run(cmd, shell=True, cwd=ROOT, env=env_for(home), capture_output=True, text=True,
                           timeout=900)
        assert r.returncode == 0, f"{cmd}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        outputs.append(r.stdout)
    return home, outputs


@pytest.mark.slow
def test_quickstart_runs_the_whole_pipeline(pipeline_home):
    home, outputs = pipeline_home
    assert quickstart_commands()[0] == "make all"
    for stage in ("pretrain", "sft", "reward", "ppo"):  # the registry listing shows what make all left
        assert f"{stage}-" in outputs[-1], outputs[-1]


@pytest.mark.slow
def test_four_complete_entries_with_their_lineage(pipeline_home):
    home, _ = pipeline_home
    entries = registry_entries(home)
    assert sorted(e["stage"] for e in entries) == ["ppo", "pretrain", "reward", "sft"]
    assert all(e["status"] == "complete" for e in entries)
    [pre], [sft], [rw], [ppo] = (complete_entries(home, s) for s in ("pretrain", "sft", "reward", "ppo"))
    assert pre["parents"] == [] and sft["parents"] == [pre["id"]] and rw["parents"] == [sft["id"]]
    assert sorted(ppo["parents"]) == sorted([sft["id"], rw["id"]])
    manifests = [json.loads((ROOT / e["path"] / "manifest.json").read_text()) for e in entries]
    assert {m["pipeline_id"] for m in manifests} == {PIPELINE_ID}


@pytest.mark.slow
def test_summary_table_and_report(pipeline_home):
    home, outputs = pipeline_home
    table = outputs[0][outputs[0].index("stage  "):]
    for e in registry_entries(home):
        assert f"{e['stage']}" in table and e["id"] in table
        if e["stage"] in ("sft", "ppo"):  # the gold gain over the start, with its bootstrap interval
            m = e["metrics"]
            assert m["gold_gain"] == pytest.approx(m["gold_score"] - m["baseline_gold_score"])
            assert m["gold_gain_ci_low"] <= m["gold_gain"] <= m["gold_gain_ci_high"]
            assert f"gold_gain={m['gold_gain']:+.3f} [{m['gold_gain_ci_low']:+.3f}, " in table
    report = home / "pipelines" / PIPELINE_ID
    page = (report / "report.md").read_text()
    for png in ("loss_pretrain.png", "loss_sft.png", "loss_reward.png", "ppo.png"):
        assert (report / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
        assert f"]({png})" in page
    assert "| prompt | SFT | PPO |" in page  # the samples side by side


@pytest.mark.slow
def test_entries_carry_the_per_class_figures_and_the_report_tabulates_them(pipeline_home):
    """Reward accuracy per flaw class, each class's rate in the SFT and PPO samples and in their starts'."""
    home, _ = pipeline_home
    by_stage = {e["stage"]: e["metrics"] for e in registry_entries(home)}
    rm = by_stage["reward"]
    reward = {k.split("/")[1]: v for k, v in rm.items() if k.startswith("eval_accuracy/")}
    assert len(reward) >= 4 and set(reward) <= set(demo.FLAWS)
    for c, acc in reward.items():  # a share of that class's held-out pairs
        n = rm[f"eval_pairs/{c}"]
        assert acc * n == pytest.approx(round(acc * n))
    pairs = sum(rm[f"eval_pairs/{c}"] for c in reward)  # every demo pair names its class: together, the overall figure
    assert rm["eval_accuracy"] == pytest.approx(sum(reward[c] * rm[f"eval_pairs/{c}"] for c in reward) / pairs)
    # each flaw rate is that of the saved samples, as the demo's detectors find them
    sft_rows = [json.loads(l) for l in open(next((home / "checkpoints").glob("sft-*")) / "samples.jsonl")]
    ppo_rows = [json.loads(l) for l in open(next((home / "checkpoints").glob("ppo-*")) / "samples.jsonl")]
    for c in demo.FLAWS:
        assert by_stage["sft"][f"flaw_rate/{c}"] == pytest.approx(sum(c in s["sft_flaws"] for s in sft_rows) / len(sft_rows))
        assert by_stage["sft"][f"baseline_flaw_rate/{c}"] == \
            pytest.approx(sum(c in s["pretrain_flaws"] for s in sft_rows) / len(sft_rows))
        for key, column in ((f"flaw_rate/{c}", "ppo"), (f"baseline_flaw_rate/{c}", "sft")):
            found = [c in demo.detect_flaws(r["prompt"], r[column]) for r in ppo_rows]
            assert by_stage["ppo"][key] == pytest.approx(sum(found) / len(found)), (key, column)
    page = (home / "pipelines" / PIPELINE_ID / "report.md").read_text()
    table = page[page.index("## The demo's flaw classes"):]
    row = next(l for l in table.splitlines() if l.startswith("| swap |"))
    assert f"{by_stage['reward']['eval_accuracy/swap']:.3f}" in row and f"{by_stage['ppo']['flaw_rate/swap']:.3f}" in row


@pytest.mark.slow
def test_make_report_rebuilds_it_and_names_an_unknown_run(pipeline_home):
    home, _ = pipeline_home
    page = home / "pipelines" / PIPELINE_ID / "report.md"
    page.unlink()
    r = make("report", home, PIPELINE_ID=PIPELINE_ID)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert page.exists() and f"Report: {page}" in r.stdout
    r = make("report", home, PIPELINE_ID="no-such-run")
    assert r.returncode != 0 and "no entries of pipeline run 'no-such-run'" in r.stderr
    assert PIPELINE_ID in r.stderr  # and it lists the runs it knows


@pytest.mark.slow
def test_wandb_runs_share_a_group_and_artifacts_follow_the_lineage(pipeline_home):
    home, _ = pipeline_home
    runs, artifacts = runs_and_artifacts(home / "wandb")
    entries = {e["id"]: e for e in registry_entries(home)}
    assert sorted(r.job_type for r in runs) == ["ppo", "pretrain", "reward", "sft"]
    assert {r.run_group for r in runs} == {PIPELINE_ID}
    assert {r.display_name for r in runs} == set(entries)
    models = [a for a in artifacts if a.type == "model"]  # (the PPO samples table is an artifact too)
    assert sorted(a.name for a in models) == sorted(entries)
    for a in models:
        meta = json.loads(a.metadata)
        assert meta["registry_id"] == a.name and meta["pipeline_id"] == PIPELINE_ID
        assert meta["parents"] == [f"{p}:latest" for p in entries[a.name]["parents"]]
        files = {f.path for f in a.manifest.contents}
        assert "model.safetensors" in files and "manifest.json" in files
