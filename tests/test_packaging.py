"""Packaging: ranges in pyproject that admit newer libraries, the lock file `make` installs, LICENSE,
`raydc --version`, and `raydc config show` / `--json-schema` (every field, its default and its comment)."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tomllib
from dataclasses import dataclass

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.conftest import REPO

PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
EXTRAS = ("cpu", "test", "tune", "mlflow")


def requirements(extras=EXTRAS) -> dict[str, Requirement]:
    reqs = list(PROJECT["dependencies"]) + [r for e in extras for r in PROJECT["optional-dependencies"][e]]
    return {canonicalize_name(Requirement(r).name): Requirement(r) for r in reqs}


def lock() -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements-lock.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version.strip()
    return pins


@pytest.mark.parametrize("name, version", [("torch", "2.15.0"), ("torchvision", "0.30.0"), ("ray", "2.61.0"),
                                           ("faiss-cpu", "1.16.0"), ("torch", "2.14.1"), ("ray", "2.60.0")])
def test_the_ranges_admit_newer_releases(name, version):
    """The library once pinned torch==2.14.1 and ray==2.60.0: installing it downgraded a newer torch."""
    assert requirements()[name].specifier.contains(version), requirements()[name]


def test_the_ranges_stop_at_the_next_ray_major():
    assert not requirements()["ray"].specifier.contains("3.0.0")


def test_the_lock_pins_every_requirement_within_its_range():
    pins = lock()
    for name, req in requirements().items():
        assert name in pins, f"{name} is required but requirements-lock.txt has no pin for it"
        assert req.specifier.contains(pins[name], prereleases=True), (req, pins[name])
    assert pins["torch"] and pins["ray"]


def test_the_makefile_installs_the_lock_and_hashes_it():
    make = (REPO / "Makefile").read_text()
    assert "requirements-lock.txt" in make.split("STAMP :=")[1].splitlines()[0]
    assert "-c requirements-lock.txt" in make


def test_license_and_description():
    assert (REPO / "LICENSE").read_text().startswith("MIT License")
    assert "raydc authors" in (REPO / "LICENSE").read_text()
    for method in ("DeepCluster", "DEC", "DAC"):
        assert method in PROJECT["description"]


def test_version_flag(capsys):
    import raydc
    from raydc.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"raydc {raydc.__version__} (") and "ray 2." in out and "torch " in out


# ---- config show ---------------------------------------------------------------------------------------------

@dataclass
class _Example:
    """The comment layouts the config's source uses."""

    a: int = 1                 # beside the field
    # a block above
    # of two lines
    b: str = "x#y"             # the block loses to the comment beside
    # a block above
    c: float = 0.5

    d: bool = True
    # a block cut by a blank line

    e: int = 2


def test_field_comments_are_read_from_the_source():
    from raydc.config_doc import field_comments

    assert field_comments(_Example) == {"a": "beside the field", "b": "the block loses to the comment beside",
                                        "c": "a block above"}


def _show(*argv: str, capsys) -> str:
    from raydc.cli import main

    assert main(["config", "show", *argv]) == 0
    return capsys.readouterr().out


def test_config_show_lists_every_field_with_its_default_and_comment(capsys):
    from raydc.config import ClusterConfig, Config
    from raydc.config_doc import field_comments
    from raydc.config_loader import to_dict

    out = _show(capsys=capsys)
    shown = yaml.safe_load(out)  # the output is a config file as it stands
    want = to_dict(Config())
    for other in ("dec", "dac"):
        want.pop(other)
    assert shown == want
    lines = out.splitlines()
    assert "  pca_dim: 256" in "\n".join(lines) and any(
        line.startswith("  pca_dim: 256") and "# 0 disables PCA [int]" in line for line in lines)
    # every commented field of a section shows its comment
    text = " ".join(line.lstrip("# ").strip() for line in lines)
    for name, comment in field_comments(ClusterConfig).items():
        assert " ".join(comment.split()) in text or comment[:40] in text, name


def test_config_show_with_a_file_and_a_method_marks_what_differs(capsys):
    out = _show("--config", str(REPO / "jobs/configs/demo.yaml"), "--set", "cluster.k=70", "--method", "dec",
                capsys=capsys)
    shown = yaml.safe_load(out)
    assert shown["method"] == "dec" and "dec" in shown and "deepcluster" not in shown
    assert shown["cluster"]["k"] == 70  # demo.yaml says 100 (and final_k 10): 70 is the override
    k_line = next(line for line in out.splitlines() if line.startswith("  k: 70"))
    assert "(default: 10)" in k_line
    assert "(default" not in next(line for line in out.splitlines() if line.startswith("  niter:"))
    # the fields a --resume may change say so, the rest do not
    assert "(may change on --resume)" in next(line for line in out.splitlines() if line.startswith("  epochs:"))
    assert "(may change on --resume)" in next(line for line in out.splitlines() if line.startswith("  tol:"))
    assert "--resume" not in next(line for line in out.splitlines() if line.startswith("  lr:"))


def test_json_schema_describes_and_checks_the_config(capsys):
    from pydantic import TypeAdapter, ValidationError

    from raydc.config import Config
    from raydc.config_doc import json_schema

    out = _show("--json-schema", capsys=capsys)
    schema = json.loads(out)
    assert schema == json_schema()
    assert schema["$defs"]["ClusterConfig"]["properties"]["pca_dim"]["description"] == "0 disables PCA"
    assert schema["$defs"]["ClusterConfig"]["properties"]["mode"]["enum"] == ["auto", "single", "distributed"]
    assert set(schema["properties"]) == {f.name for f in dataclasses.fields(Config)}
    with pytest.raises(ValidationError):
        TypeAdapter(Config).validate_python({"cluster": {"mode": "sometimes"}})


# ---- a real install ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_installing_into_a_venv_keeps_its_torch(tmp_path):
    """`pip install -e .` into a venv that holds another torch than the lock's keeps that torch. The newest torch
    this machine's package index has is the lock's, so the venv gets an older one (2.13): the ranges must
    admit it too, or pip would replace it. Minutes: it installs Ray and the rest."""
    venv = tmp_path / "v"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run(pip + ["torch==2.13.0+cpu", "torchvision==0.28.0"], check=True)
    before = subprocess.run([str(venv / "bin/python"), "-c", "import torch;print(torch.__version__)"],
                            check=True, capture_output=True, text=True).stdout.strip()
    subprocess.run(pip + ["-e", f"{REPO}[cpu]"], check=True, env=dict(os.environ, PIP_NO_INPUT="1"))
    after = subprocess.run([str(venv / "bin/python"), "-c", "import torch;print(torch.__version__)"],
                           check=True, capture_output=True, text=True).stdout.strip()
    assert after == before
    subprocess.run([str(venv / "bin/python"), "-m", "pip", "check"], check=True)
