"""`make all` (python -m pipeline.all): the stages in order under one pipeline id, stopping at the first failure."""
import re
import sys

from pipeline.all import DEFAULT_STAGES, STAGES, main, run_pipeline


class Recorder:
    """Stands in for subprocess.call: records each command and its PIPELINE_ID, fails the module named."""

    def __init__(self, fail_at: str | None = None, status: int = 2):
        self.calls, self.fail_at, self.status = [], fail_at, status

    def __call__(self, cmd, env):
        self.calls.append((cmd, env["PIPELINE_ID"]))
        return self.status if self.fail_at in cmd else 0


def test_stages_run_in_order_with_the_overrides_then_the_report():
    runner = Recorder()
    assert run_pipeline(["accelerate", "launch", "-m"], ["experiment=ci", "seed=3"], {}, runner) == 0
    cmds = [c for c, _ in runner.calls]
    modules = [STAGES[s][1] for s in DEFAULT_STAGES]
    assert cmds[:4] == [["accelerate", "launch", "-m", m, "experiment=ci", "seed=3"] for m in modules]
    assert modules == ["stages.pretrain", "stages.sft", "reward_model.train", "stages.ppo"]
    ids = {i for _, i in runner.calls}
    assert len(ids) == 1 and re.fullmatch(r"pipeline-\d{8}-\d{6}", ids.pop())
    assert cmds[4] == [sys.executable, "-m", "pipeline.report", runner.calls[0][1]]


def test_the_report_reads_the_registry_the_stages_wrote_to():
    runner = Recorder()
    run_pipeline(["python", "-m"], ["registry.root=/data/runs", "seed=1"], {"PIPELINE_ID": "pipeline-r"}, runner)
    assert runner.calls[-1][0] == [sys.executable, "-m", "pipeline.report", "pipeline-r", "--root", "/data/runs"]


def test_benchmarks_evaluate_every_model_of_the_run_before_the_report():
    runner = Recorder()
    assert run_pipeline(["python", "-m"], ["registry.root=/data/runs"], {"PIPELINE_ID": "pipeline-b"}, runner,
                        benchmarks="demo") == 0
    evaluate, report = [c for c, _ in runner.calls[-2:]]
    assert evaluate == [sys.executable, "-m", "pipeline.evaluate", "--pipeline", "pipeline-b", "--tasks", "demo"]
    assert report[:4] == [sys.executable, "-m", "pipeline.report", "pipeline-b"]


def test_a_failed_evaluation_still_writes_the_report_and_gives_its_status(capsys):
    runner = Recorder(fail_at="pipeline.evaluate", status=2)
    assert run_pipeline(["python", "-m"], [], {"PIPELINE_ID": "pipeline-e"}, runner, benchmarks="hellaswag") == 2
    assert runner.calls[-1][0][2] == "pipeline.report"
    assert "the benchmarks (hellaswag) stopped with exit status 2" in capsys.readouterr().err


def test_a_given_pipeline_id_is_kept():
    runner = Recorder()
    run_pipeline(["python", "-m"], [], {"PIPELINE_ID": "pipeline-mine"}, runner)
    assert {i for _, i in runner.calls} == {"pipeline-mine"}


def test_a_failed_stage_stops_the_pipeline_with_the_stage_named(capsys):
    runner = Recorder(fail_at="reward_model.train", status=3)
    assert run_pipeline(["python", "-m"], [], {"PIPELINE_ID": "pipeline-x"}, runner) == 3
    assert [c[-1] for c, _ in runner.calls] == ["stages.pretrain", "stages.sft", "reward_model.train"]  # no ppo, no report
    err = capsys.readouterr().err
    assert "stopped at its reward stage (reward_model.train, exit status 3)" in err
    assert "make reward then make ppo" in err and "PIPELINE_ID=pipeline-x" in err


def test_the_command_line_splits_the_launcher_and_passes_the_overrides(monkeypatch):
    seen = []
    monkeypatch.setattr("pipeline.all.run_pipeline",
                        lambda launch, overrides, stages, benchmarks: seen.append((launch, overrides, stages)) or 0)
    assert main(["--launch", ".venv/bin/accelerate launch --num_processes 2 -m", "--", "experiment=ci",
                 "trainer.max_steps=5"]) == 0
    assert seen == [([".venv/bin/accelerate", "launch", "--num_processes", "2", "-m"],
                     ["experiment=ci", "trainer.max_steps=5"], DEFAULT_STAGES)]


def test_the_other_alignment_methods_join_a_pipeline_and_rloo_is_grpos_algorithm(capsys):
    runner = Recorder(fail_at="stages.dpo")
    assert run_pipeline(["python", "-m"], ["experiment=ci", "grpo.beta=0.1"], {"PIPELINE_ID": "pipeline-y"}, runner,
                        stages=("rloo", "dpo", "grpo")) == 2
    cmds = [c for c, _ in runner.calls]
    assert cmds[0] == ["python", "-m", "stages.grpo", "experiment=ci", "grpo.beta=0.1", "algorithm=rloo"]
    assert cmds[1] == ["python", "-m", "stages.dpo", "experiment=ci"] and len(cmds) == 2
    assert "make dpo then make grpo" in capsys.readouterr().err
    assert run_pipeline(["python", "-m"], [], {}, Recorder(), stages=("pretrain", "dpo0")) == 2
    assert "unknown stage(s) ['dpo0']" in capsys.readouterr().err


def test_each_stage_gets_the_overrides_its_config_has():
    from pipeline.config import overrides_for
    args = ["experiment=ci", "seed=3", "model=medium", "model.hidden_size=128", "tokenizer.vocab_size=8192",
            "eval.num_prompts=8", "+ppo.kl_coef=0.1", "trust_remote_code=true", "no_such_key=1", "-m"]
    assert overrides_for("pretrain", args) == ["experiment=ci", "seed=3", "model=medium", "model.hidden_size=128",
                                               "tokenizer.vocab_size=8192", "no_such_key=1", "-m"]
    assert overrides_for("sft", args) == ["experiment=ci", "seed=3", "eval.num_prompts=8", "trust_remote_code=true",
                                          "no_such_key=1", "-m"]
    assert overrides_for("reward", args) == ["experiment=ci", "seed=3", "trust_remote_code=true", "no_such_key=1", "-m"]
    assert "+ppo.kl_coef=0.1" in overrides_for("ppo", args) and "model=medium" not in overrides_for("ppo", args)


def test_pretraining_keys_reach_pretraining_alone():
    runner = Recorder()
    run_pipeline(["python", "-m"], ["experiment=ci", "model=medium"], {}, runner)
    args = {c[2]: c[3:] for c, _ in runner.calls[:4]}
    assert args["stages.pretrain"] == ["experiment=ci", "model=medium"]
    assert args["stages.sft"] == args["reward_model.train"] == args["stages.ppo"] == ["experiment=ci"]
