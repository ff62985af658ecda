"""Export a checkpoint as a self-contained Hugging Face folder with a model card written from the registry, and
push it to the Hub.

    python -m pipeline.registry export REF DIR [--license L]
    python -m pipeline.registry push REF --repo-id ORG/NAME [--private] [--license L]

The card (README.md) opens with the Hub's YAML front matter (license, tags, base model and datasets where the
lineage names hub ones) and gives the entry's lineage (every ancestor entry), metrics, the stages it went through
with their main settings, its resolved training config and what reproduces it (git sha, fingerprints, versions).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import yaml

from pipeline.errors import PipelineError
from pipeline.registry import KEY_METRICS, STAGES, Entry, Registry, looks_like_hub_id

# What a Hugging Face model folder holds: weights, configs, tokenizer, chat template; the registry's own files
# (manifest, trainer checkpoints, evaluation samples) stay behind. The training config comes along.
HF_FILES = ("*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json", "tokenizer*",
            "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "vocab.*", "merges.txt",
            "*.model", "pipeline_config.yaml")
STAGE_TAGS = {"pretrain": ["causal-lm"], "sft": ["sft"], "reward": ["reward-model"], "ppo": ["rlhf", "ppo"],
              "dpo": ["dpo"], "grpo": ["grpo"], "rloo": ["rloo"]}
STAGE_WHAT = {"pretrain": "Pretrained (causal language modelling)", "sft": "Supervised fine-tuned",
              "reward": "Reward model", "ppo": "RLHF (PPO against a reward model)", "dpo": "DPO-aligned",
              "grpo": "GRPO-aligned", "rloo": "RLOO-aligned"}


def ancestors(registry: Registry, entry: Entry) -> list[Entry]:
    """The entry and every ancestor, each once, every entry before its parents: the entry first, the roots last."""
    order: dict[str, Entry] = {}

    def visit(e: Entry) -> None:  # parents first
        for pid in e.parents:
            parent = registry.get(pid)
            if parent is not None and pid not in order:
                visit(parent)
        order.setdefault(e.id, e)

    visit(entry)
    return list(reversed(order.values()))


def _hub_sources(registry: Registry, chain: list[Entry]) -> tuple[list[str], list[str]]:
    """(base models, datasets): the hub ids the lineage started from and trained on, the oldest first."""
    models, data = [], []
    for e in reversed(chain):
        model = e.config.get("model") or {}
        source = model.get("name_or_path") if e.stage == "pretrain" else e.config.get("init_from")
        registry_ref = source and (source.partition(":")[0] in STAGES or registry.get(source) is not None)
        if source and not registry_ref and looks_like_hub_id(source) and source not in models:
            models.append(source)
        d = e.config.get("data") or {}
        if d.get("kind") == "hub" and d.get("path") not in data:
            data.append(d["path"])
    return models, data


def _metric(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _key_metric(e: Entry) -> str:
    key = KEY_METRICS.get(e.stage, ("", True))[0]
    return f"{key} {_metric(e.metrics[key])}" if key in e.metrics else ""


def _data(e: Entry) -> str:
    d = e.config.get("data") or {}
    return {"demo": "built-in demo task", "hub": f"hub dataset `{d.get('path')}`",
            "file": f"local file `{Path(str(d.get('path'))).name}`"}.get(d.get("kind"), str(d.get("kind", "")))


def _settings(e: Entry) -> str:
    t = e.config.get("trainer") or {}
    parts = [f"{k} {t[k]}" for k in ("max_steps", "learning_rate", "per_device_train_batch_size") if k in t]
    if (e.config.get("peft") or {}).get("method", "none") != "none":
        parts.append(f"LoRA r={e.config['peft'].get('r')}")
    return ", ".join(parts)


def model_card(registry: Registry, entry: Entry, license: str = "other"):
    """The entry's model card (huggingface_hub.ModelCard), generated from the registry alone."""
    from huggingface_hub import ModelCard, ModelCardData

    chain = ancestors(registry, entry)
    base_models, datasets = _hub_sources(registry, chain)
    stages = [e.stage for e in reversed(chain)]
    reward = entry.stage == "reward"
    tags = ["llm-pipeline", "trl"] + [t for s in dict.fromkeys(stages) for t in STAGE_TAGS.get(s, [s])]
    data = ModelCardData(license=license, library_name="transformers", tags=tags,
                         pipeline_tag="text-classification" if reward else "text-generation",
                         base_model=base_models or None, datasets=datasets or None)
    use = ("from transformers import AutoModelForSequenceClassification, AutoTokenizer\n\n"
           "MODEL = \"path/or/org/name\"  # this folder, or its Hub repository\n"
           "tok = AutoTokenizer.from_pretrained(MODEL)\n"
           "model = AutoModelForSequenceClassification.from_pretrained(MODEL)\n"
           "chat = [{\"role\": \"user\", \"content\": \"...\"}, {\"role\": \"assistant\", \"content\": \"...\"}]\n"
           "score = model(**tok(tok.apply_chat_template(chat, tokenize=False), return_tensors=\"pt\")).logits[0, 0]"
           if reward else
           "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
           "MODEL = \"path/or/org/name\"  # this folder, or its Hub repository\n"
           "tok = AutoTokenizer.from_pretrained(MODEL)\n"
           "model = AutoModelForCausalLM.from_pretrained(MODEL)\n"
           "ids = tok.apply_chat_template([{\"role\": \"user\", \"content\": \"Hello\"}], add_generation_prompt=True,\n"
           "                              return_tensors=\"pt\")\n"
           "print(tok.decode(model.generate(ids, max_new_tokens=64)[0, ids.shape[1]:], skip_special_tokens=True))")
    lineage = "\n".join(f"| `{e.id}` | {e.stage} | {e.finished_at or ''} | {_key_metric(e)} | {_data(e)} | "
                        f"{', '.join(f'`{p}`' for p in e.parents) or '-'} |" for e in chain)
    metrics = "\n".join(f"| {k} | {_metric(v)} |" for k, v in sorted(entry.metrics.items()))
    went = "\n".join(f"{i}. **{e.stage}** (`{e.id}`): {_data(e)}; {_settings(e)}"
                     for i, e in enumerate(reversed(chain), start=1))
    versions = ", ".join(f"{k} {v}" for k, v in entry.versions.items())
    body = f"""
# {entry.id}

{STAGE_WHAT.get(entry.stage, entry.stage)} checkpoint, made by llm-pipeline through {' → '.join(stages)}.
Everything below is generated from the checkpoint registry.

## Use

```python
{use}
```

## Lineage

Every checkpoint this one was made from, newest first.

| entry | stage | finished | key metric | data | parents |
|---|---|---|---|---|---|
{lineage}

## Training

{went}

## Metrics of `{entry.id}`

| metric | value |
|---|---|
{metrics}

## Training config of `{entry.id}`

<details>
<summary>resolved Hydra config (also in pipeline_config.yaml)</summary>

```yaml
{yaml.safe_dump(entry.config, sort_keys=False).strip()}
```

</details>

## Reproducibility

- git commit: `{entry.git_sha}`; config hash: `{entry.config_hash}`
- data fingerprint: `{entry.data_fingerprint}`; tokenizer fingerprint: `{entry.tokenizer_fingerprint}`
- packages: {versions}
- license: {license}{' (set it with --license)' if license == 'other' else ''}
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


def export(registry: Registry, ref: str, out: str | os.PathLike, license: str = "other") -> Path:
    """Write the checkpoint `ref` and its model card into the new (or empty) directory `out`; an ensemble of
    separately trained reward models with its members' folders."""
    from pipeline.models import ENSEMBLE_FILE, ensemble_members  # torch: only where a checkpoint is exported
    entry = registry.resolve(ref).entry
    if entry is None:
        raise PipelineError(f"'{ref}' is not a registry entry: export writes a card from the registry, so it needs "
                            f"a checkpoint made here (a stage reference, an entry id or its directory)")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PipelineError(f"{out} exists and is not an empty directory; export into a new one")
    source = Path(entry.path)
    members = ensemble_members(source)  # separately trained reward models: each member its own folder
    files = sorted({f for folder in [source, *members] for pattern in HF_FILES for f in folder.glob(pattern)
                    if f.is_file()})
    if not any(f.suffix == ".safetensors" for f in files):
        raise PipelineError(f"{source} holds no safetensors weights: nothing to export")
    for f in files + [source / ENSEMBLE_FILE] * bool(members):
        (out / f.relative_to(source)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, out / f.relative_to(source))
    card = model_card(registry, entry, license)
    card.save(out / "README.md")
    (out / "lineage.json").write_text(json.dumps(
        [{k: getattr(e, k) for k in ("id", "stage", "parents", "finished_at", "metrics", "config_hash", "git_sha",
                                     "data_fingerprint", "tokenizer_fingerprint")} for e in ancestors(registry, entry)],
        indent=2))
    return out


def push(registry: Registry, ref: str, repo_id: str, private: bool = False, license: str = "other") -> str:
    """Export `ref` and upload it to the Hub repository repo_id (created if missing); returns its URL."""
    from huggingface_hub import HfApi, constants, get_token

    if constants.HF_HUB_OFFLINE:
        raise PipelineError("HF_HUB_OFFLINE is set, and pushing needs the network: unset it, or use "
                            "`python -m pipeline.registry export REF DIR` and upload the folder later")
    if not get_token():
        raise PipelineError("no Hugging Face token: log in with `hf auth login` or set HF_TOKEN, then push again")
    with tempfile.TemporaryDirectory() as tmp:
        folder = export(registry, ref, Path(tmp) / "model", license)
        try:
            api = HfApi()
            api.create_repo(repo_id, private=private, exist_ok=True)
            api.upload_folder(folder_path=str(folder), repo_id=repo_id,
                              commit_message=f"{registry.resolve(ref).entry.id} from llm-pipeline")
        except Exception as e:  # network, authentication, permissions: the Hub's words, without a traceback
            raise PipelineError(f"pushing to {repo_id} failed: {type(e).__name__}: {e}") from None
    return f"{constants.ENDPOINT}/{repo_id}"
