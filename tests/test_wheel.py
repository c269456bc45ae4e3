"""The built wheel works on its own (not only the editable checkout) and has the source tree's package layout."""

from __future__ import annotations

import subprocess
import sys
import zipfile

import pytest
from conftest import FIXTURES, ROOT


@pytest.fixture(scope="module")
def wheel_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    # Built as pip builds it for a user: in an isolated environment with pyproject's build requirements (a fresh
    # venv's own setuptools may be older than they allow).
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT)], check=True,
                   capture_output=True)
    wheel = next(out.glob("mlx_qwen36-*.whl"))
    site = out / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    return site


def test_wheel_has_the_source_tree_layout(wheel_dir):
    # Every module of the source tree's package is in the wheel at the same path, and nothing else is: so
    # `python -m mlx_qwen36.chat` run from a clone's root (source tree first on sys.path) imports what the wheel has.
    source = {p.relative_to(ROOT).as_posix() for p in (ROOT / "mlx_qwen36").rglob("*")
              if p.is_file() and "__pycache__" not in p.parts and not p.name.startswith(".")}
    wheel = {p.relative_to(wheel_dir).as_posix() for p in (wheel_dir / "mlx_qwen36").rglob("*") if p.is_file()}
    assert "mlx_qwen36/convert/hf.py" in source and "mlx_qwen36/metal/README.md" in source
    assert source == wheel


def test_top_level_convert_and_metal_are_the_package_folders():
    for name in ("convert", "metal"):
        assert (ROOT / name).resolve() == (ROOT / "mlx_qwen36" / name).resolve()


def test_wheel_loads_a_checkpoint_outside_the_checkout(wheel_dir, tmp_path):
    code = (
        "import mlx_qwen36, mlx_qwen36.convert.hf as hf, sys; "
        "assert all(f.startswith(sys.argv[1]) for f in (mlx_qwen36.__file__, hf.__file__)), hf.__file__; "
        "m = mlx_qwen36.load_model(sys.argv[2]); print(type(m).__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code, str(wheel_dir), str(FIXTURES / "dense-hf")], cwd=tmp_path,
                         env={"PYTHONPATH": str(wheel_dir), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "Model"
