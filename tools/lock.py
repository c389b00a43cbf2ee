"""Write requirements-lock.txt: the exact versions, as installed in this environment, of everything raydc and
the extras named on the command line need (their requirements' closure, markers evaluated here).

Why not `pip freeze` alone: a developer's venv holds tools of their own; the lock must hold what `make`
installs and nothing else, so that its hash (the Makefile's stamp) changes only when that does.

    python tools/lock.py cpu test mlflow tune > requirements-lock.txt
"""
from __future__ import annotations

import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


def _applies(req: Requirement, extras: set[str]) -> bool:
    if req.marker is None:
        return True
    env = default_environment()
    return any(req.marker.evaluate({**env, "extra": e}) for e in (extras or {""}))


def closure(requirements: list[str]) -> dict[str, str]:
    """{canonical name: installed version} of `requirements` and everything they require, recursively."""
    found: dict[str, str] = {}
    todo = [Requirement(r) for r in requirements]
    seen: set[tuple[str, frozenset]] = set()
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        key = (name, frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            sys.exit(f"{req.name} is required ({req}) but not installed here: install it, then lock")
        if not req.specifier.contains(dist.version, prereleases=True):
            sys.exit(f"installed {req.name} {dist.version} does not satisfy {req}")
        found[name] = dist.version
        for text in dist.requires or []:
            sub = Requirement(text)
            if _applies(sub, set(req.extras)):
                todo.append(sub)
    return found


def main(extras: list[str]) -> None:
    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    reqs = [r for r in project["dependencies"] if _applies(Requirement(r), set())]
    for e in extras:
        reqs += project["optional-dependencies"][e]
    pins = closure(reqs)
    print(f"# raydc[{','.join(extras)}] and its dependencies, exactly as tested: `make lock` rewrites this file "
          f"(tools/lock.py)")
    print(f"# from Python {sys.version_info.major}.{sys.version_info.minor}")
    for name in sorted(pins):
        print(f"{name}=={pins[name]}")


if __name__ == "__main__":
    main(sys.argv[1:])
