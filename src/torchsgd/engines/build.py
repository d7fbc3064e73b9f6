"""Compile, cache and load torchsgd's native CPU kernel.

The kernel is a small C++ file using only CPython's C API and ATen's core headers, compiled straight with
the system C++ compiler against the installed torch (no pybind11, no ninja). The shared object is cached
under ``$TORCHSGD_CACHE`` (default ``~/.cache/torchsgd``), keyed by the source, torch and Python versions,
the compiler, its flags and the CPU's instruction set, so a warm process loads it in milliseconds; a cold
build takes about 20-40 s once per machine (2 cores). If no compiler is available the fused engine falls back to
the multi-tensor engine and says so once.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import logging
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger("torchsgd")

SOURCE = Path(__file__).with_name("kernels") / "sgd_cpu.cpp"
MODULE_NAME = "_torchsgd_cpu"

_lock = threading.Lock()
_module: ModuleType | None = None
_failure: str | None = None


def cache_dir() -> Path:
    root = os.environ.get("TORCHSGD_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "torchsgd"


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _flags() -> list[str]:
    from torch.utils.cpp_extension import include_paths

    abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", 1))
    includes = [*include_paths(), sysconfig.get_paths()["include"]]
    arch = ["-march=native"] if platform.machine() in ("x86_64", "AMD64") else ["-mcpu=native"]
    return [
        "-O3",
        *arch,
        "-std=c++20",
        "-fPIC",
        "-shared",
        "-fopenmp",  # at::parallel_for runs on torch's OpenMP pool (the same libgomp, loaded once)
        "-ffp-contract=off",  # only the fma() calls we write: each one is a torch operation's rounding
        "-fno-math-errno",
        "-w",
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        *(f"-I{path}" for path in includes),
    ]


def _link_flags() -> list[str]:
    from torch.utils.cpp_extension import library_paths

    libs = library_paths()
    return [*(f"-L{path}" for path in libs), "-lc10", "-ltorch", "-ltorch_cpu", "-ltorch_python",
            *(f"-Wl,-rpath,{path}" for path in libs)]


def _key(compiler: str) -> str:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False).stdout
    digest = hashlib.sha256()
    for part in (SOURCE.read_bytes().decode(), torch.__version__, sys.version, version, " ".join(_flags()),
                 _cpu_signature()):
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def _load(path: Path) -> ModuleType:
    loader = importlib.machinery.ExtensionFileLoader(MODULE_NAME, str(path))
    spec = importlib.util.spec_from_file_location(MODULE_NAME, str(path), loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    module.init(torch.Tensor, torch.nn.Parameter)
    return module


def build(verbose: bool = False) -> Path:
    """Compile the kernel into the cache (if it is not there yet) and return the shared object's path."""
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C++ compiler found (tried $CXX, g++, c++, clang++)")
    target_dir = cache_dir() / _key(compiler)
    target = target_dir / f"{MODULE_NAME}{sysconfig.get_config_var('EXT_SUFFIX')}"
    if target.exists():
        return target
    target_dir.mkdir(parents=True, exist_ok=True)
    log.warning("torchsgd: compiling the fused CPU kernel once for this machine (about 20-40 s) into %s", target_dir)
    with tempfile.TemporaryDirectory(dir=target_dir) as tmp:
        partial = Path(tmp) / target.name
        command = [compiler, *_flags(), str(SOURCE), "-o", str(partial), *_link_flags()]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"compiling {SOURCE.name} failed:\n{result.stderr[-4000:]}")
        if verbose:
            print(" ".join(command))
        os.replace(partial, target)  # atomic: concurrent builders never see a half-written file
    return target


def _hash_is_identity() -> bool:
    # The kernel looks parameters up in the state dict by address, which is what Tensor.__hash__ (id)
    # hashes to; make sure that still holds for this torch.
    sample = torch.nn.Parameter(torch.zeros(1))
    return hash(sample) == id(sample) and hash(torch.zeros(1)) != -1


def native_module() -> ModuleType | None:
    """The loaded kernel module, building it on first use; None (with one warning) if it cannot be had."""
    global _module, _failure
    if _module is not None or _failure is not None:
        return _module
    with _lock:
        if _module is not None or _failure is not None:
            return _module
        if os.environ.get("TORCHSGD_DISABLE_NATIVE"):
            _failure = "disabled by TORCHSGD_DISABLE_NATIVE"
            return None
        try:
            if not _hash_is_identity():
                raise RuntimeError("torch.Tensor.__hash__ is not id(); the kernel's state lookup would be wrong")
            _module = _load(build())
        except Exception as error:  # noqa: BLE001 - any failure means: use the generic engine
            _failure = str(error)
            log.warning("torchsgd: the fused CPU kernel is unavailable (%s); using the multi-tensor engine", error)
    return _module


def native_failure() -> str | None:
    """Why the native kernel could not be loaded, or None."""
    return _failure


def main() -> None:
    """Warm the cache (the Makefile's setup step runs this) and say where the kernel is."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    module = native_module()
    print(f"torchsgd fused CPU kernel: {module.__file__ if module else 'unavailable: ' + str(native_failure())}")
