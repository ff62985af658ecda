"""The README's quickstart commands run as written (at micro size), so the README cannot go stale."""
import re
import subprocess

import pytest

from tests.conftest import ROOT, env_for

pytestmark = pytest.mark.slow


def quickstart_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Quickstart\s+```bash\n(.*?)```", readme, re.S).group(1)
    return [line.split("#")[0].strip() for line in block.splitlines() if line.split("#")[0].strip()]


def test_quickstart_commands_work(home):
    commands = quickstart_commands()
    assert commands[0].startswith("make ")
    for cmd in commands:
        if cmd.startswith("make "):
            cmd += ' ARGS="experiment=ci"'
        cmd = cmd.replace("python ", ".venv/bin/python ", 1) if cmd.startswith("python ") else cmd
        r = subprocess.run(cmd, shell=True, cwd=ROOT, env=env_for(home), capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"{cmd}\n{r.stdout[-1500:]}\n{r.stderr[-1500:]}"
    for stage in ("pretrain", "sft", "reward", "ppo"):  # the registry lists the entries it left
        assert f"{stage}-" in r.stdout, r.stdout
