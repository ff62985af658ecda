"""Going to a cluster: Hydra's submitit launchers (a local sweep as jobs, the SLURM launcher's keys) and the
multi-node sbatch script's accelerate commands."""
import os
import subprocess
from pathlib import Path

import pytest
from accelerate.commands.launch import launch_command_parser

from tests.conftest import ROOT, compose, copy_registry, make, registry_entries

SBATCH = ROOT / "conf" / "slurm" / "multinode.sbatch"


def test_slurm_launcher_takes_partition_gpus_nodes_and_time():
    cfg = compose("sft", ["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=2",
                          "hydra.launcher.timeout_min=30"], typed=False, hydra=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.partition, launcher.gpus_per_node, launcher.nodes, launcher.timeout_min) == ("gpu", 2, 1, 30)


def fake_slurm(tmp_path: Path) -> Path:
    """srun that runs its command once per node with that node's SLURM_NODEID, scontrol that expands the node
    list, and an accelerate that prints the command it was given."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scripts = {
        "srun": 'for ((i = 0; i < SLURM_NNODES; i++)); do SLURM_NODEID=$i "${@: -3}"; done',
        "scontrol": 'for i in $(seq -f "%03g" 1 "$SLURM_NNODES"); do echo "gpu$i"; done',
        "accelerate": 'echo "accelerate $*"',
    }
    for name, body in scripts.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    return bin_dir


@pytest.mark.parametrize("nodes, gpus", [(1, 8), (3, 4)])
def test_multinode_script_runs_accelerate_once_per_node(tmp_path, nodes, gpus):
    bin_dir = fake_slurm(tmp_path)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_NNODES=str(nodes),
               SLURM_GPUS_ON_NODE=str(gpus), SLURM_JOB_NODELIST=f"gpu[001-{nodes:03d}]", PIPELINE_HOME="/shared/runs",
               ACCELERATE="accelerate")
    r = subprocess.run(["bash", str(SBATCH), "sft", "model=llama-125m trainer.mixed_precision=bf16"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    commands = [line.split()[1:] for line in r.stdout.splitlines() if line.startswith("accelerate ")]
    assert len(commands) == nodes
    for rank, argv in enumerate(commands):
        assert argv[0] == "launch"
        args = launch_command_parser().parse_args(argv[1:])  # accelerate's own parser takes it
        assert (args.num_machines, args.machine_rank, args.num_processes) == (nodes, rank, nodes * gpus)
        assert (args.main_process_ip, args.main_process_port) == ("gpu001", 29500)
        assert args.config_file == "conf/accelerate/ddp.yaml" and args.module
        assert args.training_script == "stages.sft"
        assert args.training_script_args == ["model=llama-125m", "trainer.mixed_precision=bf16"]


def test_multinode_script_refuses_a_bad_stage_or_no_shared_home(tmp_path):
    env = dict(os.environ, PATH=f"{fake_slurm(tmp_path)}:{os.environ['PATH']}", SLURM_NNODES="2",
               SLURM_JOB_NODELIST="gpu[001-002]")
    env.pop("PIPELINE_HOME", None)
    r = subprocess.run(["bash", str(SBATCH), "sft"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode != 0 and "PIPELINE_HOME" in r.stderr
    r = subprocess.run(["bash", str(SBATCH), "finetune"], cwd=ROOT, env=dict(env, PIPELINE_HOME="/shared"),
                       capture_output=True, text=True)
    assert r.returncode == 2 and "unknown stage 'finetune'" in r.stderr


@pytest.mark.slow
def test_submitit_local_sweep_runs_as_two_jobs_with_one_parent(ci_pretrained, tmp_path):
    home = copy_registry(ci_pretrained, tmp_path)
    [pretrained] = registry_entries(home, "pretrain")
    r = make("sft", home, "experiment=ci eval.num_prompts=4 hydra/launcher=submitit_local -m "
                          "trainer.learning_rate=1e-3,3e-3")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "Submitit 'local' sweep output dir" in r.stdout
    sfts = registry_entries(home, "sft")
    assert [e["status"] for e in sfts] == ["complete", "complete"]
    assert all(e["parents"] == [pretrained["id"]] for e in sfts)
    assert sorted(e["config"]["trainer"]["learning_rate"] for e in sfts) == [1e-3, 3e-3]
    assert len(list(home.glob("hydra/sft-multirun/*/.submitit/*"))) >= 2  # each ran as its own job
