"""Export with a model card from the registry, and push's refusals without a network or a token."""
import json
import subprocess

import pytest
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM

from pipeline.card import model_card
from pipeline.registry import Registry
from tests.conftest import PY, ROOT, env_for


def test_card_names_hub_base_model_datasets_and_every_ancestor(tmp_path):
    reg = Registry(tmp_path)
    pre = reg.complete(reg.create("pretrain", {"model": {"name_or_path": "HuggingFaceTB/SmolLM2-135M"},
                                               "data": {"kind": "hub", "path": "roneneldan/TinyStories"}}), {})
    sft = reg.complete(reg.create("sft", {"init_from": "pretrain:latest", "data": {"kind": "demo"},
                                          "trainer": {"max_steps": 7, "learning_rate": 1e-4}}, [pre.id]),
                       {"gold_score": 0.7})
    rm = reg.complete(reg.create("reward", {"init_from": sft.id, "data": {
        "kind": "hub", "path": "trl-lib/ultrafeedback_binarized"}}, [sft.id]), {"eval_accuracy": 0.9})
    ppo = reg.complete(reg.create("ppo", {"init_from": "sft", "reward_model": "reward:latest",
                                          "data": {"kind": "file", "path": "/data/prompts.jsonl"}}, [sft.id, rm.id]),
                       {"gold_score": 0.8, "kl": 1.5})
    card = ModelCard(str(model_card(reg, reg.get(ppo.id), license="apache-2.0")))  # parses back
    assert card.data.license == "apache-2.0" and card.data.pipeline_tag == "text-generation"
    assert card.data.base_model == ["HuggingFaceTB/SmolLM2-135M"]
    assert card.data.datasets == ["roneneldan/TinyStories", "trl-lib/ultrafeedback_binarized"]
    assert {"llm-pipeline", "sft", "reward-model", "rlhf", "ppo"} <= set(card.data.tags)
    for e in (pre, sft, rm, ppo):
        assert f"`{e.id}`" in card.text
    assert "pretrain → sft → reward → ppo" in card.text and "local file `prompts.jsonl`" in card.text
    assert "| kl | 1.5 |" in card.text and "max_steps 7, learning_rate 0.0001" in card.text


@pytest.mark.slow
def test_export_writes_a_loadable_folder_with_its_card(ci_fine_tuned, tmp_path):
    out = tmp_path / "export"
    r = subprocess.run([PY, "-m", "pipeline.registry", "export", "sft:latest", str(out), "--license", "mit"],
                       cwd=ROOT, env=env_for(ci_fine_tuned), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    reg = Registry(ci_fine_tuned)
    sft = reg.resolve("sft").entry
    card = ModelCard.load(out / "README.md")
    assert card.data.license == "mit" and "sft" in card.data.tags
    assert f"`{sft.id}`" in card.text and f"`{sft.parents[0]}`" in card.text
    assert [e["id"] for e in json.loads((out / "lineage.json").read_text())] == [sft.id, sft.parents[0]]
    assert not (out / "manifest.json").exists() and not (out / "trainer").exists()
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.num_parameters() > 0 and (out / "tokenizer.json").exists()

    # an existing folder is never written into
    before = sorted(p.name for p in out.iterdir())
    again = subprocess.run([PY, "-m", "pipeline.registry", "export", "sft:latest", str(out)], cwd=ROOT,
                           env=env_for(ci_fine_tuned), capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "not an empty directory" in again.stderr
    assert sorted(p.name for p in out.iterdir()) == before


@pytest.mark.slow
@pytest.mark.parametrize("env, says", [
    ({"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE is set"),
    ({"HF_HUB_OFFLINE": "0", "HF_TOKEN": ""}, "no Hugging Face token"),
    ({"HF_HUB_OFFLINE": "0", "HF_TOKEN": "hf_not_a_token", "HF_ENDPOINT": "http://127.0.0.1:9"}, "failed"),
])
def test_push_without_network_or_token_exits_2_without_a_traceback(ci_fine_tuned, tmp_path, env, says):
    env = {**env_for(ci_fine_tuned, HF_HOME=str(tmp_path / "hf")), **env}
    r = subprocess.run([PY, "-m", "pipeline.registry", "push", "sft:latest", "--repo-id", "someone/some-model"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and says in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stdout + r.stderr
