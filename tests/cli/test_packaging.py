"""The package as pip builds it: the wheel holds every module and the console script, declares what the code
imports, and its `multimodal-pretrain` command runs from an environment where it is installed."""

from __future__ import annotations

import configparser
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.helpers import REPO

PACKAGES = ("lightning_modules", "datamodules")
NAME = "multimodal-pretrain"


def _pip(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pip", *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel `pip wheel --no-deps .` builds, from a copy of the sources: a build in the checkout would leave
    build/ and an .egg-info folder there."""
    setuptools = pytest.importorskip("setuptools")
    if tuple(int(p) for p in setuptools.__version__.split(".")[:2]) < (70, 1):
        pytest.importorskip(
            "wheel", reason="setuptools before 70.1 builds wheels with `wheel` (make install)"
        )
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md", "cli.py"):
        shutil.copy(REPO / name, src / name)
    for package in PACKAGES:
        shutil.copytree(REPO / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    # no isolated build environment (it would download setuptools) and no index: nothing is fetched
    done = _pip("wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", tmp / "dist", src)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (built,) = (tmp / "dist").glob("*.whl")
    return built


def _dist_info(archive: zipfile.ZipFile, name: str) -> str:
    (path,) = [n for n in archive.namelist() if n.endswith(f".dist-info/{name}")]
    return archive.read(path).decode()


def test_wheel_holds_every_module_and_the_console_script(wheel: Path) -> None:
    assert wheel.name.startswith("multimodal_pretrain-0.1.0-py3-none-any")
    with zipfile.ZipFile(wheel) as archive:
        record = {line.split(",")[0] for line in _dist_info(archive, "RECORD").splitlines()}
        entry_points = _dist_info(archive, "entry_points.txt")
        metadata = _dist_info(archive, "METADATA")
    # every module of the checkout, so a new sub-package without __init__.py cannot go missing from installs
    modules = {p.relative_to(REPO).as_posix() for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}
    assert "cli.py" in record and "lightning_modules/components/encoder.py" in modules
    assert sorted(modules - record) == []
    assert not any(n.startswith(("tests/", "configs/", "notebooks/")) for n in record)
    assert re.search(r"^\[console_scripts\]\nmultimodal-pretrain = cli:run$", entry_points, re.M), (
        entry_points
    )

    requires = re.findall(r"^Requires-Dist: (.+)$", metadata, re.M)
    assert f"Name: {NAME}" in metadata
    # cli.py imports yaml, and the omegaconf+ parser needs jsonargparse's omegaconf extra
    assert "PyYAML>=6" in requires
    assert any(r.startswith("jsonargparse[omegaconf,signatures]") for r in requires), requires
    # ranges, not pins, so the package installs beside other software
    torch = next(r for r in requires if r.startswith("torch") and r[5] in "<>=")
    assert "==" not in torch and ">=2.4" in torch, torch
    assert 'webdataset>=1.0; extra == "dev"' in requires


def test_ranges_admit_the_pinned_versions() -> None:
    """Each pin of constraints.txt (what `make` installs) lies inside the range setup.cfg declares."""
    from packaging.requirements import Requirement

    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    declared = [
        Requirement(line)
        for section, key in (("options", "install_requires"), ("options.extras_require", "dev"))
        for line in cfg[section][key].splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.lower().replace("_", "-")] = version
    for req in declared:
        name = req.name.lower().replace("_", "-")
        assert name in pins, f"{req.name} has no pin in constraints.txt"
        assert req.specifier.contains(pins[name]), f"{req.name}=={pins[name]} is outside {req.specifier}"


@pytest.mark.slow  # ~30 s on 2 busy cores: two interpreters import torch. The default run checks the wheel
def test_installed_console_script_runs(wheel: Path, tmp_path: Path) -> None:
    """Installed into a fresh environment (which sees the dependencies installed here), the command shows its
    help, and reports a bad checkpoint in one line with exit status 2."""
    venv = tmp_path / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", venv],
        check=True,
        timeout=120,
    )
    python = venv / "bin" / "python"
    # the system's pip, run by the environment's interpreter, installs into the environment
    done = subprocess.run(
        [python, "-m", "pip", "install", "--no-deps", "--no-index", wheel], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    script = venv / "bin" / NAME
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MMPRETRAIN_DEBUG")}
    where = subprocess.run(
        [python, "-c", "import importlib.util as u; print(u.find_spec('cli').origin)"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert Path(where.stdout.strip()).is_relative_to(venv), (
        where.stdout
    )  # the wheel's copy, not the checkout's

    shown = subprocess.run(
        [script, "--help"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert shown.returncode == 0, shown.stderr[-3000:]
    assert f"usage: {NAME} " in shown.stdout and "{fit,validate,test,predict}" in shown.stdout
    assert f"{NAME} export-hf" in shown.stdout.replace("\n", " ")

    notes = tmp_path / "notes.ckpt"
    notes.write_text("not weights\n")
    bad = subprocess.run(
        [script, "export-hf", "--ckpt_path", notes, "--out", tmp_path / "hf"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        f"error: {notes}: not a checkpoint of this framework (a text file)  [MMPRETRAIN_DEBUG=1 shows the traceback]"
    ]
