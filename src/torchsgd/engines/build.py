"""Compile, cache and load torchsgd's native CPU kernel.

The kernel is C++ using only CPython's C API and ATen's core headers: ``kernels/cpu/binding.cpp`` and the
headers beside it, one translation unit, compiled straight with the system C++ compiler against the
installed torch (no pybind11, no ninja), with ``-Wall -Wextra`` (torch's and Python's headers are included
as system headers, so only the kernel's own code can warn; it does not, and a warning would be logged). The
shared object is cached under ``$TORCHSGD_CACHE`` (default ``~/.cache/torchsgd``) in a directory named by
a key of everything that determines the binary: the kernel's source files, torch's version and C++ ABI
flag, Python's version and extension suffix, the compiler flags without their include and library paths,
and the CPU's instruction set. Paths are not identity, so every virtual environment with the same torch
and Python shares one build.

Next to the shared object a manifest (written last, atomically) records the key, the compiler that built
it, and the object's size and sha256. A process loads the object only when both match (hashing ~1 MB costs
about a millisecond), so finding and loading a valid build needs no compiler, and a truncated or damaged
file is rebuilt instead of being mapped (a truncated one would kill the process with SIGBUS). Builders take
a lock on the directory, so concurrent processes compile once and never see each other's half-written
files. A cold build takes 1-3 minutes on 2 cores; ``python -m torchsgd build`` does it ahead of time. If no
compiler is available the fused engine falls back to the multi-tensor engine and says so once.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.machinery
import importlib.util
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

try:
    import fcntl
except ImportError:  # not POSIX: builds still never expose half-written files (os.replace), only may overlap
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("torchsgd")

KERNELS = Path(__file__).with_name("kernels")
SOURCE = KERNELS / "cpu" / "binding.cpp"  # what the compiler is given: it includes the rest
SOURCE_SUFFIXES = (".cpp", ".cc", ".c", ".h", ".hpp")
MODULE_NAME = "_torchsgd_cpu"
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
COMPILERS = ("g++", "c++", "clang++")
FIX_HINT = (
    "install a C++ compiler (e.g. `apt-get install g++`, or set CXX) and run `python -m torchsgd build`; "
    "set TORCHSGD_DISABLE_NATIVE=1 to skip the native kernel"
)

_lock = threading.Lock()
_module: ModuleType | None = None
_failure: str | None = None

# progress(event, info) hears about a build: "wait" (another process holds the lock), "compile" (it
# starts) and "done" (it finished); see _log_progress for the fields.
Progress = Callable[[str, dict[str, Any]], None]


def cache_dir() -> Path:
    """The cache's root: ``$TORCHSGD_CACHE``, else ``$XDG_CACHE_HOME/torchsgd``, else ``~/.cache/torchsgd``."""
    root = os.environ.get("TORCHSGD_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "torchsgd"


def compiler() -> str | None:
    """The C++ compiler a build would use ($CXX, else g++, c++, clang++ on PATH), or None."""
    for name in (os.environ.get("CXX"), *COMPILERS):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _compiler_identity(path: str) -> str:
    try:
        result = subprocess.run([path, "--version"], capture_output=True, text=True, check=False, timeout=30)
    except (OSError, subprocess.SubprocessError) as error:
        return f"unknown ({error})"
    lines = result.stdout.strip().splitlines()
    return lines[0] if lines else f"unknown (exit status {result.returncode})"


def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("flags", "Features")):  # x86, ARM
                    return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return platform.processor() or platform.machine()


def compile_flags() -> list[str]:
    """The compiler flags that shape the binary; the include and library paths are added at build time."""
    abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", 1))
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
        "-Wall",
        "-Wextra",
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
    ]


LINK_LIBRARIES = ["-lc10", "-ltorch", "-ltorch_cpu", "-ltorch_python"]


def _path_flags() -> tuple[list[str], list[str]]:
    """(include flags, library flags): where this environment's headers and libraries are."""
    from torch.utils.cpp_extension import include_paths, library_paths

    includes = [*include_paths(), sysconfig.get_paths()["include"]]
    libs = library_paths()
    # The rpath only helps a loader that has not imported torch yet; torch's libraries are loaded (and
    # matched by soname) before the kernel, so a build made in another environment loads the same way.
    # -isystem: warnings in torch's and Python's headers are theirs, not the kernel's.
    return [f"-isystem{path}" for path in includes], [
        *(f"-L{path}" for path in libs),
        *(f"-Wl,-rpath,{path}" for path in libs),
    ]


def _sources() -> list[Path]:
    """Every kernel source file (the cache key hashes them all: an edited header is a new build)."""
    return sorted(p for p in KERNELS.rglob("*") if p.suffix in SOURCE_SUFFIXES and p.is_file())


SOURCES = tuple(_sources())  # binding.cpp (SOURCE) and the headers it includes


def key_fields() -> dict[str, Any]:
    """Everything the binary depends on except the compiler (recorded in the manifest, not needed to find it)."""
    sources = hashlib.sha256()
    for path in _sources():
        sources.update(path.relative_to(KERNELS).as_posix().encode() + b"\0")
        sources.update(path.read_bytes())
        sources.update(b"\0")
    return {
        "sources": sources.hexdigest(),
        "torch": torch.__version__,
        "torch_git": getattr(torch.version, "git_version", None),
        "cxx11_abi": int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", 1)),
        "python": f"{sys.implementation.name} {platform.python_version()}",
        "ext_suffix": sysconfig.get_config_var("EXT_SUFFIX"),
        "flags": [*compile_flags(), *LINK_LIBRARIES],
        "machine": platform.machine(),
        "cpu": hashlib.sha256(_cpu_signature().encode()).hexdigest(),
    }


def cache_key(fields: dict[str, Any] | None = None) -> str:
    text = json.dumps(key_fields() if fields is None else fields, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def target_dir() -> Path:
    return cache_dir() / cache_key()


def _target(directory: Path) -> Path:
    return directory / f"{MODULE_NAME}{sysconfig.get_config_var('EXT_SUFFIX')}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(directory: Path) -> dict[str, Any] | None:
    try:
        manifest = json.loads((directory / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def check(directory: Path | None = None) -> tuple[Path | None, str]:
    """(the verified shared object, "ok") or (None, why the cache holds no usable build)."""
    directory = target_dir() if directory is None else directory
    target = _target(directory)
    if not target.exists():
        return None, f"no build in {directory}"
    manifest = read_manifest(directory)
    if manifest is None:
        return None, f"{target} has no readable {MANIFEST_NAME}"
    if manifest.get("format") != MANIFEST_FORMAT or manifest.get("key") != directory.name:
        return None, f"{directory / MANIFEST_NAME} is for another build"
    size = target.stat().st_size
    if size != manifest.get("size"):
        return None, f"{target} is {size} bytes, the manifest says {manifest.get('size')} (truncated?)"
    if _sha256(target) != manifest.get("sha256"):
        return None, f"{target}'s sha256 does not match the manifest's (damaged?)"
    return target, "ok"


@contextlib.contextmanager
def _locked(directory: Path, progress: Progress) -> Iterator[None]:
    if fcntl is None:
        yield
        return
    with open(directory / ".lock", "a+b") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress("wait", {"dir": directory})
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _write_atomically(path: Path, text: str) -> None:
    fd, partial = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(partial, 0o644)  # mkstemp makes it 0600; a cache baked into an image is read by other users
        os.replace(partial, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(partial)
        raise


def _log_progress(event: str, info: dict[str, Any]) -> None:
    """What a first step() that must wait for a build says (the CLI's `torchsgd build` says its own)."""
    if event == "wait":
        log.warning("torchsgd: another process is compiling the native CPU kernel into %s; waiting for it", info["dir"])
    elif event == "compile":
        reason = "" if info["reason"].startswith("no build in") else f" ({info['reason']})"
        log.warning(
            "torchsgd: compiling the native CPU kernel for this machine (once; usually 1-3 minutes on 2 cores) "
            "into %s%s; run `python -m torchsgd build` ahead of time to avoid this wait. "
            "Set TORCHSGD_DISABLE_NATIVE=1 to skip it.",
            info["dir"],
            reason,
        )
    elif event == "done":
        log.warning("torchsgd: built in %.0f s: %s", info["seconds"], info["path"])


def build(verbose: bool = False, *, force: bool = False, progress: Progress | None = None) -> Path:
    """The verified kernel in the cache, compiling it first if it is missing, damaged or ``force`` is set.

    Raises RuntimeError (with the compiler's error) when it must compile and cannot.
    """
    progress = _log_progress if progress is None else progress
    fields = key_fields()
    directory = cache_dir() / cache_key(fields)
    if not force:
        target, reason = check(directory)
        if target is not None:
            return target
    else:
        reason = "--force"
    cxx = compiler()
    if cxx is None:
        raise RuntimeError(f"{reason}, and no C++ compiler was found to build it (tried $CXX, {', '.join(COMPILERS)})")
    directory.mkdir(parents=True, exist_ok=True)
    with _locked(directory, progress):
        if not force:  # another process may have built it while this one waited for the lock
            target, reason = check(directory)
            if target is not None:
                return target
        if fcntl is not None:  # this process holds the lock: temporaries left here are from killed builders
            for stale in [*directory.glob(".build-*"), *directory.glob(f".{MANIFEST_NAME}.*")]:
                if stale.is_dir():
                    shutil.rmtree(stale, ignore_errors=True)
                else:
                    stale.unlink(missing_ok=True)
        target = _target(directory)
        includes, libs = _path_flags()
        flags = compile_flags()
        progress("compile", {"compiler": cxx, "flags": flags, "source": SOURCE, "dir": directory, "reason": reason})
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(dir=directory, prefix=".build-") as tmp:
            partial = Path(tmp) / target.name
            command = [cxx, *flags, *includes, str(SOURCE), "-o", str(partial), *libs, *LINK_LIBRARIES]
            if verbose:
                print(" ".join(command), flush=True)
            result = subprocess.run(command, capture_output=True, text=True, check=False)
            if result.returncode != 0 or not partial.is_file():
                error = (result.stderr or result.stdout).strip()[-4000:]
                raise RuntimeError(
                    f"compiling {SOURCE.name} with {cxx} failed (exit status {result.returncode}):\n{error}"
                )
            if result.stderr.strip():  # the kernel compiles without warnings: one is news
                log.warning("torchsgd: compiling %s gave warnings:\n%s", SOURCE.name, result.stderr.strip()[-4000:])
            seconds = time.perf_counter() - start
            manifest = {
                "format": MANIFEST_FORMAT,
                "key": directory.name,
                "fields": fields,
                "compiler": cxx,
                "compiler_version": _compiler_identity(cxx),
                "seconds": round(seconds, 1),
                "built": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "size": partial.stat().st_size,
                "sha256": _sha256(partial),
            }
            os.replace(partial, target)  # atomic: a reader never sees a half-written object
        _write_atomically(directory / MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n")  # last: it vouches
    progress("done", {"seconds": seconds, "path": target})
    return target


def load(path: Path) -> ModuleType:
    loader = importlib.machinery.ExtensionFileLoader(MODULE_NAME, str(path))
    spec = importlib.util.spec_from_file_location(MODULE_NAME, str(path), loader=loader)
    if spec is None:
        raise ImportError(f"cannot load the kernel from {path}")
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    module.init(torch.Tensor, torch.nn.Parameter)
    return module


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
            _module = load(build())
        except Exception as error:
            _failure = str(error)
            log.warning(
                "torchsgd: the native CPU kernel is unavailable (%s); using the multi-tensor engine. To fix: %s",
                error,
                FIX_HINT,
            )
    return _module


def native_failure() -> str | None:
    """Why the native kernel could not be loaded, or None."""
    return _failure


def main() -> None:
    """Warm the cache and say where the kernel is (``python -m torchsgd build`` does this with progress)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    module = native_module()
    print(f"torchsgd native CPU kernel: {module.__file__ if module else 'unavailable: ' + str(native_failure())}")
