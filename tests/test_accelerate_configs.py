"""The ready accelerate configs in conf/accelerate/: each parses with accelerate's own loader, and the DDP
one trains a stage over two CPU processes."""

import contextlib
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType

from transformers import AutoModelForCausalLM

from pipeline.trainer import resolved_precision
from tests.conftest import ROOT, env_for, kill, make, registry_entries, saved_checkpoint

CONFIGS = {
    "single_gpu.yaml": DistributedType.NO,
    "ddp.yaml": DistributedType.MULTI_GPU,
    "fsdp.yaml": DistributedType.FSDP,
    "deepspeed_zero2.yaml": DistributedType.DEEPSPEED,
    "deepspeed_zero3.yaml": DistributedType.DEEPSPEED,
}


def test_every_config_is_listed_here():
    assert sorted(p.name for p in (ROOT / "conf" / "accelerate").glob("*.yaml")) == sorted(CONFIGS)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_config_parses_with_accelerates_loader(name):
    cfg = load_config_from_file(str(ROOT / "conf" / "accelerate" / name))
    assert cfg.distributed_type == CONFIGS[name]
    assert cfg.mixed_precision == "no"  # precision comes from the stage config alone
    if name.startswith("deepspeed"):
        assert cfg.deepspeed_config["zero_stage"] == int(name[-6])
    if name == "fsdp.yaml":
        assert cfg.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"  # one plain HF directory on save


@pytest.mark.parametrize("name", ["deepspeed_zero2.yaml", "deepspeed_zero3.yaml"])
def test_deepspeed_config_parses_with_deepspeeds_own_config_class(name):
    """The DeepSpeed config accelerate builds from ours, its "auto" values filled from the stage's trainer
    arguments as the Trainer fills them, is one DeepSpeed accepts (needs `pip install -e .[deepspeed]`)."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (the optional extra: pip install -e "
                                            "'.[deepspeed]'); its GPU kernels are not needed to parse a config")
    from accelerate.utils import DeepSpeedPlugin
    from deepspeed.runtime.config import DeepSpeedConfig
    from transformers import TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    plugin = DeepSpeedPlugin(**load_config_from_file(str(ROOT / "conf" / "accelerate" / name)).deepspeed_config)
    hf = HfTrainerDeepSpeedConfig(plugin.deepspeed_config)
    hf.trainer_config_process(TrainingArguments(output_dir="unused", per_device_train_batch_size=8,
                                                gradient_accumulation_steps=2, max_grad_norm=1.0, use_cpu=True))
    ds = DeepSpeedConfig(hf.config)
    assert ds.zero_optimization_stage == int(name[-6])
    assert (ds.train_micro_batch_size_per_gpu, ds.gradient_accumulation_steps, ds.gradient_clipping) == (8, 2, 1.0)
    # ZeRO-3 gathers the sharded weights into one Hugging Face checkpoint on save
    assert ds.zero_config.gather_16bit_weights_on_model_save == (name == "deepspeed_zero3.yaml")


@pytest.mark.slow
def test_ddp_config_trains_over_two_cpu_processes(home):
    r = make("pretrain", home, "experiment=ci", ACCELERATE_CONFIG="conf/accelerate/ddp.yaml", NPROC=2)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "(2 processes, DDP, cpu, " in r.stdout
    [e] = registry_entries(home)
    assert e["status"] == "complete" and e["metrics"]["eval_loss"] < e["metrics"]["initial_eval_loss"]


def launch_fsdp(home: Path, stage_module: str, args: str) -> subprocess.Popen:
    """The stage over two CPU processes with conf/accelerate/fsdp.yaml, FSDP2 over gloo (tests/fsdp_on_cpu.py:
    accelerate itself would train data-parallel on CPU), in its own process group."""
    cmd = [str(ROOT / ".venv" / "bin" / "accelerate"), "launch", "--quiet", "--config_file",
           str(ROOT / "conf" / "accelerate" / "fsdp.yaml"), "--num_processes", "2",
           "--num_cpu_threads_per_process", "1", "-m", "tests.fsdp_on_cpu", stage_module, *args.split()]
    return subprocess.Popen(cmd, cwd=ROOT, env=env_for(home), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


@pytest.mark.slow
def test_fsdp_run_saves_a_plain_directory_and_resumes(home):
    """Killed after its first (sharded) trainer checkpoint, the FSDP run resumes from it and completes one entry
    whose checkpoint transformers loads alone."""
    args = "experiment=ci optimizer=adamw trainer.max_steps=120 trainer.save_steps=10 trainer.logging_steps=1000"
    p = launch_fsdp(home, "stages.pretrain", args)
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None and not saved_checkpoint(home):
        time.sleep(0.2)
    assert p.poll() is None, "the FSDP run ended before its first trainer checkpoint:\n" + p.communicate()[0][-3000:]
    workers = psutil.Process(p.pid).children(recursive=True)  # torch's launcher starts them in their own sessions
    for w in workers:
        with contextlib.suppress(psutil.NoSuchProcess):
            w.kill()
    psutil.wait_procs(workers, timeout=30)
    kill(p)
    [killed] = registry_entries(home)
    assert killed["status"] == "running"
    assert list(Path(killed["path"]).glob("trainer/checkpoint-*/pytorch_model_fsdp*"))  # saved by the FSDP path

    out = launch_fsdp(home, "stages.pretrain", args).communicate(timeout=600)[0]
    precision = "fp32" if resolved_precision("auto", "pretrain") == "no" else "bf16 autocast"
    assert f"Resuming {killed['id']} from" in out and f"(2 processes, FSDP, cpu, {precision})" in out, out[-3000:]
    assert "WARNING" not in out
    [e] = registry_entries(home)
    assert e["id"] == killed["id"] and e["status"] == "complete" and e["metrics"]["global_step"] == 120
    assert e["metrics"]["eval_loss"] < e["metrics"]["initial_eval_loss"]
    model = AutoModelForCausalLM.from_pretrained(e["path"])
    assert model.num_parameters() == e["metrics"]["parameters"]

    # fine-tuned under FSDP too: the main process evaluates the gathered checkpoint, as the sharded model cannot
    # run on one process alone
    out = launch_fsdp(home, "stages.sft", "experiment=ci eval.num_prompts=4").communicate(timeout=600)[0]
    [sft] = registry_entries(home, "sft")
    assert sft["status"] == "complete" and sft["parents"] == [e["id"]], out[-3000:]
    assert "gold_score" in sft["metrics"] and sft["note"] is None, out[-3000:]


@pytest.mark.slow
def test_fsdp_config_on_cpu_says_it_trains_data_parallel(home):
    """Without the test helper, accelerate runs the FSDP config as DDP on CPU: the run says so."""
    r = make("pretrain", home, "experiment=ci trainer.max_steps=4", ACCELERATE_CONFIG="conf/accelerate/fsdp.yaml",
             NPROC=2)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "asks for FSDP, but accelerate runs it only on GPUs" in r.stdout and "(2 processes, DDP, cpu" in r.stdout
