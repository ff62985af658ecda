"""The contract every stage follows: its main() returns the registry's key metric for the stage (what `stage:best`
ranks by, so that a Hydra sweep optimises it), its entry records data and tokenizer fingerprints, and the config it
saves holds no key the stage never reads.

Every stage runs here in this process, at micro sizes, one after the other on one registry, while the reads of its
typed config are recorded; the reads its data loader makes on a local file and its LoRA settings make are added,
the paths a demo run without adapters does not take.
"""
import dataclasses
import importlib
import json
import sys

import pytest

import pipeline.run
from pipeline import config as config_module
from pipeline.data import load_corpus, load_preference_data, load_prompt_data, load_sft_data
from pipeline.models import lora_config
from pipeline.registry import KEY_METRICS, Registry
from tests.conftest import compose

TINY = ["experiment=ci", "trainer.max_steps=2", "trainer.logging_steps=1"]
# stage -> (module, its overrides), in the order the stages need one another
STAGES = {
    "pretrain": ("stages.pretrain", ["data.num_documents=400", "tokenizer.train_documents=400"]),
    "sft": ("stages.sft", ["eval.num_prompts=4"]),
    "reward": ("reward_model.train", []),
    "ppo": ("stages.ppo", ["eval.num_prompts=4"]),
    "dpo": ("stages.dpo", ["eval.num_prompts=4"]),
    "grpo": ("stages.grpo", ["eval.num_prompts=4"]),
    "rloo": ("stages.grpo", ["eval.num_prompts=4", "algorithm=rloo"]),
}
# Keys read only on a path no run here takes, each with where it is read.
ELSEWHERE = {
    "logging.project",  # pipeline/tracking.py, with logging=wandb
    "model.trust_remote_code",  # stages/pretrain.py, with a hub model (model.name_or_path)
}
MESSAGES = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
FILE_ROWS = {  # one local file's rows for each loader
    load_corpus: {"text": "Once upon a time there was a cat."},
    load_sft_data: {"messages": MESSAGES},
    load_preference_data: {"prompt": "2 + 2 =", "chosen": "4.", "rejected": "5."},
    load_prompt_data: {"prompt": "Hi"},
}
LOADERS = {"pretrain": load_corpus, "sft": load_sft_data, "reward": load_preference_data,
           "dpo": load_preference_data, "ppo": load_prompt_data, "grpo": load_prompt_data, "rloo": load_prompt_data}


class ConfigReads:
    """Records which settings of a typed config are read: every dataclass of pipeline/config.py answers attribute
    reads through a recorder while it is on (reads by dataclasses' own helpers, such as asdict, are not counted)."""

    def __init__(self):
        self.paths, self.reads = {}, set()
        self.classes = [c for c in vars(config_module).values() if isinstance(c, type) and dataclasses.is_dataclass(c)]
        self.fields = {c: {f.name for f in dataclasses.fields(c)} for c in self.classes}

    def watch(self, typed, prefix: str = "") -> None:
        """Name every section of a typed config by its dotted path."""
        self.paths[id(typed)] = prefix
        for name in self.fields[type(typed)]:
            value = object.__getattribute__(typed, name)
            if dataclasses.is_dataclass(value):
                self.watch(value, f"{prefix}{name}.")

    def __enter__(self):
        recorder = self

        def read(obj, name):
            value = object.__getattribute__(obj, name)
            path = recorder.paths.get(id(obj))
            if path is not None and name in recorder.fields.get(type(obj), ()) \
                    and sys._getframe(1).f_globals.get("__name__") != "dataclasses":
                recorder.reads.add(path + name)
            return value

        for c in self.classes:
            c.__getattribute__ = read
        return self

    def __exit__(self, *exc):
        for c in self.classes:
            del c.__getattribute__


def leaves(config: dict, prefix: str = "") -> set[str]:
    """The dotted keys of a saved config; a dict-valued setting (data.flaw_shares) is one key."""
    out = set()
    for k, v in config.items():
        key = prefix + k
        out |= leaves(v, key + ".") if isinstance(v, dict) and v and key not in DICT_SETTINGS else {key}
    return out


DICT_SETTINGS = {"data.flaw_shares", "data.rename", "trainer.lr_scheduler_kwargs"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each stage run in this process: (what main returned, the keys read, its registry entry)."""
    home = tmp_path_factory.mktemp("contract") / "runs"
    out = {}
    real_validate = pipeline.run.validate
    for stage, (module, own) in STAGES.items():
        typed, reads = [], ConfigReads()

        def validate(cfg):  # the stage's typed config, watched from the moment it exists
            typed.append(real_validate(cfg))
            reads.watch(typed[-1])
            return typed[-1]

        pipeline.run.validate = validate
        try:
            cfg = compose(stage if module != "stages.grpo" else "grpo", [*TINY, *own, f"registry.root={home}"],
                          typed=False)
            with reads:
                returned = importlib.import_module(module).main(cfg)
                run_elsewhere(stage, typed[-1], tmp_path_factory.mktemp(f"{stage}-file"))
        finally:
            pipeline.run.validate = real_validate
        out[stage] = returned, reads.reads, Registry(home).resolve(f"{stage}:latest").entry
    return out


def run_elsewhere(stage: str, typed, tmp) -> None:
    """The paths a micro demo run does not take: the stage's data read from a local file, and LoRA adapters."""
    loader = LOADERS[stage]
    path = tmp / "rows.jsonl"
    path.write_text("".join(json.dumps(FILE_ROWS[loader]) + "\n" for _ in range(20)))
    typed.data.kind, typed.data.path = "file", str(path)
    loader(typed.data, 0, tmp, *([4] if loader is load_prompt_data else []))
    if hasattr(typed, "peft"):
        typed.peft.method = "lora"
        lora_config(typed.peft, "CAUSAL_LM")


@pytest.mark.slow
@pytest.mark.parametrize("stage", list(STAGES))
def test_main_returns_the_key_metric_stage_best_ranks_by(runs, stage):
    returned, _, entry = runs[stage]
    key = KEY_METRICS[stage][0]
    assert entry.status == "complete" and returned == pytest.approx(entry.metrics[key])


@pytest.mark.slow
@pytest.mark.parametrize("stage", list(STAGES))
def test_every_entry_records_its_data_and_tokenizer_fingerprints(runs, stage):
    _, _, entry = runs[stage]
    assert len(entry.data_fingerprint) == 16 and len(entry.tokenizer_fingerprint) == 16


@pytest.mark.slow
@pytest.mark.parametrize("stage", list(STAGES))
def test_the_saved_config_holds_only_keys_the_stage_reads(runs, stage):
    _, reads, entry = runs[stage]
    assert {"trainer.max_steps", "data.kind", "seed"} <= reads  # the recorder sees reads
    unread = leaves(entry.config) - reads - ELSEWHERE
    assert not unread, f"{stage} saves keys it never reads: {sorted(unread)}"


def test_the_recorder_names_reads_by_path_and_ignores_asdict():
    cfg = compose("ppo")
    with ConfigReads() as reads:
        reads.watch(cfg)
        cfg.ppo.kl_coef, cfg.trainer.max_steps
        dataclasses.asdict(cfg)
    assert reads.reads == {"ppo", "ppo.kl_coef", "trainer", "trainer.max_steps"}
    assert leaves({"data": {"flaw_shares": {"swap": 1}, "kind": "demo"}, "seed": 0}) == \
        {"data.flaw_shares", "data.kind", "seed"}
