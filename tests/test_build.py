"""The native kernel's cache: what its key holds, damaged builds, loading without a compiler, concurrent builds,
and ``torchsgd build``.

Compiling takes minutes, so the suite compiles at most once (``good_build``: none when the default cache is
warm, as after ``make setup``) and every test works on a copy in its own ``TORCHSGD_CACHE``. Rebuilds run a
stand-in compiler that records its command line and writes the good object to its ``-o``: the detection,
lock, atomic replace and manifest are the real code; only the compiler's work is skipped.

Anything that maps a possibly damaged object runs in a subprocess: a truncated object mapped by dlopen kills
its process with SIGBUS, which :func:`run_python` reports as a failure.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from torchsgd.engines import build as kernel_build

# Steps the default engine against torchsgd's per-tensor reference engine (torch.optim.SGD would import
# torch._dynamo: 2 s more per process; the parity suite compares with torch), then says what ran.
STEP = """
import sys, torch, torchsgd
from torchsgd.engines.build import native_module, native_failure
p = torch.nn.Parameter(torch.arange(8.0)); q = p.detach().clone().requires_grad_()
opt = torchsgd.SGD([p], lr=0.1, momentum=0.9); ref = torchsgd.SGD([q], lr=0.1, momentum=0.9, foreach=False)
for i in range(3):
    p.grad = torch.full((8,), float(i + 1)); q.grad = p.grad.clone(); opt.step(); ref.step()
assert torch.equal(p, q), (p, q)
mapped = any("_torchsgd_cpu" in line for line in open("/proc/self/maps"))
print("native" if native_module() is not None else "fallback", "mapped" if mapped else "unmapped")
"""

FAKE_CXX = """#!/bin/sh
[ "$1" = "--version" ] && {{ echo "fakecxx 1.0"; exit 0; }}
echo "$@" >> {log}
[ -n "$FAKECXX_SLEEP" ] && sleep "$FAKECXX_SLEEP"
out=""; prev=""
for a in "$@"; do [ "$prev" = "-o" ] && out="$a"; prev="$a"; done
cp {good} "$out"
"""

FAILING_CXX = """#!/bin/sh
[ "$1" = "--version" ] && { echo "failcxx 1.0"; exit 0; }
echo "binding.cpp:1:1: error: boom" >&2
exit 1
"""


@pytest.fixture(scope="session")
def good_build() -> Path:
    """A verified build in the default cache: compiled here only if that cache is cold (once a session)."""
    try:
        return kernel_build.build()
    except RuntimeError as error:
        pytest.skip(f"the native kernel cannot be built here: {error}")


@pytest.fixture
def cache(tmp_path, good_build, monkeypatch) -> Path:
    """A TORCHSGD_CACHE holding a copy of the good build (and its manifest); returns the build's directory."""
    root = tmp_path / "cache"
    directory = root / good_build.parent.name
    directory.mkdir(parents=True)
    shutil.copy2(good_build, directory / good_build.name)
    shutil.copy2(good_build.parent / kernel_build.MANIFEST_NAME, directory / kernel_build.MANIFEST_NAME)
    monkeypatch.setenv("TORCHSGD_CACHE", str(root))
    assert kernel_build.check(directory) == (directory / good_build.name, "ok")
    return directory


def script(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@pytest.fixture
def fake_cxx(tmp_path, good_build) -> tuple[Path, Path]:
    """(a stand-in compiler that writes the good build to its -o, the log of its command lines)."""
    log = tmp_path / "cxx.log"
    return script(tmp_path / "fakecxx", FAKE_CXX.format(log=log, good=good_build)), log


def env_with(tmp_path: Path, *, cxx: str | None, compilers_on_path: bool = True, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("CXX", "TORCHSGD_DISABLE_NATIVE")}
    if cxx is not None:
        env["CXX"] = cxx
    if not compilers_on_path:
        bare = tmp_path / "bare-bin"
        bare.mkdir(exist_ok=True)
        env["PATH"] = str(bare)
    return {**env, **extra}


def run_python(args: list[str], env: dict[str, str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    if out.returncode in (128 + signal.SIGBUS, -signal.SIGBUS, 128 + signal.SIGSEGV, -signal.SIGSEGV):
        pytest.fail(f"the process crashed (exit status {out.returncode}):\n{out.stderr}")
    return out


def warnings_in(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("torchsgd:")]


def damage(directory: Path, how: str) -> None:
    target = next(directory.glob(f"{kernel_build.MODULE_NAME}*"))
    size = target.stat().st_size
    if how == "half":
        os.truncate(target, size // 2)
    elif how == "4KiB":
        os.truncate(target, 4096)
    elif how == "junk":  # same size, 64 KiB in the middle overwritten
        with open(target, "r+b") as f:
            f.seek(size // 2)
            f.write(random.Random(0).randbytes(64 * 1024))
    elif how == "no-manifest":
        (directory / kernel_build.MANIFEST_NAME).unlink()
    elif how == "garbled-manifest":
        (directory / kernel_build.MANIFEST_NAME).write_text("{not json")
    elif how == "empty":
        shutil.rmtree(directory)
    else:
        raise AssertionError(how)


DAMAGES = ["half", "4KiB", "junk", "no-manifest", "garbled-manifest"]


@pytest.mark.parametrize("how", [*DAMAGES, "empty"])
def test_a_damaged_or_missing_build_is_rebuilt_on_the_first_step(cache, fake_cxx, tmp_path, good_build, how):
    cxx, log = fake_cxx
    damage(cache, how)
    if cache.exists():  # what a builder killed mid-compile leaves: removed by the next one
        (cache / ".build-killed").mkdir()
        (cache / ".build-killed" / "partial.so").write_bytes(b"\0" * 100)
        (cache / ".manifest.json.killed").write_text("{")
    out = run_python(["-c", STEP], env_with(tmp_path, cxx=str(cxx)))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["native", "mapped"], out.stderr
    lines = warnings_in(out.stderr)
    assert len(lines) == 2, out.stderr
    assert lines[0].startswith(
        f"torchsgd: compiling the native CPU kernel for this machine (once; usually 1-3 minutes on 2 cores) into {cache}"
    ), lines
    assert "run `python -m torchsgd build` ahead of time to avoid this wait" in lines[0]
    assert "TORCHSGD_DISABLE_NATIVE=1" in lines[0]
    assert lines[1].startswith("torchsgd: built in ") and lines[1].endswith(good_build.name), lines
    assert len(log.read_text().splitlines()) == 1  # compiled once
    target, verdict = kernel_build.check(cache)
    assert verdict == "ok"
    manifest = kernel_build.read_manifest(cache)
    assert manifest["compiler"] == str(cxx) and manifest["compiler_version"] == "fakecxx 1.0"
    assert (
        manifest["sha256"]
        == hashlib.sha256(good_build.read_bytes()).hexdigest()
        == hashlib.sha256(target.read_bytes()).hexdigest()
    )
    assert not list(cache.glob(".build-*")) and not list(cache.glob(".manifest.json.*"))  # no leftovers


@pytest.mark.parametrize("how", [*DAMAGES, "empty"])
def test_without_a_compiler_a_damaged_build_is_not_loaded_and_one_warning_says_how_to_fix(cache, tmp_path, how):
    damage(cache, how)
    before = {p.name: p.read_bytes() for p in cache.iterdir()} if cache.exists() else {}
    out = run_python(["-c", STEP], env_with(tmp_path, cxx=None, compilers_on_path=False))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["fallback", "unmapped"], out.stderr
    (line,) = warnings_in(out.stderr)
    assert "native CPU kernel is unavailable" in line and "no C++ compiler was found" in line, line
    assert "python -m torchsgd build" in line and "g++" in line
    if how == "junk":
        assert "sha256 does not match" in line
    if how in ("half", "4KiB"):
        assert "truncated" in line
    after = {p.name: p.read_bytes() for p in cache.iterdir()} if cache.exists() else {}
    assert {k: v for k, v in after.items() if k != ".lock"} == {k: v for k, v in before.items() if k != ".lock"}


def test_a_compiler_that_fails_means_one_warning_and_the_foreach_engine(cache, tmp_path):
    damage(cache, "half")
    out = run_python(["-c", STEP], env_with(tmp_path, cxx="/bin/false"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["fallback", "unmapped"], out.stderr
    unavailable = [line for line in warnings_in(out.stderr) if "unavailable" in line]
    assert len(unavailable) == 1 and f"compiling {kernel_build.SOURCE.name} with /bin/false failed" in unavailable[0], (
        out.stderr
    )


def test_a_valid_build_loads_without_any_compiler(cache, tmp_path):
    code = (
        "import time, torch\n"
        "from torchsgd.engines.build import native_module\n"
        "t = time.perf_counter(); m = native_module(); print(time.perf_counter() - t)\n" + STEP
    )
    out = run_python(["-c", code], env_with(tmp_path, cxx=None, compilers_on_path=False))
    assert out.returncode == 0, out.stderr
    seconds, engine, mapped = out.stdout.split()
    assert (engine, mapped) == ("native", "mapped"), out.stderr
    assert out.stderr == ""
    assert float(seconds) < 1.0  # key, manifest, sha256 of ~1 MB and dlopen: a few ms


def test_the_key_ignores_include_and_library_paths(cache, fake_cxx, monkeypatch):
    """Two environments with the same torch and Python share one build: the paths reach the command only."""
    import torch.utils.cpp_extension as cpp_extension

    cxx, log = fake_cxx
    monkeypatch.setenv("CXX", str(cxx))
    built = []
    for venv in ("/venv-a", "/venv-b"):
        monkeypatch.setattr(cpp_extension, "include_paths", lambda *a, venv=venv, **k: [f"{venv}/include"])
        monkeypatch.setattr(cpp_extension, "library_paths", lambda *a, venv=venv, **k: [f"{venv}/lib"])
        built.append((kernel_build.cache_key(), kernel_build.build(force=True, progress=lambda *_: None)))
    assert built[0] == built[1] == (cache.name, next(cache.glob(f"{kernel_build.MODULE_NAME}*")))
    first, second = log.read_text().splitlines()
    assert "-isystem/venv-a/include" in first.split() and "-L/venv-a/lib" in first.split()
    assert "-isystem/venv-b/include" in second.split() and "-L/venv-b/lib" in second.split()
    assert str(kernel_build.SOURCE) in first.split() and "-O3" in first.split()


def test_the_key_changes_with_what_shapes_the_binary_and_not_with_the_compiler(tmp_path, monkeypatch):
    base = kernel_build.cache_key()
    monkeypatch.setenv("CXX", "/usr/bin/clang++")
    assert kernel_build.cache_key() == base  # recorded in the manifest, not needed to find a build

    kernels = tmp_path / "kernels"
    shutil.copytree(kernel_build.KERNELS, kernels)
    source = kernels / kernel_build.SOURCE.relative_to(kernel_build.KERNELS)
    monkeypatch.setattr(kernel_build, "KERNELS", kernels)
    assert kernel_build.cache_key() == base
    source.write_bytes(source.read_bytes() + b"\n// one more line\n")
    edited = kernel_build.cache_key()
    assert edited != base
    (source.parent / "rule.h").write_text("#pragma once\n")
    assert kernel_build.cache_key() not in (base, edited)  # every source file, headers too
    monkeypatch.undo()

    for target, name, value in [
        (torch, "__version__", "2.99.0"),
        (kernel_build, "_cpu_signature", lambda: "flags : fpu sse2"),
        (kernel_build, "compile_flags", lambda: ["-O2"]),
    ]:
        with monkeypatch.context() as m:
            m.setattr(target, name, value)
            assert kernel_build.cache_key() != base, name
    assert kernel_build.cache_key() == base


def test_concurrent_builds_compile_once(tmp_path, fake_cxx, monkeypatch):
    cxx, log = fake_cxx
    monkeypatch.setenv("TORCHSGD_CACHE", str(tmp_path / "cache"))
    env = env_with(tmp_path, cxx=str(cxx), FAKECXX_SLEEP="3")
    code = "from torchsgd.engines.build import build, check; p = build(); print(p, check(p.parent)[1])"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    assert [r[0] for r in results] == [0, 0], results
    assert results[0][1] == results[1][1] and results[0][1].split()[1] == "ok", results
    assert len(log.read_text().splitlines()) == 1, results


def test_torchsgd_build_without_the_cli_extra_says_up_to_date(cache, tmp_path):
    code = (
        "import sys\n"
        "for name in ('rich', 'matplotlib', 'sklearn'): sys.modules[name] = None  # as if not installed\n"
        "from torchsgd.cli.main import main; sys.exit(main(['build']))\n"
    )
    out = run_python(["-c", code], env_with(tmp_path, cxx=None, compilers_on_path=False))
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"up to date: {cache}") and "--force rebuilds" in out.stdout, out.stdout


def test_torchsgd_build_force_rebuilds_and_shows_progress(cache, fake_cxx, tmp_path):
    cxx, log = fake_cxx
    out = run_python(["-m", "torchsgd", "build", "--force"], env_with(tmp_path, cxx=str(cxx)))
    assert out.returncode == 0, out.stderr
    first, last = out.stdout.splitlines()
    assert (
        first.startswith(f"compiling {kernel_build.SOURCE.name} with fakecxx (-O3 -march=native")
        and str(cache) in first
    ), first
    assert last.startswith("built in ") and last.endswith(kernel_build.check(cache)[0].name), last
    assert len(log.read_text().splitlines()) == 1
    assert kernel_build.check(cache)[1] == "ok" and kernel_build.read_manifest(cache)["compiler"] == str(cxx)


def test_torchsgd_build_fails_with_the_compilers_error(cache, tmp_path):
    damage(cache, "empty")
    failing = script(tmp_path / "failcxx", FAILING_CXX)
    out = run_python(["-m", "torchsgd", "build"], env_with(tmp_path, cxx=str(failing)))
    assert out.returncode == 1
    assert "error: boom" in out.stderr and "failcxx" in out.stderr, out.stderr
    out = run_python(["-m", "torchsgd", "build"], env_with(tmp_path, cxx=None, compilers_on_path=False))
    assert out.returncode == 1 and "no C++ compiler was found" in out.stderr, out.stderr
    assert not (cache / kernel_build.MANIFEST_NAME).exists()


def test_the_ticker_counts_seconds_on_a_terminal_only():
    from torchsgd.cli.build import Ticker

    class Terminal(list):
        def __init__(self, tty: bool) -> None:
            self.tty = tty

        def isatty(self) -> bool:
            return self.tty

        def write(self, text: str) -> None:
            self.append(text)

        def flush(self) -> None:
            pass

    for tty in (True, False):
        stream = Terminal(tty)
        ticker = Ticker(stream)
        ticker.start()
        time.sleep(0.3)
        ticker.stop()
        ticker.stop()  # idempotent: the CLI stops it on success and failure alike
        if tty:
            assert stream[0].startswith("\r  |") and stream[0].endswith(" s") and stream[-1].startswith("\r ")
        else:
            assert stream == []


def test_the_manifest_is_readable_json_naming_the_build(good_build):
    manifest = json.loads((good_build.parent / kernel_build.MANIFEST_NAME).read_text())
    assert manifest["key"] == good_build.parent.name == kernel_build.cache_key(manifest["fields"])
    assert manifest["size"] == good_build.stat().st_size and len(manifest["sha256"]) == 64
    assert all(not flag.startswith(("-I", "-L", "-Wl,-rpath")) for flag in manifest["fields"]["flags"])
