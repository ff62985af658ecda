"""Shared helpers: run the project's real commands against a temporary registry, never the network."""
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose as hydra_compose, initialize_config_dir

from pipeline.checkpoint import last_trainer_checkpoint
from pipeline.config import overrides_for, register_schemas, validate

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
PY = sys.executable


def compose(stage: str, overrides=(), *, typed: bool = True, hydra: bool = False):
    """A stage's config as its command composes it from conf/: validated into the stage's typed schema, or
    (typed=False) the composed DictConfig itself, with Hydra's own section where hydra=True."""
    register_schemas()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra_compose(config_name=stage, overrides=list(overrides), return_hydra_config=hydra)
    return validate(cfg) if typed else cfg


def env_for(home: Path, **extra) -> dict:
    env = dict(os.environ)
    env.update(PIPELINE_HOME=str(home), WANDB_MODE="offline", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PYTHONUNBUFFERED="1", **extra)
    env.pop("PIPELINE_ID", None)
    return env


def make_vars(**kw) -> list[str]:
    """make's variables for a stage run. Under pytest-xdist the workers share the cores, so each stage process
    gets its share of threads (make gives one process all of them)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        kw.setdefault("THREADS", max(1, (os.cpu_count() or 1) // workers))
    return [f"{k}={v}" for k, v in kw.items()]


def make(target: str, home: Path, args: str = "", timeout: int = 600, **kw) -> subprocess.CompletedProcess:
    """`make TARGET ARGS="..."` in the project root, with the registry under home."""
    cmd = ["make", "--no-print-directory", target, f"ARGS={args}"] + make_vars(**kw)
    return subprocess.run(cmd, cwd=ROOT, env=env_for(home), capture_output=True, text=True, timeout=timeout)


def registry_entries(home: Path, stage: str | None = None) -> list[dict]:
    cmd = [PY, "-m", "pipeline.registry", "list", "--json"] + (["--stage", stage] if stage else [])
    out = subprocess.run(cmd, cwd=ROOT, env=env_for(home), capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def pytest_collection_modifyitems(config, items):
    """Test files that run stages first, the quick ones last: pytest-xdist hands a file to each free worker in this
    order (make test-all: --dist loadfile), so the quick files even out the workers' ends."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)  # stable: each file keeps its own order


@pytest.fixture
def home(tmp_path) -> Path:
    return tmp_path / "runs"


def run_stages(home: Path, stages: tuple[str, ...], args: str) -> Path:
    """Run stages in order into the registry at home, failing the test if one fails; each gets the overrides its
    config has, as `make all` gives them."""
    for stage in stages:
        r = make(stage, home, " ".join(overrides_for(stage, args.split())))
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return home


def copy_registry(source: Path, tmp_path: Path) -> Path:
    """A test's own copy of a registry that a module-scoped fixture prepared once."""
    home = tmp_path / "runs"
    shutil.copytree(source, home)
    return home


@pytest.fixture(scope="session")
def ci_pretrained(tmp_path_factory) -> Path:
    """A ci-sized pretraining run, made once for the whole session; a test that writes copies it (copy_registry)."""
    return run_stages(tmp_path_factory.mktemp("pretrained") / "runs", ("pretrain",), "experiment=ci")


@pytest.fixture(scope="session")
def ci_fine_tuned(ci_pretrained, tmp_path_factory) -> Path:
    """ci_pretrained and a ci-sized SFT run on it, made once for the whole session (copy it to write)."""
    home = copy_registry(ci_pretrained, tmp_path_factory.mktemp("fine_tuned"))
    return run_stages(home, ("sft",), "experiment=ci eval.num_prompts=4")


def start(target: str, home: Path, args: str = "", **kw) -> subprocess.Popen:
    """`make TARGET` in the background, in its own process group (so that a test can kill it all)."""
    cmd = ["make", "--no-print-directory", target, f"ARGS={args}"] + make_vars(**kw)
    return subprocess.Popen(cmd, cwd=ROOT, env=env_for(home), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def kill(p: subprocess.Popen) -> None:
    """kill -9 make and every process under it: its process group (accelerate and the training process) and the
    workers of a multi-process launch, which torch's launcher starts in groups of their own."""
    import psutil

    try:
        tree = psutil.Process(p.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for child in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    p.communicate()


def kill_after_first_checkpoint(target: str, home: Path, args: str, timeout: float = 300, **kw) -> None:
    p = start(target, home, args, **kw)
    deadline = time.time() + timeout
    while time.time() < deadline and p.poll() is None and not saved_checkpoint(home):
        time.sleep(0.2)
    assert p.poll() is None, f"make {target} ended before its first trainer checkpoint"
    kill(p)


def saved_checkpoint(home: Path) -> bool:
    """Whether a run in the registry at home has written a trainer checkpoint completely: one a rerun resumes from."""
    return any(last_trainer_checkpoint(d) for d in home.glob("checkpoints/*/trainer"))


def complete_entries(home: Path, stage: str) -> list[dict]:
    return [e for e in registry_entries(home, stage) if e["status"] == "complete"]
