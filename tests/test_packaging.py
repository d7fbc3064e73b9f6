"""The wheel ships the kernel's source, and a plain (non-editable) install runs the native kernel.

The fresh environment shares the kernel cache with the repository's: the cache key holds no paths, so the
install finds the build the repository's environment made and compiles nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from torchsgd.engines import build as kernel_build

ROOT = Path(__file__).resolve().parents[1]

SNIPPET = """
import torch, torchsgd
from torchsgd.engines.build import SOURCE, native_module
assert "site-packages" in torchsgd.__file__, torchsgd.__file__
assert SOURCE.is_file(), SOURCE
p = torch.nn.Parameter(torch.ones(8)); opt = torchsgd.SGD([p], lr=0.1, momentum=0.9)
for _ in range(2):
    p.grad = torch.ones(8); opt.step()
assert torch.allclose(p, torch.full((8,), 1 - 0.1 - 0.19)), p
report = opt.engine_report()
assert report == [{"group": 0, "selected": "fused", "ran": "fused", "reason": None}], report
assert native_module() is not None
print(native_module().__file__)
"""


def run(*command: object) -> subprocess.CompletedProcess:
    out = subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"{command} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
    return out


@pytest.mark.slow
def test_a_wheel_install_runs_the_native_kernel_built_by_another_environment(tmp_path):
    try:
        shared = kernel_build.build()  # the repository environment's build (compiled here only if cold)
    except RuntimeError as error:
        pytest.skip(f"the native kernel cannot be built here: {error}")

    dist = tmp_path / "dist"
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", dist, ROOT)
    (wheel,) = dist.glob("torchsgd-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    for source in kernel_build.SOURCES:
        assert f"torchsgd/engines/kernels/{source.relative_to(kernel_build.KERNELS).as_posix()}" in names

    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    # The repository's pip installs into the new environment; torch comes from local disk. --no-compile
    # skips byte-compiling torch's ~4,000 modules (40 s on a loaded 2-core machine).
    run(
        sys.executable,
        "-m",
        "pip",
        "--python",
        python,
        "install",
        "-q",
        "--no-compile",
        "-c",
        ROOT / "constraints.txt",
        "torch",
        wheel,
    )

    elsewhere = tmp_path / "elsewhere"  # not the repository: `import torchsgd` must find the installed one
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TORCHSGD_DISABLE_NATIVE", "CXX")}
    env["TORCHSGD_CACHE"] = str(kernel_build.cache_dir())
    out = subprocess.run(
        [str(python), "-c", SNIPPET], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert "unavailable" not in out.stderr, out.stderr
    assert "compiling" not in out.stderr, out.stderr  # it reused the repository environment's build
    assert out.stdout.strip() == str(shared)
