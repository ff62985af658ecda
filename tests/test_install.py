"""make install: from the lock (constraints.txt) by default, the exact versions the suite passed with; LOCK=none
for the newest the ranges allow."""
import re
import subprocess
import tomllib

from tests.conftest import ROOT


def name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def pins() -> dict[str, str]:
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    return {name(line): line.split("==", 1)[1] for line in lines if line and not line.startswith("#")}


def test_the_lock_pins_every_dependency_and_agrees_with_the_pins_of_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    required = project["dependencies"] + project["optional-dependencies"]["dev"] + \
        project["optional-dependencies"]["eval"]
    locked = pins()
    missing = [r for r in required if name(r) != "torch" and name(r) not in locked]
    assert not missing, f"not in constraints.txt: {missing}; refresh it with make lock"
    assert "torch" not in locked  # TORCH picks the build (CPU or CUDA)
    for r in required:
        if "==" in r:
            assert locked[name(r)] == r.split("==", 1)[1], r


def dry_run(*args: str) -> str:
    return subprocess.run(["make", "-n", "-B", "install", *args], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout


def test_make_install_takes_the_lock_unless_told_not_to():
    installs = [line for line in dry_run().splitlines() if "pip install" in line]
    assert installs and all("--constraint constraints.txt" in line for line in installs)
    assert not any("--constraint" in line for line in dry_run("LOCK=none").splitlines())


def test_the_lock_holds_only_what_the_project_needs():
    """make lock walks the project's requirements (scripts/lock.py), so a package installed by hand is not locked.
    Only what is installed here can be walked: `make test` installs the project without its eval extra, and the
    packages only that extra needs are then neither installed nor walked."""
    import runpy
    from importlib.metadata import PackageNotFoundError, distribution

    def installed(package: str) -> bool:
        try:
            return bool(distribution(package))
        except PackageNotFoundError:
            return False

    needed = runpy.run_path(str(ROOT / "scripts" / "lock.py"))["needed"]()
    locked_here = {p for p in pins() if installed(p)}
    assert locked_here <= set(needed), sorted(locked_here - set(needed))
    assert len(locked_here) > len(pins()) / 2  # the project and its dev extra at least
