"""The lock: the installed versions of what the project needs (its dependencies and its dev and eval extras, and
theirs, as their metadata requires them on this platform), torch aside, whose build TORCH picks, and the
environment's own pip and setuptools. Nothing else
installed in the environment enters it. `make lock` writes it to constraints.txt."""
from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, distribution

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

PROJECT, EXTRAS = "llm-pipeline", ("dev", "eval")
ENVIRONMENT = ("pip", "setuptools", "wheel")  # what the virtual environment comes with, as pip freeze leaves out


def needed() -> dict[str, str]:
    """{name: version} of every distribution the project requires, through its requirements' requirements."""
    found: dict[str, tuple[str, set]] = {}
    todo = [(PROJECT, set(EXTRAS))]
    while todo:
        name, extras = todo.pop()
        try:
            dist = distribution(name)
        except PackageNotFoundError:  # required elsewhere only (another platform's marker) or not installed
            continue
        key = canonicalize_name(dist.metadata["Name"])
        if key in found and extras <= found[key][1]:
            continue
        found[key] = (f"{dist.metadata['Name']}=={dist.version}", extras | found.get(key, ("", set()))[1])
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in extras | {""}):
                todo.append((req.name, set(req.extras)))
    return {k: pin for k, (pin, _) in found.items() if k not in (PROJECT, "torch", *ENVIRONMENT)}


if __name__ == "__main__":
    sys.stdout.write("".join(f"{pin}\n" for _, pin in sorted(needed().items())))
