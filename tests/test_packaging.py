"""The distribution: ``callbacks/`` ships as ``flexmoe.callbacks`` from a wheel and from an
editable install alike, and every subpackage in the source tree is in the wheel.

The fresh venv gets the wheel and nothing else from this project; its third-party
dependencies (torch, transformers, ...) come from this interpreter's site-packages through
a ``.pth`` path entry, which adds directories to ``sys.path`` without running that
directory's own ``.pth`` files, so the editable install's import hook stays out of it.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # builds a wheel and a fresh venv

REPO = Path(__file__).resolve().parents[1]
SOURCES = ["pyproject.toml", "setup.py", "README.md", "flexmoe", "callbacks"]


def source_packages() -> list[str]:
    """Import names of every package in the source tree (``callbacks/x`` -> ``flexmoe.callbacks.x``)."""
    names = []
    for root, prefix in ((REPO / "flexmoe", "flexmoe"), (REPO / "callbacks", "flexmoe.callbacks")):
        for init in sorted(root.rglob("__init__.py")):
            names.append(".".join((prefix, *init.parent.relative_to(root).parts)))
    return names


def run(cmd, **kw) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300, env=env, **kw)
    assert r.returncode == 0, f"{cmd} failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    return r


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # Build from a copy so the build's scratch files never land in the working tree.
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, src / name)
    dist = tmp_path_factory.mktemp("dist")
    run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", dist, src])
    (whl,) = dist.glob("flexmoe-*.whl")
    return whl


def test_wheel_holds_every_package_under_its_import_name(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for package in source_packages():
        assert package.replace(".", "/") + "/__init__.py" in names, f"{package} missing from the wheel"
    assert "flexmoe/callbacks/__init__.py" in names
    # no stray top-level packages: a bare `callbacks` would collide with a PyPI name
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"flexmoe"}
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    assert "flexmoe = flexmoe.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_wheel_installs_in_a_fresh_venv_and_imports(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False, symlinks=os.name != "nt")
    python = env_dir / ("Scripts" if os.name == "nt" else "bin") / "python"
    run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "--quiet", wheel])
    # Dependencies only after the install, so pip never sees (or touches) this venv's flexmoe.
    purelib = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    Path(purelib, "_flexmoe_test_deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")

    check = f"""
import importlib, importlib.util, pathlib, sys
prefix = pathlib.Path(sys.prefix).resolve()
for name in {source_packages()!r}:
    module = importlib.import_module(name)
    path = pathlib.Path(module.__file__).resolve()
    assert prefix in path.parents, f"{{name}} imported from {{path}}, not from the wheel"
assert importlib.util.find_spec("callbacks") is None, "a bare `callbacks` package was installed"
import flexmoe, flexmoe.callbacks
print(flexmoe.__version__, flexmoe.callbacks.__name__)
"""
    r = run([python, "-c", check], cwd=tmp_path)  # cwd: keep the source tree off sys.path
    assert r.stdout.split() == [__import__("flexmoe").__version__, "flexmoe.callbacks"]
    cli = env_dir / ("Scripts" if os.name == "nt" else "bin") / "flexmoe"
    assert run([cli, "--help"], cwd=tmp_path).stdout.startswith("usage: flexmoe")


def test_editable_install_imports_callbacks_from_the_top_level_folder(tmp_path):
    code = "import flexmoe, flexmoe.callbacks; print(flexmoe.__file__); print(flexmoe.callbacks.__file__)"
    pkg, callbacks = run([sys.executable, "-c", code], cwd=tmp_path).stdout.split()
    if Path(pkg).resolve().parent != REPO / "flexmoe":
        pytest.skip(f"flexmoe is not installed from this checkout in editable mode ({pkg})")
    assert Path(callbacks).resolve() == REPO / "callbacks" / "__init__.py"
