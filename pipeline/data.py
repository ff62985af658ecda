"""Data for the stages: reading local files and hub datasets with clear errors, and packing a corpus.

Local `.jsonl` files are checked line by line first, so that a malformed row is reported with its file
and line number instead of a parser traceback.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import datasets
from datasets import Dataset

from pipeline import demo
from pipeline.config import CorpusData, DemonstrationData, ExampleData, PairData, PromptData
from pipeline.errors import PipelineError

FILE_KINDS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
CONF_DATA = Path(__file__).resolve().parent.parent / "conf" / "data"  # the data presets

logger = logging.getLogger(__name__)


def check_jsonl(path: Path, required: tuple[str, ...]) -> None:
    """Raise PipelineError naming the first line that is not a JSON object with the required fields."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise PipelineError(f"{path}, line {n}: not valid JSON ({e.msg} at column {e.colno}). "
                                    f"Each line must be one JSON object.") from None
            if not isinstance(row, dict):
                raise PipelineError(f"{path}, line {n}: expected a JSON object, got {type(row).__name__}")
            missing = [k for k in required if k not in row]
            if missing:
                raise PipelineError(f"{path}, line {n}: missing field(s) {missing}; found {sorted(row)}")


def load_table(path: str, required: tuple[str, ...], cache_dir: Path, *, sample_by: str = "paragraph",
               split: str = "train", hub_config: str | None = None, hub: bool = False) -> Dataset:
    """Rows of a local .txt/.jsonl/.parquet file, or of a hub dataset, with the required columns checked."""
    if hub:
        try:
            ds = datasets.load_dataset(path, hub_config, split=split, cache_dir=str(cache_dir))
        except Exception as e:  # the hub's errors (no network, no such dataset) are the user's to fix
            raise PipelineError(f"cannot load hub dataset '{path}' (split {split}): {e}") from None
        where = f"hub dataset '{path}'"
    else:
        file = Path(path)
        if not file.is_file():
            raise PipelineError(f"data file not found: {file.resolve()}")
        if file.stat().st_size == 0:
            raise PipelineError(f"{file} is empty: no text to train on")
        kind = FILE_KINDS.get(file.suffix)
        if kind is None:
            raise PipelineError(f"{file}: unsupported file type '{file.suffix}'; use one of {sorted(FILE_KINDS)}")
        if kind == "json":
            check_jsonl(file, required)
        extra = {"sample_by": sample_by} if kind == "text" else {}
        try:
            ds = datasets.load_dataset(kind, data_files=str(file), split="train", cache_dir=str(cache_dir), **extra)
        except Exception as e:
            raise PipelineError(f"{file}: cannot be read as {kind}: {e}") from None
        where = str(file)
    missing = [k for k in required if k not in ds.column_names]
    if missing:
        raise PipelineError(f"{where}: missing column(s) {missing}; found {ds.column_names}. "
                            f"Rename the column or set the field name in the data config.")
    if len(ds) == 0:
        raise PipelineError(f"{where} is empty: no rows to train on")
    return ds


def load_corpus(cfg: CorpusData, seed: int, cache_dir: Path) -> tuple[list[str], list[str]]:
    """(train documents, eval documents) of a text corpus."""
    if cfg.kind == "demo":
        docs = demo.generate_corpus(cfg.num_documents, seed)
    else:
        field = "text" if Path(str(cfg.path)).suffix == ".txt" else cfg.text_field
        ds = load_table(cfg.path, (field,), cache_dir, sample_by=cfg.sample_by, split=cfg.split,
                        hub_config=cfg.hub_config, hub=cfg.kind == "hub")
        if cfg.max_rows:
            ds = ds.select(range(min(cfg.max_rows, len(ds))))
        docs = [t.strip() for t in ds[field] if isinstance(t, str) and t.strip()]
    if not docs:
        raise PipelineError(f"the corpus ({cfg.path or 'demo'}) has no text: every document is empty")
    n_eval = max(1, int(len(docs) * cfg.eval_fraction))
    if len(docs) - n_eval < 1:
        raise PipelineError(f"the corpus ({cfg.path}) has {len(docs)} document(s): too few to hold some out "
                            f"for evaluation")
    return docs[n_eval:], docs[:n_eval]


def row_texts(row) -> list[str]:
    """Every string in a row: text fields and message contents, in order."""
    if isinstance(row, str):
        return [row]
    if isinstance(row, dict):
        return [t for k, v in row.items() if k != "role" for t in row_texts(v)]
    if isinstance(row, list):
        return [t for v in row for t in row_texts(v)]
    return []


def extra_tokenizer_text(sources: list[str], seed: int, cache_dir: Path, limit: int) -> dict[str, list[str]]:
    """source -> texts, for tokenizer.extra_text: "demo", a data preset name (conf/data/NAME.yaml) or a local file."""
    from omegaconf import OmegaConf

    out = {}
    per_source = max(1, limit // max(len(sources), 1))
    for source in sources:
        preset = CONF_DATA / f"{source}.yaml"
        if source == "demo":
            # the instructions and answers of demonstrations (the same prompts as the pairs' and PPO's)
            texts = [t for r in demo.generate_demonstrations(per_source // 2, seed) for t in row_texts(r["messages"])]
        elif "/" not in source and "." not in source and preset.exists():
            cfg = OmegaConf.merge(OmegaConf.structured(ExampleData), OmegaConf.load(preset))
            if cfg.kind != "hub":
                raise PipelineError(f"tokenizer.extra_text: the preset '{source}' names no data set; give 'demo' "
                                    f"or the file's path")
            cfg = OmegaConf.to_object(cfg)
            cfg.max_rows = per_source
            texts = [t for r in load_rows(cfg, cache_dir)[0] for t in row_texts(r)]
        elif Path(source).is_file():
            ds = load_table(source, (), cache_dir)
            texts = [t for r in ds.select(range(min(per_source, len(ds)))).to_list() for t in row_texts(r)]
        else:
            raise PipelineError(f"tokenizer.extra_text: '{source}' is neither 'demo', a data preset "
                                f"({', '.join(sorted(p.stem for p in CONF_DATA.glob('*.yaml')))}) nor an existing file")
        texts = [t for t in texts if t.strip()]
        if not texts:
            raise PipelineError(f"tokenizer.extra_text: '{source}' holds no text")
        out[source] = texts[:per_source]
    return out


def fingerprint(texts: list[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def pack_into_blocks(texts: list[str], tokenizer, block_size: int, desc: str) -> Dataset:
    """Tokenize documents, join them with EOS and cut the stream into full blocks: no padding anywhere. Each
    block carries position ids that restart at every document, so that a document attends only to itself."""
    eos = tokenizer.eos_token_id

    def tokenize(batch):
        return {"ids": [ids + [eos] for ids in tokenizer(batch["text"], add_special_tokens=False, verbose=False)["input_ids"]]}

    def group(batch):
        stream = [t for ids in batch["ids"] for t in ids]
        # Each document's positions count from 0; from position ids that restart (and no attention mask),
        # transformers builds a block-diagonal causal mask, as for padding-free fine-tuning.
        positions = [i for ids in batch["ids"] for i in range(len(ids))]
        n = len(stream) // block_size * block_size  # the last partial block of each batch is dropped
        blocks = [stream[i:i + block_size] for i in range(0, n, block_size)]
        return {"input_ids": blocks, "labels": [list(b) for b in blocks],
                "position_ids": [positions[i:i + block_size] for i in range(0, n, block_size)]}

    ds = Dataset.from_dict({"text": texts})
    ds = ds.map(tokenize, batched=True, remove_columns=["text"], desc=f"Tokenizing {desc}")
    ds = ds.map(group, batched=True, batch_size=1000, remove_columns=["ids"], desc=f"Packing {desc}")
    if len(ds) == 0:
        raise PipelineError(f"the {desc} text is shorter than one block of {block_size} tokens; "
                            f"add text or lower data.block_size")
    return ds


def non_padding_share(blocks: Dataset, pad_token_id: int) -> float:
    """Share of tokens in the training blocks that are not padding."""
    total = pad = 0
    for ids in blocks.with_format("numpy")["input_ids"]:
        total += ids.size
        pad += int((ids == pad_token_id).sum())
    return 1.0 - pad / total


# ---------------------------------------------------------------------------------------------
# Fine-tuning data in TRL's formats
# ---------------------------------------------------------------------------------------------

ROLES = ("system", "user", "assistant")


def _check_messages(messages, field: str, need_assistant: bool) -> str | None:
    if not isinstance(messages, list) or not messages:
        return f"'{field}' must be a non-empty list of {{role, content}} messages"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            return f"'{field}' message {i} must have 'role' and 'content'"
        if m["role"] not in ROLES:
            return f"'{field}' message {i} has unknown role {m['role']!r} (expected one of {', '.join(ROLES)})"
        if not isinstance(m["content"], str):
            return f"'{field}' message {i} content must be text"
        if m["role"] == "assistant" and not m["content"].strip():
            return f"'{field}' message {i} is an empty assistant turn"
    if need_assistant and not any(m["role"] == "assistant" for m in messages):
        return f"'{field}' has no assistant turn to learn from"
    return None


SFT_FORMATS = (("messages",), ("prompt", "completion"), ("text",))


def sft_format(row: dict) -> tuple[str, ...] | None:
    """Which of TRL's formats a fine-tuning row is in: conversational, prompt-completion or plain text."""
    return next((keys for keys in SFT_FORMATS if all(row.get(k) is not None for k in keys)), None)


def sft_row_problem(row: dict) -> str | None:
    """What is wrong with one fine-tuning row, or None: TRL's `messages`, `prompt`/`completion` or `text` formats."""
    if row.get("messages") is not None:
        return _check_messages(row["messages"], "messages", need_assistant=True)
    prompt, completion = row.get("prompt"), row.get("completion")
    if prompt is None and completion is None and row.get("text") is not None:
        text = row["text"]
        return None if isinstance(text, str) and text.strip() else "'text' must be non-empty text"
    if prompt is None or completion is None:
        present = sorted(k for k, v in row.items() if v is not None)
        return f"missing field: expected 'messages', 'prompt' and 'completion', or 'text' (found {present})"
    if isinstance(prompt, str) and isinstance(completion, str):
        return None if completion.strip() else "empty 'completion'"
    if isinstance(prompt, list) and isinstance(completion, list):
        return (_check_messages(prompt, "prompt", need_assistant=False)
                or _check_messages(completion, "completion", need_assistant=True))
    return "'prompt' and 'completion' must both be text or both be lists of messages"


def clean_rows(rows: list[dict], problem, where: str, skip: bool,
               remedy: str = "Fix the row, or set data.skip_bad_rows=true to skip bad rows.") -> tuple[list[dict], int]:
    """Rows without problems; a bad row stops the run (naming its number) unless skip is set."""
    good, bad = [], []
    for n, row in enumerate(rows, start=1):
        p = problem(row)
        if p is None:
            good.append(row)
        elif not skip:
            raise PipelineError(f"{where}, row {n}: {p}. {remedy}")
        else:
            bad.append(n)
    if bad:
        logger.warning(f"Skipped {len(bad)} bad row(s) of {where} (data.skip_bad_rows=true): rows {bad[:20]}"
                       + (" ..." if len(bad) > 20 else ""))
    if not good:
        raise PipelineError(f"{where} has no usable rows")
    return good, len(bad)


def load_rows(cfg: ExampleData, cache_dir: Path) -> tuple[list[dict], str]:
    """The rows of a local file or hub dataset as dicts, renamed per data.rename, and where they came from."""
    ds = load_table(cfg.path, (), cache_dir, sample_by=cfg.sample_by, split=cfg.split,
                    hub_config=cfg.hub_config, hub=cfg.kind == "hub")
    if cfg.rename:
        missing = [k for k in cfg.rename if k not in ds.column_names]
        if missing:
            raise PipelineError(f"{cfg.path}: data.rename names column(s) {missing} that are not in the data "
                                f"(columns: {ds.column_names})")
        ds = ds.rename_columns(dict(cfg.rename))
    if cfg.max_rows:
        ds = ds.select(range(min(cfg.max_rows, len(ds))))
    return ds.to_list(), (f"hub dataset '{cfg.path}'" if cfg.kind == "hub" else str(cfg.path))


# The held-out prompts the online methods and DPO keep at least (a third of a smaller file): on fewer, their
# reward gain moves more from one draw of prompts to the next than training moves it.
HELDOUT_FLOOR = 200


def split_eval(rows: list, eval_fraction: float, cap: int, floor: int = 0) -> tuple[list, list]:
    """(train rows, held-out rows): eval_fraction of the rows, at least `floor` or a third of them (whichever is
    fewer), at most cap."""
    n_eval = min(cap, max(1, int(len(rows) * eval_fraction), min(floor, len(rows) // 3)))
    if len(rows) - n_eval < 1:
        raise PipelineError(f"only {len(rows)} usable row(s): too few to hold some out for evaluation")
    return rows[n_eval:], rows[:n_eval]


def load_sft_data(cfg: DemonstrationData, seed: int, cache_dir: Path) -> tuple[list[dict], list[dict]]:
    """(train rows, eval rows) in TRL's conversational, prompt-completion or language-modeling (text) format."""
    if cfg.kind == "demo":
        rows = [{"messages": r["messages"]} for r in demo.generate_demonstrations(
            cfg.num_examples, seed, cfg.flawed_share, dict(cfg.flaw_shares))]
    else:
        raw, where = load_rows(cfg, cache_dir)
        rows, _ = clean_rows(raw, sft_row_problem, where, cfg.skip_bad_rows)
        keys = sft_format(rows[0])
        odd = next((n for n, r in enumerate(rows, start=1) if sft_format(r) != keys), None)
        if odd is not None:
            raise PipelineError(f"{where} mixes formats: row {odd} is not in the first row's {keys} format; "
                                f"use one of {', '.join('/'.join(k) for k in SFT_FORMATS)} throughout")
        rows = [{k: r[k] for k in keys} for r in rows]
    return split_eval(rows, cfg.eval_fraction, cfg.max_eval_examples)


def _response_problem(value, field: str) -> str | None:
    if isinstance(value, str):
        return None if value.strip() else f"empty '{field}' response"
    if isinstance(value, list):
        problem = _check_messages(value, field, need_assistant=False)
        if problem:
            return problem
        return None if value[-1]["content"].strip() else f"empty '{field}' response"
    return f"'{field}' must be text or a list of messages"


def preference_row_problem(row: dict) -> str | None:
    """What is wrong with one preference pair, or None: TRL's explicit- or implicit-prompt formats."""
    for field in ("chosen", "rejected"):
        if row.get(field) is None:
            return f"missing '{field}'"
    problem = _response_problem(row["chosen"], "chosen") or _response_problem(row["rejected"], "rejected")
    if problem:
        return problem
    if type(row["chosen"]) is not type(row["rejected"]):
        return "'chosen' and 'rejected' must both be text or both be lists of messages"
    if row["chosen"] == row["rejected"]:
        return "'chosen' is identical to 'rejected': the pair prefers nothing"
    prompt = row.get("prompt")
    if prompt is not None and type(prompt) is not type(row["chosen"]):
        return "'prompt' and the responses must both be text or both be lists of messages"
    return None


def load_preference_data(cfg: PairData, seed: int, cache_dir: Path,
                         floor: int = 0) -> tuple[list[dict], list[dict]]:
    """(train pairs, eval pairs) in TRL's preference format; the demo's eval pairs use held-out prompts, and name
    the flaw class of their rejected response (`flaw`), for per-class accuracies. A file's held-out share keeps
    `floor` pairs (split_eval)."""
    if cfg.kind == "demo":
        keep = ("prompt", "chosen", "rejected")
        shares, elements = dict(cfg.flaw_shares), list(cfg.swap_elements)
        train = [{k: r[k] for k in keep} for r in demo.generate_preferences(cfg.num_examples, seed, flaw_shares=shares,
                                                                            swap_elements=elements)]
        n_eval = min(cfg.max_eval_examples, max(1, int(cfg.num_examples * cfg.eval_fraction)))
        held = [{k: r[k] for k in (*keep, "flaw")} for r in demo.generate_preferences(
            n_eval, seed + 1, heldout=True, flaw_shares=shares, swap_elements=elements)]
        return train, held
    raw, where = load_rows(cfg, cache_dir)
    rows, _ = clean_rows(raw, preference_row_problem, where, cfg.skip_bad_rows)
    explicit = rows[0].get("prompt") is not None
    if any((r.get("prompt") is not None) != explicit for r in rows):
        raise PipelineError(f"{where} mixes pairs with and without 'prompt'; use one format")
    keys = ("prompt", "chosen", "rejected") if explicit else ("chosen", "rejected")
    return split_eval([{k: r[k] for k in keys} for r in rows], cfg.eval_fraction, cfg.max_eval_examples, floor)


def prompt_row_problem(row: dict) -> str | None:
    prompt = row.get("prompt")
    if prompt is None:
        return "missing 'prompt'"
    if isinstance(prompt, str):
        return None if prompt.strip() else "empty 'prompt'"
    return _check_messages(prompt, "prompt", need_assistant=False)


def demo_heldout_prompts(n: int, seed: int) -> list[dict]:
    """The demo's held-out prompts of a run with this seed: every alignment stage evaluates on the same ones."""
    return demo.generate_prompts(n, seed + 1, heldout=True)


def load_prompt_data(cfg: PromptData, seed: int, cache_dir: Path, n_eval: int) -> tuple[list[dict], list[dict]]:
    """(train prompts, held-out prompts) as conversational `prompt` lists; demo rows also carry their task. A file
    keeps HELDOUT_FLOOR prompts (or a third of a small one) held out, at most n_eval."""
    if cfg.kind == "demo":
        return demo.generate_prompts(cfg.num_examples, seed, heldout=False), demo_heldout_prompts(n_eval, seed)
    raw, where = load_rows(cfg, cache_dir)
    rows, _ = clean_rows(raw, prompt_row_problem, where, cfg.skip_bad_rows)
    return split_eval([{"prompt": as_conversation(r["prompt"])} for r in rows], cfg.eval_fraction, n_eval,
                      HELDOUT_FLOOR)


def as_conversation(prompt: str | list[dict]) -> list[dict]:
    """A prompt in TRL's conversational form: a text prompt is one user turn."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
