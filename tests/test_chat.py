"""The chat CLI on a ci checkpoint: conversation history through the chat template, streamed answers, /reset and
/quit, one-shot and batch use, and clear errors."""
import io
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from pipeline import chat
from pipeline.registry import Registry
from tests.conftest import PY, ROOT, env_for, make


class Writes(io.StringIO):
    """stdout that keeps every write apart, to see an answer arrive in pieces."""

    def __init__(self):
        super().__init__()
        self.pieces: list[str] = []

    def write(self, s):
        self.pieces.append(s)
        return super().write(s)


def talk(home: Path, lines: str, capsys, *args: str) -> tuple[int, Writes, list[str]]:
    out = Writes()
    rc = chat.main(["--model", "sft:latest", "--root", str(home), "--seed", "0", "--max-new-tokens", "12",
                    "--show-prompt", *args], stdin=io.StringIO(lines), stdout=out)
    prompts = [line[len("[prompt] "):] for line in capsys.readouterr().err.splitlines() if line.startswith("[prompt] ")]
    return rc, out, prompts


@pytest.mark.slow  # needs a fine-tuned checkpoint (the session's ci pretrain + SFT)
def test_turns_carry_the_history_until_reset_and_answers_stream(ci_fine_tuned, capsys):
    rc, out, prompts = talk(ci_fine_tuned, "Hello\nTell me more\n/reset\nAgain\n/quit\nnever read\n", capsys)
    assert rc == 0
    assert len(prompts) == 3  # /quit ends before the last line
    assert prompts[0] == "<|user|>Hello<|endoftext|><|assistant|>"
    # the second turn is rendered after the first, whole: the user's message and the answer streamed to stdout
    first, second = prompts[1].split("<|endoftext|><|user|>")
    assert first.startswith("<|user|>Hello<|endoftext|><|assistant|>")
    answer = first[len("<|user|>Hello<|endoftext|><|assistant|>"):]
    assert answer and out.getvalue().lstrip().startswith(answer)
    assert second == "Tell me more<|endoftext|><|assistant|>"
    assert prompts[2] == "<|user|>Again<|endoftext|><|assistant|>"  # /reset forgot the first conversation
    # three answers, written piece by piece as they were generated
    assert len(out.pieces) > 3


@pytest.mark.slow  # needs a fine-tuned checkpoint (the session's ci pretrain + SFT)
def test_the_oldest_turns_make_room_in_a_short_context(ci_fine_tuned, capsys):
    path = Registry(ci_fine_tuned).resolve("sft").path
    context = json.loads((Path(path) / "config.json").read_text())["max_position_embeddings"]
    tok = AutoTokenizer.from_pretrained(path)
    lines = "".join(f"message number {i} about the red cat\n" for i in range(12))
    rc, out, prompts = talk(ci_fine_tuned, lines, capsys, "--max-new-tokens", "16")
    assert rc == 0 and len(prompts) == 12
    assert "message number 0" not in prompts[-1] and "message number 11" in prompts[-1]
    assert all(len(tok(p, add_special_tokens=False)["input_ids"]) + 16 <= context for p in prompts)


@pytest.mark.slow  # needs a fine-tuned checkpoint (the session's ci pretrain + SFT)
def test_one_shot_and_stdin_through_the_module(ci_fine_tuned):
    env = env_for(ci_fine_tuned)
    one = subprocess.run([PY, "-m", "pipeline.chat", "--model", "sft:latest", "--prompt", "Is this positive?",
                          "--dtype", "bfloat16"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    # the answer's line; a 0.13M-parameter model sampled in bf16 may stop at its first token, so it can be empty
    assert one.returncode == 0 and one.stdout.endswith("\n"), one.stderr[-2000:]
    assert "cpu, torch.bfloat16)" in one.stderr  # as asked; on a CPU, auto is float32 (below)
    inter = subprocess.run([PY, "-m", "pipeline.chat", "--model", "sft:latest", "--show-prompt",
                            "--max-new-tokens", "8"],
                           input="Hello\nTell me more\n/reset\n/quit\n", cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=300)
    assert inter.returncode == 0, inter.stderr[-2000:]
    shown = [line for line in inter.stderr.splitlines() if line.startswith("[prompt] ")]
    assert len(shown) == 2 and "Hello" in shown[1]
    target = make("chat", ci_fine_tuned, "--prompt 'Is this positive?' --max-new-tokens 8 --show-prompt",
                  MODEL="sft:latest")
    assert target.returncode == 0 and "[prompt] <|user|>Is this positive?" in target.stderr, target.stderr[-2000:]
    assert "cpu, torch.float32)" in target.stderr


@pytest.mark.slow  # needs a fine-tuned checkpoint (the session's ci pretrain + SFT)
def test_batch_answers_every_prompt_row_in_its_format(ci_fine_tuned, tmp_path):
    rows = [{"prompt": "Write a short story about Tom."},
            {"prompt": [{"role": "user", "content": "Summarize: Mia went home."}]},
            {"prompt": "Is this sentence positive or negative? Sam lost his hat.", "id": 7}]
    src, dst = tmp_path / "prompts.jsonl", tmp_path / "out" / "completions.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert chat.main(["--model", "sft:latest", "--root", str(ci_fine_tuned), "--prompts", str(src), "--out", str(dst),
                      "--batch-size", "2", "--max-new-tokens", "8"]) == 0
    out = [json.loads(line) for line in dst.read_text().splitlines()]
    assert [r["prompt"] for r in out] == [r["prompt"] for r in rows] and out[2]["id"] == 7
    assert isinstance(out[0]["completion"], str) and isinstance(out[2]["completion"], str)
    assert out[1]["completion"][0]["role"] == "assistant"


@pytest.mark.slow  # needs a fine-tuned checkpoint (the session's ci pretrain + SFT)
def test_bad_references_rows_and_templates_are_named(ci_fine_tuned, tmp_path, capsys):
    root = ["--root", str(ci_fine_tuned)]
    assert chat.main(["--model", "ppo:latest", *root, "--prompt", "hi"]) == 2
    assert "no complete 'ppo' checkpoint" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"prompt": ""}\n')
    assert chat.main(["--model", "sft:latest", *root, "--prompts", str(bad), "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "bad.jsonl, row 2: empty 'prompt'" in capsys.readouterr().err

    # a checkpoint without a chat template is offered plain completion
    base = tmp_path / "base"
    shutil.copytree(Registry(ci_fine_tuned).resolve("sft").path, base)
    (base / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((base / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    assert chat.main(["--model", str(base), "--prompt", "Once upon a time"]) == 2
    err = capsys.readouterr().err
    assert "has no chat template" in err and "--plain" in err
    out = io.StringIO()
    assert chat.main(["--model", str(base), "--plain", "--prompt", "Once upon a time", "--max-new-tokens", "8"],
                     stdout=out) == 0
    assert out.getvalue().strip()
