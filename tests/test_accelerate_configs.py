"""The ready accelerate configs in conf/accelerate/: each parses with accelerate's own loader, and the DDP
one trains a stage over two CPU processes."""

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType

from tests.conftest import ROOT, make, registry_entries

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


@pytest.mark.slow
def test_ddp_config_trains_over_two_cpu_processes(home):
    r = make("pretrain", home, "experiment=ci", ACCELERATE_CONFIG="conf/accelerate/ddp.yaml", NPROC=2)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "(2 processes, cpu, " in r.stdout
    [e] = registry_entries(home)
    assert e["status"] == "complete" and e["metrics"]["eval_loss"] < e["metrics"]["initial_eval_loss"]
