"""A built wheel carries everything Conveyor needs at run time, the C kernels' sources included."""

import os
import shutil
import subprocess
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOT_SHIPPED = shutil.ignore_patterns(".git", "tests", "build", "dist", "*.egg-info", "__pycache__", ".venv*",
                                     "bench_results")


def test_installed_wheel_builds_the_cpu_kernels(tmp_path):
    source, wheels, site = tmp_path / "source", tmp_path / "wheels", tmp_path / "site"
    shutil.copytree(ROOT, source, ignore=NOT_SHIPPED)  # setuptools builds in the tree; keep the checkout clean
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(source),
                    "-w", str(wheels)], check=True, capture_output=True, timeout=120)
    (wheel,) = wheels.glob("conveyor-*.whl")
    zipfile.ZipFile(wheel).extractall(site)  # what pip install puts in site-packages
    load = ("import conveyor.kernels.cpu as cpu; assert cpu.HERE.startswith(%r), cpu.HERE; "
            "assert cpu.load() is not None" % str(site))
    result = subprocess.run([sys.executable, "-c", load], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(site), "CONVEYOR_CACHE_DIR": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr[-3000:]
