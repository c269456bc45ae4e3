"""The built wheel works on its own (not only the editable checkout): convert/ and metal/ map into the package."""

from __future__ import annotations

import subprocess
import sys
import zipfile

import pytest
from conftest import FIXTURES, ROOT


@pytest.fixture(scope="module")
def wheel_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(out), str(ROOT)], check=True, capture_output=True)
    wheel = next(out.glob("mlx_qwen36-*.whl"))
    site = out / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    return site


def test_wheel_contains_the_mapped_packages(wheel_dir):
    assert (wheel_dir / "mlx_qwen36" / "convert" / "hf.py").is_file()
    assert (wheel_dir / "mlx_qwen36" / "model.py").is_file()


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
