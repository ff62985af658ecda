"""Talk to any checkpoint: a registry reference (`ppo:latest`, `sft:best`, an entry id), a directory or a hub id.

    python -m pipeline.chat --model ppo:latest                                   interactive: /reset, /quit
    python -m pipeline.chat --model sft:latest --prompt "Write a story about Mia."   one answer, for scripts
    python -m pipeline.chat --model sft:latest --prompts in.jsonl --out out.jsonl    one answer per row, batched
    make chat MODEL=ppo:latest ARGS="--temperature 0.2"

Each turn goes through the tokenizer's chat template with the conversation so far, and its tokens are printed as
they are generated. A model without a chat template (a base model) continues plain text with --plain. Sampling
follows the checkpoint's generation config unless --temperature (0: greedy), --top-p or --max-new-tokens say
otherwise. Batch files hold prompt-only rows in TRL's formats, {"prompt": "text"} or {"prompt": [messages]};
each output row adds the "completion" in the same format.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TextIO

import torch
from transformers import TextStreamer, set_seed

from pipeline.config import GenerationEvalConfig
from pipeline.data import as_conversation, check_jsonl, clean_rows, prompt_row_problem
from pipeline.errors import PipelineError
from pipeline.evaluation import generate_responses
from pipeline.models import ensemble_members, load_as_saved
from pipeline.registry import Registry


class Streamer(TextStreamer):
    """transformers' streamer, writing each finished piece of text to `out` as soon as it is decoded."""

    def __init__(self, tok, out: TextIO):
        super().__init__(tok, skip_prompt=True, skip_special_tokens=True)
        self.out = out

    def on_finalized_text(self, text: str, stream_end: bool = False):
        self.out.write(text + ("\n" if stream_end else ""))
        self.out.flush()


class Chat:
    """A conversation with a model: the history, rendered by the chat template (or continued as plain text),
    kept within the model's context by dropping the oldest turns."""

    def __init__(self, model, tok, sampling: dict, plain: bool = False, system: str | None = None):
        self.model, self.tok, self.sampling, self.plain = model, tok, sampling, plain
        self.system = [{"role": "system", "content": system}] if system else []
        self.history: list[dict] = []
        self.context = getattr(model.config, "max_position_embeddings", None) or tok.model_max_length

    def reset(self) -> None:
        self.history = []

    def prompt_text(self) -> str:
        if self.plain:
            return "".join(m["content"] for m in self.history)
        return self.tok.apply_chat_template(self.system + self.history, tokenize=False, add_generation_prompt=True)

    def _prompt_ids(self, max_new: int, warn: TextIO) -> torch.Tensor:
        while True:
            ids = self.tok(self.prompt_text(), return_tensors="pt", add_special_tokens=self.plain)["input_ids"]
            if ids.shape[1] + max_new <= self.context or len(self.history) <= 1:
                break
            self.history = self.history[2:] if len(self.history) > 2 else self.history[-1:]
            warn.write(f"(the oldest turn was dropped: the conversation no longer fits the model's context of "
                       f"{self.context} tokens)\n")
        if ids.shape[1] + max_new > self.context:  # one message longer than the context: keep its end
            ids = ids[:, -(self.context - max_new):]
            warn.write(f"(the message was cut to its last {ids.shape[1]} tokens to fit the model's context)\n")
        return ids

    def reply(self, text: str, out: TextIO, show_prompt: TextIO | None = None) -> str:
        """Add the user's turn, stream the model's answer to `out`, add it to the history and return it."""
        self.history.append({"role": "user", "content": text})
        max_new = min(self.sampling["max_new_tokens"], max(self.context // 2, 1))
        ids = self._prompt_ids(max_new, show_prompt or sys.stderr)
        if show_prompt is not None:
            show_prompt.write(f"[prompt] {self.tok.decode(ids[0])}\n")
            show_prompt.flush()
        with torch.no_grad():
            generated = self.model.generate(input_ids=ids.to(self.model.device),
                                            attention_mask=torch.ones_like(ids).to(self.model.device),
                                            streamer=Streamer(self.tok, out), **{**self.sampling,
                                                                                 "max_new_tokens": max_new})
        answer = self.tok.decode(generated[0, ids.shape[1]:], skip_special_tokens=True)
        self.history.append({"role": "assistant", "content": answer if self.plain else answer.strip()})
        return answer.strip()


def load(ref: str, root: str | None, plain: bool, dtype: str = "auto"):
    """(model, tokenizer, what it is) of a reference; a checkpoint without a chat template needs --plain.
    dtype "auto": the weights' saved dtype on a GPU, fp32 on a CPU (most CPUs compute bf16 far slower)."""
    resolved = Registry(root).resolve(ref)
    path = resolved.path
    config = Path(path) / "config.json"
    if ensemble_members(path) or config.exists() and any(
            a.endswith("ForSequenceClassification") for a in json.loads(config.read_text()).get("architectures") or []):
        raise PipelineError(f"'{ref}' is a reward model ({path}): it scores text and does not generate. "
                            f"Chat with a policy: sft:latest, ppo:latest, dpo:latest, grpo:latest")
    gpu = torch.cuda.is_available()
    model, tok = load_as_saved(path, dtype=("auto" if gpu else torch.float32) if dtype == "auto" else
                               getattr(torch, dtype))
    if not plain and not tok.chat_template:
        raise PipelineError(f"'{ref}' has no chat template ({path}): it was not trained to chat. "
                            f"Add --plain to continue plain text with it instead")
    model.to("cuda" if gpu else "cpu").eval()
    return model, tok, resolved.entry.id if resolved.entry else path


def sampling_settings(model, args) -> dict:
    """generate()'s sampling keys: the checkpoint's generation config, overridden by the flags given."""
    gen = model.generation_config
    temperature = args.temperature if args.temperature is not None else \
        (gen.temperature if gen.do_sample else 0.0)
    out = {"max_new_tokens": args.max_new_tokens or gen.max_new_tokens or 128,
           "eos_token_id": gen.eos_token_id, "pad_token_id": gen.pad_token_id}
    if temperature > 0:
        top_p = args.top_p if args.top_p is not None else (gen.top_p or 1.0)
        out.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    else:
        out.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    return out


def read_prompts(path: str, plain: bool) -> list[dict]:
    """Prompt-only rows of a JSON-lines file, checked row by row."""
    file = Path(path)
    if not file.is_file():
        raise PipelineError(f"prompt file not found: {file.resolve()}")
    check_jsonl(file, ("prompt",))
    rows = [json.loads(line) for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not rows:
        raise PipelineError(f"{file} has no rows")
    rows, _ = clean_rows(rows, prompt_row_problem, str(file), skip=False, remedy="Fix the row.")
    if plain:
        odd = next((n for n, r in enumerate(rows, start=1) if not isinstance(r["prompt"], str)), None)
        if odd is not None:
            raise PipelineError(f"{file}, row {odd}: a conversational prompt needs a chat template; --plain "
                                f"continues text prompts only")
    return rows


def batch(model, tok, args, sampling: dict) -> int:
    """One completion per prompt row, generated in batches with a progress bar, written to args.out."""
    rows = read_prompts(args.prompts, args.plain)
    prompts = [r["prompt"] if args.plain else as_conversation(r["prompt"]) for r in rows]
    cfg = GenerationEvalConfig(num_prompts=len(rows), max_new_tokens=sampling["max_new_tokens"],
                               temperature=sampling["temperature"] or 0.0, seed=args.seed or 0,
                               batch_size=args.batch_size)
    answers = generate_responses(model, tok, prompts, cfg, "Generating", top_p=sampling.get("top_p") or 1.0)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        for row, answer in zip(rows, answers):
            completion = answer if isinstance(row["prompt"], str) else [{"role": "assistant", "content": answer}]
            f.write(json.dumps({**row, "completion": completion}) + "\n")
    print(f"{len(rows)} completions -> {out}", file=sys.stderr)
    return 0


def interactive(chat: Chat, stdin: TextIO, stdout: TextIO, show_prompt: bool) -> int:
    tty = stdin.isatty()
    if tty:
        print("Type a message; /reset starts a new conversation, /quit ends.", file=sys.stderr)
    while True:
        if tty:
            stdout.write("you> ")
            stdout.flush()
        line = stdin.readline()
        if not line or line.strip() == "/quit":
            return 0
        text = line.rstrip("\n")
        if text.strip() == "/reset":
            chat.reset()
            print("(new conversation)", file=sys.stderr)
            continue
        if not text.strip():
            continue
        if tty:
            stdout.write("assistant> ")
        chat.reply(text, stdout, sys.stderr if show_prompt else None)


def main(argv: list[str] | None = None, stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.chat", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="registry reference, checkpoint directory or hub id")
    ap.add_argument("--root", default=None, help="registry root (default: $PIPELINE_HOME or runs/)")
    ap.add_argument("--prompt", help="answer this one message and exit")
    ap.add_argument("--prompts", help="a JSON-lines file of prompt-only rows to answer (with --out)")
    ap.add_argument("--out", help="where --prompts writes its rows with their completions")
    ap.add_argument("--temperature", type=float, help="sampling temperature; 0 is greedy (default: the checkpoint's)")
    ap.add_argument("--top-p", type=float, help="nucleus sampling mass (default: the checkpoint's)")
    ap.add_argument("--max-new-tokens", type=int, help="longest answer in tokens (default: the checkpoint's)")
    ap.add_argument("--system", help="a system message opening the conversation")
    ap.add_argument("--plain", action="store_true", help="continue plain text, without a chat template")
    ap.add_argument("--seed", type=int, help="seed of the sampling noise, for repeatable answers")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                    help="weights' dtype (auto: as saved on a GPU, float32 on a CPU)")
    ap.add_argument("--batch-size", type=int, default=16, help="prompts generated at once with --prompts")
    ap.add_argument("--show-prompt", action="store_true", help="print the text the model is given, to stderr")
    args = ap.parse_args(argv)
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    try:
        if args.prompts and not args.out:
            raise PipelineError("--prompts needs --out FILE.jsonl for the completions")
        if args.prompt is not None and args.prompts:
            raise PipelineError("give --prompt or --prompts, not both")
        model, tok, what = load(args.model, args.root, args.plain, args.dtype)
        print(f"{what} ({model.num_parameters() / 1e6:.2f}M parameters, {model.device.type}, {model.dtype})",
              file=sys.stderr)
        if args.seed is not None:
            set_seed(args.seed)
        sampling = sampling_settings(model, args)
        if args.prompts:
            return batch(model, tok, args, sampling)
        chat = Chat(model, tok, sampling, args.plain, args.system)
        if args.prompt is not None:
            chat.reply(args.prompt, stdout, sys.stderr if args.show_prompt else None)
            return 0
        return interactive(chat, stdin, stdout, args.show_prompt)
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
