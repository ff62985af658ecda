"""Every shipped config composes and validates; bad keys, types and values are refused by name."""
import copy
import functools

import pytest
import yaml
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig, OmegaConf

from pipeline.config import overrides_for, refuse_keys_of_other_stages, validate
from pipeline.errors import PipelineError
from tests.conftest import CONF, compose

PRIMARY = ["pretrain", "sft", "reward", "ppo", "dpo", "grpo"]
# Options that need a value the user supplies.
REQUIRED = {("model", "hub"): ["model.name_or_path=org/model"], ("data", "local"): ["data.path=corpus.txt"]}


@functools.lru_cache(maxsize=None)
def _composed(name: str, overrides: tuple) -> DictConfig:
    return compose(name, overrides, typed=False)


def compose_cfg(name, overrides=()):
    """The composed config (each composition done once: a test may change its copy)."""
    return copy.deepcopy(_composed(name, tuple(overrides)))


def default_choices(primary: str) -> dict[str, str]:
    """group -> the option the primary config picks by default."""
    defaults = yaml.safe_load((CONF / f"{primary}.yaml").read_text())["defaults"]
    return {k: v for d in defaults if isinstance(d, dict) for k, v in d.items()}


def group_options():
    """(primary, group, option) for every option of every group a primary config uses."""
    for primary in PRIMARY:
        for group in sorted(default_choices(primary)):
            for option in sorted((CONF / group).glob("*.yaml")):
                yield primary, group, option.stem


def test_every_config_file_is_used():
    used = {(g, o) for _, g, o in group_options()}
    shipped = {(p.parent.name, p.stem) for p in CONF.glob("*/*.yaml") if p.parent.name != "accelerate"}
    assert shipped == used


@pytest.mark.parametrize("primary,group,option", list(group_options()))
def test_every_shipped_config_composes_and_validates(primary, group, option):
    composed = compose_cfg(primary, [f"{group}={option}", *REQUIRED.get((group, option), [])])
    validate(composed)
    # the option is what was composed: another option than the default changes the config
    same = OmegaConf.to_container(composed) == OmegaConf.to_container(compose_cfg(primary, REQUIRED.get((group, option), [])))
    # (experiment=demo-gpu sets nothing GRPO reads: its GPU settings are the other stages')
    unchanged = group == "hydra" or (group, option, primary) == ("experiment", "demo-gpu", "grpo")
    assert same == (option == default_choices(primary)[group] or unchanged)


def test_ci_experiment_is_micro():
    cfg = validate(compose_cfg("pretrain", ["experiment=ci"]))
    demo = validate(compose_cfg("pretrain"))
    assert cfg.model.hidden_size < demo.model.hidden_size
    assert cfg.trainer.max_steps < demo.trainer.max_steps
    assert cfg.logging.backend == "none" and demo.logging.backend == "wandb"
    # a key on the command line wins over the experiment's
    assert validate(compose_cfg("pretrain", ["experiment=ci", "model.hidden_size=256"])).model.hidden_size == 256


@pytest.mark.parametrize("stage", ["sft", "reward", "ppo", "dpo", "grpo"])
def test_a_finetuning_stage_has_no_architecture_or_tokenizer_section(stage):
    """No architecture or BPE section after pretraining (the model comes from init_from); eval where it generates."""
    cfg = OmegaConf.to_container(compose_cfg(stage, ["experiment=ci"]))
    assert "model" not in cfg and "tokenizer" not in cfg and cfg["trust_remote_code"] is False
    assert ("eval" in cfg) == (stage != "reward")
    pretrain = OmegaConf.to_container(compose_cfg("pretrain", ["experiment=ci"]))
    assert "hidden_size" in pretrain["model"] and "vocab_size" in pretrain["tokenizer"] and "eval" not in pretrain


# What each stage's data and trainer sections hold beyond what every stage's do.
OWN_KEYS = {
    "pretrain": {"data": {"text_field", "num_documents", "block_size", "max_eval_blocks"},
                 "trainer": {"save_steps", "save_total_limit"}},
    "sft": {"data": {"rename", "skip_bad_rows", "num_examples", "flaw_shares", "flawed_share", "max_eval_examples",
                     "max_length"}, "trainer": {"save_steps", "save_total_limit", "group_by_length"}},
    "reward": {"data": {"rename", "skip_bad_rows", "num_examples", "flaw_shares", "swap_elements", "max_eval_examples",
                        "max_length"},
               "trainer": {"save_steps", "save_total_limit", "group_by_length"}},
    "dpo": {"data": {"rename", "skip_bad_rows", "num_examples", "flaw_shares", "swap_elements", "max_eval_examples",
                     "max_length"},
            "trainer": {"save_steps", "save_total_limit"}},
    "ppo": {"data": {"rename", "skip_bad_rows", "num_examples"}, "trainer": set()},
    "grpo": {"data": {"rename", "skip_bad_rows", "num_examples"}, "trainer": {"save_steps", "save_total_limit"}},
}


@pytest.mark.parametrize("stage", sorted(OWN_KEYS))
def test_each_stage_has_the_data_and_trainer_keys_of_its_kind(stage):
    """A corpus for pretraining, demonstrations for SFT, pairs for reward and DPO, prompts for PPO and GRPO; PPO,
    which saves every ppo.save_every updates, has no checkpoint settings in its trainer section."""
    cfg = OmegaConf.to_container(compose_cfg(stage))
    common = {"kind", "path", "hub_config", "split", "sample_by", "max_rows", "eval_fraction"}
    assert set(cfg["data"]) == common | OWN_KEYS[stage]["data"]
    assert set(cfg["trainer"]) - set(compose_cfg("ppo")["trainer"]) == OWN_KEYS[stage]["trainer"]


def test_rloo_has_no_grpo_loss_settings_and_an_unknown_algorithm_is_named():
    rloo, grpo = compose("grpo", ["algorithm=rloo"]), compose("grpo")
    assert rloo.algorithm == "rloo" and not hasattr(rloo.grpo, "loss_type")
    assert grpo.grpo.loss_type == "dapo" and grpo.grpo.gold_every == rloo.grpo.gold_every
    with pytest.raises(ConfigCompositionException) as e:
        compose_cfg("grpo", ["algorithm=ppo"])
    assert "algorithm/ppo" in str(e.value) and "rloo" in str(e.value)


def test_make_all_gives_each_stage_only_the_keys_it_reads():
    args = ["data.block_size=128", "model=medium", "data=local", "+data.flaw_shares.swap=1", "trainer.save_steps=5",
            "ppo.kl_coef=0.1", "grpo.loss_type=grpo", "experiment=ci", "no_such_key=1"]
    assert overrides_for("pretrain", args) == ["data.block_size=128", "model=medium", "data=local",
                                               "trainer.save_steps=5", "experiment=ci", "no_such_key=1"]
    assert overrides_for("ppo", args) == ["data=local", "ppo.kl_coef=0.1", "experiment=ci", "no_such_key=1"]
    assert overrides_for("reward", args) == ["data=local", "+data.flaw_shares.swap=1", "trainer.save_steps=5",
                                             "experiment=ci", "no_such_key=1"]
    assert "grpo.loss_type=grpo" in overrides_for("grpo", args) and "grpo.loss_type=grpo" not in overrides_for("rloo", args)


@pytest.mark.parametrize("stage,override,readers", [
    ("ppo", "data.block_size=128", "pretrain reads it"),
    ("sft", "model.hidden_size=64", "pretrain reads it"),
    ("ppo", "trainer.save_steps=5", "pretrain, sft, reward, dpo, grpo, rloo read it"),
    ("reward", "data.flawed_share=0.5", "sft reads it"),
    ("grpo", "ppo.kl_coef=0.1", "ppo reads it"),
])
def test_a_key_of_another_stage_is_refused_naming_the_stages_that_read_it(stage, override, readers, capsys):
    with pytest.raises(SystemExit) as e:
        refuse_keys_of_other_stages(stage, ["experiment=ci", override])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"is not a setting of {stage}: {readers}" in err and override.split("=")[0] in err


def test_rloo_refuses_grpo_loss_settings_and_keys_of_its_own_pass():
    with pytest.raises(SystemExit):
        refuse_keys_of_other_stages("grpo", ["algorithm=rloo", "grpo.loss_type=grpo"])
    refuse_keys_of_other_stages("grpo", ["grpo.loss_type=grpo", "data=local", "no_such_key=1", "-m"])


@pytest.mark.parametrize("override,match", [
    ("no_such_key=1", "no_such_key"),
    ("trainer.no_such=1", "no_such"),
    ("trainer.max_steps=many", "max_steps"),
    ("trainer.learning_rate=fast", "learning_rate"),
])
def test_unknown_keys_and_wrong_types_are_refused(override, match):
    with pytest.raises(ConfigCompositionException) as e:
        compose_cfg("pretrain", [override])
    assert match in str(e.value) + str(e.value.__cause__)


@pytest.mark.parametrize("overrides,match", [
    (["model=hub"], "model.name_or_path"),
    (["data=local"], "data.path"),
    (["data.kind=ftp"], "data.kind"),
    (["data.eval_fraction=0.9"], "eval_fraction"),
    (["trainer.max_steps=0"], "max_steps"),
    (["model.num_heads=3"], "num_heads"),
    (["resume=sometimes"], "resume"),
    (["model=hub", "model.name_or_path=x/y", "tokenizer.path=pretrain:latest"], "brings its own tokenizer"),
])
def test_bad_values_are_named(overrides, match):
    with pytest.raises(PipelineError, match=match):
        validate(compose_cfg("pretrain", overrides))


def test_unknown_sft_batching_is_named():
    with pytest.raises(PipelineError, match="batching must be auto, padded or padding_free"):
        validate(compose_cfg("sft", ["batching=sometimes"]))


@pytest.mark.parametrize("stage", ["pretrain", "sft", "reward", "ppo"])
def test_demo_gpu_experiment_composes_with_each_stages_own_steps(stage):
    """experiment=demo-gpu: a larger model, swaps at about half the flawed rows, and per stage its own budget."""
    gpu, cpu = validate(compose_cfg(stage, ["experiment=demo-gpu"])), validate(compose_cfg(stage, []))
    if stage == "pretrain":  # the later stages start from its checkpoint
        assert gpu.model.hidden_size > cpu.model.hidden_size
    if stage in ("sft", "reward"):  # the stages that learn from flawed responses
        shares = gpu.data.flaw_shares
        assert shares["swap"] / sum(shares.values()) > 0.3 > cpu.data.flaw_shares["swap"] / sum(cpu.data.flaw_shares.values())
    assert gpu.trainer.per_device_train_batch_size > cpu.trainer.per_device_train_batch_size
    if stage in ("reward", "ppo"):
        assert gpu.trainer.max_steps > cpu.trainer.max_steps


def test_an_unknown_flaw_class_is_refused_by_name():
    with pytest.raises(PipelineError, match="unknown flaw class.*'swapp'"):
        validate(compose_cfg("reward", ["+data.flaw_shares.swapp=0.2"]))
    with pytest.raises(PipelineError, match="non-negative"):
        validate(compose_cfg("sft", ["data.flaw_shares.swap=-1"]))
