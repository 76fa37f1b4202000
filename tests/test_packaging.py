"""The sdist and the wheel, built for real (``python -m build``, offline), and the wheel installed
into a fresh virtual environment the way the notebook's ``INSTALL_FROM`` does it.

The sdist is the whole source: unpacked, its tests (conftest and helpers included) run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import nbformat
import pytest

import colab_remote

ROOT = Path(__file__).resolve().parent.parent
VERSION = colab_remote.__version__
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__",
                                    ".mypy_cache", ".ruff_cache", ".pytest_cache")


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sdist and the wheel, built from a copy of this checkout (no build output lands here)."""
    base = tmp_path_factory.mktemp("dist")
    source = base / "source"
    shutil.copytree(ROOT, source, ignore=NOT_SOURCE)
    done = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(base / "out"),
                           str(source)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return base / "out"


def test_the_wheel_holds_the_package_and_the_license(dist: Path) -> None:
    (wheel,) = dist.glob("*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        license_text = z.read(f"colab_remote-{VERSION}.dist-info/licenses/LICENSE").decode()
        metadata = z.read(f"colab_remote-{VERSION}.dist-info/METADATA").decode()
    assert license_text == (ROOT / "LICENSE").read_text()
    assert "MIT License" in license_text and "Copyright (c) 2026 the colab-remote authors" in license_text
    assert "colab_remote/py.typed" in names and "colab_remote/cli.py" in names
    assert {n.split("/")[0] for n in names} == {"colab_remote", f"colab_remote-{VERSION}.dist-info"}
    assert "License-Expression: MIT" in metadata
    assert "Project-URL: Source, https://github.com/colab-remote/colab-remote" in metadata


def test_the_sdist_runs_its_own_tests(dist: Path, tmp_path: Path) -> None:
    (sdist,) = dist.glob("*.tar.gz")
    with tarfile.open(sdist) as t:
        if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12
            t.extractall(tmp_path, filter="data")
        else:
            t.extractall(tmp_path)
    unpacked = tmp_path / f"colab_remote-{VERSION}"
    for needed in ("LICENSE", "tests/conftest.py", "tests/reverse_helpers.py", "tests/gcloud_helpers.py",
                   "tests/fake_compute.py", "docs/api.md", "examples/Colab_SSH.ipynb", "demo.sh",
                   "scripts/bootstrap.sh"):
        assert (unpacked / needed).is_file(), needed

    def collect(folder: Path) -> list[str]:
        done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p",
                               "no:cacheprovider", "tests"], cwd=folder, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return [line for line in done.stdout.splitlines() if "::" in line]

    assert collect(unpacked) == collect(ROOT)  # every test module imports its helpers
    saved_form = "tests/test_notebook.py::test_notebook_is_saved_without_outputs_and_has_tagged_parameters"
    ran = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "tests/test_docs.py", saved_form],
                         cwd=unpacked, capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0 and " passed" in ran.stdout, ran.stdout[-3000:] + ran.stderr[-3000:]


def test_the_notebook_installs_a_wheel_into_a_fresh_environment(dist: Path, tmp_path: Path) -> None:
    """INSTALL_FROM = a wheel's path, offline: the notebook's own install cell, in a new venv whose
    dependencies are borrowed from the test environment (the package itself is not)."""
    (wheel,) = dist.glob("*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    deps = tmp_path / "deps"
    deps.mkdir()
    ours = Path(sysconfig.get_paths()["purelib"])
    skip = ("colab_remote", "__editable__", "pip", "setuptools", "_distutils_hack", "pkg_resources",
            "distutils-precedence")
    for entry in ours.iterdir():
        if not entry.name.startswith(skip):
            (deps / entry.name).symlink_to(entry)
    Path(purelib, "borrowed-deps.pth").write_text(f"{deps}\n")

    nb = nbformat.read(ROOT / "examples" / "Colab_SSH.ipynb", as_version=4)
    (install,) = [c.source for c in nb.cells if c.cell_type == "code" and "pip" in c.source
                  and "INSTALL_FROM" in c.source]
    script = f"INSTALL_FROM = {str(wheel)!r}\n{install}\nprint(colab_remote.__file__)\n"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PIP_NO_INDEX="1", PIP_NO_DEPS="1")
    done = subprocess.run([str(python), "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    printed = done.stdout.splitlines()
    assert f"colab-remote {VERSION}" in printed
    assert printed[-1].startswith(purelib), printed  # the wheel's copy, not this checkout's
    version = subprocess.run([str(venv / "bin" / "colab-remote"), "--version"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=60)
    assert version.stdout.strip() == f"colab-remote {VERSION}"
    licensed = subprocess.run([str(python), "-c", "import importlib.metadata as m; "
                               "print([str(f) for f in m.files('colab-remote') if 'LICENSE' in str(f)])"],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert "licenses/LICENSE" in licensed.stdout, licensed.stdout + licensed.stderr
