#!/usr/bin/env python3
"""Build the hyperrun guest kernel (an uncompressed ELF vmlinux with a PVH
entry note, booted directly by QEMU ``-M microvm -kernel``).

Debian's ``linux-source-6.1`` tarball, ``make tinyconfig``, then the
``NN-*.config`` fragments next to this script merged with the kernel's own
``scripts/kconfig/merge_config.sh``, then ``make olddefconfig``. Every option
a fragment asks for is checked against the final ``.config``; an option that
Kconfig dropped or changed (usually an unmet dependency) fails the build.

The result is cached in ``<cache>/kernel/<key>/{vmlinux,config}``, ``key``
being a hash of the fragments, this script and the source package version,
and ``<cache>/kernel/current`` is pointed at it. A second run with the same
inputs does nothing but re-point ``current``.

    python kernel-config/build.py [--force] [--jobs N]
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from hyperrun import assets  # noqa: E402

SOURCE_PACKAGE = "linux-source-6.1"
SOURCE_TARBALL = Path("/usr/src/linux-source-6.1.tar.xz")
FRAGMENT_GLOB = "[0-9][0-9]-*.config"

_OPT_SET = re.compile(r"^(CONFIG_[A-Za-z0-9_]+)=(.*)$")
_OPT_UNSET = re.compile(r"^# (CONFIG_[A-Za-z0-9_]+) is not set$")


class BuildError(Exception):
    pass


def log(msg: str) -> None:
    print(f"kernel: {msg}", flush=True)


def human_size(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def describe(vmlinux: Path) -> str:
    """File size, plus what the guest actually loads (the ELF file pads its
    segments to 2 MiB boundaries, so it is much larger than the image)."""
    size = vmlinux.stat().st_size
    try:
        with open(vmlinux, "rb") as f:
            ehdr = f.read(64)
            if ehdr[:4] != b"\x7fELF" or ehdr[4] != 2:
                raise ValueError
            phoff, = struct.unpack_from("<Q", ehdr, 32)
            phentsize, phnum = struct.unpack_from("<HH", ehdr, 54)
            f.seek(phoff)
            ph = f.read(phentsize * phnum)
        loaded = 0
        for i in range(phnum):
            p_type, = struct.unpack_from("<I", ph, i * phentsize)
            if p_type == 1:  # PT_LOAD: add p_filesz
                loaded += struct.unpack_from("<Q", ph, i * phentsize + 32)[0]
        return f"{human_size(size)} ({human_size(loaded)} loaded)"
    except (OSError, ValueError, struct.error):
        return human_size(size)


def fragments() -> list[Path]:
    found = sorted(HERE.glob(FRAGMENT_GLOB))
    if not found:
        raise BuildError(f"no {FRAGMENT_GLOB} fragments in {HERE}")
    return found


def source_version() -> str:
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", SOURCE_PACKAGE],
            check=True, capture_output=True, text=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError) as e:
        raise BuildError(f"{SOURCE_PACKAGE} is not installed (apt-get install {SOURCE_PACKAGE})") from e
    if not out:
        raise BuildError(f"{SOURCE_PACKAGE} is not installed")
    return out


def cache_key(frags: list[Path], version: str) -> str:
    h = hashlib.sha256()

    def add(label: str, data: bytes) -> None:
        h.update(label.encode() + b"\0" + str(len(data)).encode() + b"\0" + data)

    for f in frags:
        add("fragment:" + f.name, f.read_bytes())
    add("build.py", Path(__file__).resolve().read_bytes())
    add("source-version", version.encode())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------
# config parsing and verification

def parse_config(path: Path) -> dict[str, str]:
    """Options of a .config or fragment: name -> value ('n' for 'is not set')."""
    opts: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if m := _OPT_SET.match(line):
            opts[m[1]] = m[2]
        elif m := _OPT_UNSET.match(line):
            opts[m[1]] = "n"
    return opts


def requested_options(frags: list[Path]) -> dict[str, tuple[str, str]]:
    """name -> (value, fragment name); later fragments win, as in merge_config."""
    want: dict[str, tuple[str, str]] = {}
    for f in frags:
        for name, value in parse_config(f).items():
            want[name] = (value, f.name)
    return want


def kconfig_hint(tree: Path | None, name: str) -> str:
    """The 'depends on' lines of a symbol's Kconfig entry, to explain a drop."""
    if tree is None:
        return ""
    sym = name.removeprefix("CONFIG_")
    head = re.compile(rf"^\s*(?:menu)?config\s+{re.escape(sym)}\s*$")
    deps: list[str] = []
    found = False
    for kc in tree.rglob("Kconfig*"):
        try:
            lines = kc.read_text(errors="replace").splitlines()
        except OSError:
            continue
        for i, line in enumerate(lines):
            if not head.match(line):
                continue
            found = True
            for nxt in lines[i + 1:]:
                st = nxt.strip()
                if re.match(r"^(?:menu)?config\s|^(?:choice|endchoice|menu|endmenu|if|endif|source)\b", st):
                    break
                if st.startswith("depends on"):
                    deps.append(st)
    if not found:
        return "\n      no such symbol in this kernel's Kconfig"
    if not deps:
        return ""
    return "\n      " + "\n      ".join(dict.fromkeys(deps))


def verify(frags: list[Path], final_config: Path, tree: Path | None = None) -> None:
    final = parse_config(final_config)
    problems = []
    for name, (value, frag) in sorted(requested_options(frags).items(), key=lambda kv: (kv[1][1], kv[0])):
        got = final.get(name)
        if value == "n":
            if got not in (None, "n"):
                problems.append(f"  {name}: {frag} asks 'not set', final .config has {name}={got}")
        elif got is None:
            problems.append(f"  {name}={value} ({frag}): not in the final .config "
                            "(unknown symbol, or its dependencies are not met)" + kconfig_hint(tree, name))
        elif got != value:
            shown = "not set" if got == "n" else got
            problems.append(f"  {name}={value} ({frag}): final .config has {shown} "
                            "(dependencies not met, or selected/forced otherwise)" + kconfig_hint(tree, name))
    if problems:
        raise BuildError(
            f"{len(problems)} requested option(s) were dropped or changed by Kconfig:\n"
            + "\n".join(problems)
            + f"\n(see {final_config}; fix the fragment, e.g. add the missing dependency)"
        )


# --------------------------------------------------------------------------
# source tree

def ensure_source(kroot: Path, version: str) -> Path:
    """Extracted source tree, reused across builds of the same version."""
    src = kroot / f"src-{version}"
    tree = src / "linux-source-6.1"
    if (src / ".extracted").exists() and (tree / "Makefile").exists():
        return tree
    if not SOURCE_TARBALL.exists():
        raise BuildError(f"{SOURCE_TARBALL} missing (apt-get install {SOURCE_PACKAGE})")
    log(f"extracting {SOURCE_TARBALL} -> {src}")
    tmp = Path(tempfile.mkdtemp(prefix=f".src-{version}.", dir=kroot))
    try:
        subprocess.run(["tar", "-xf", str(SOURCE_TARBALL), "-C", str(tmp)], check=True)
        if not (tmp / "linux-source-6.1" / "Makefile").exists():
            raise BuildError(f"unexpected layout in {SOURCE_TARBALL}")
        (tmp / ".extracted").write_text(version + "\n")
        if src.exists():  # a half-extracted leftover
            shutil.rmtree(src)
        os.rename(tmp, src)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tree


def run_logged(cmd: list[str], cwd: Path, logf, what: str) -> None:
    logf.write(f"\n$ {' '.join(cmd)}\n")
    logf.flush()
    r = subprocess.run(cmd, cwd=cwd, stdout=logf, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        raise BuildError(f"{what} failed (exit {r.returncode}); see {logf.name}")


def configure(tree: Path, frags: list[Path], logf) -> Path:
    log("configuring: tinyconfig + " + " ".join(f.name for f in frags))
    run_logged(["make", "tinyconfig"], tree, logf, "make tinyconfig")
    run_logged(["scripts/kconfig/merge_config.sh", "-m", ".config", *map(str, frags)],
               tree, logf, "merge_config.sh")
    run_logged(["make", "olddefconfig"], tree, logf, "make olddefconfig")
    config = tree / ".config"
    verify(frags, config, tree)
    log(f"config verified: all {len(requested_options(frags))} requested options present")
    return config


# --------------------------------------------------------------------------
# build with progress

_STEP = re.compile(r"^\s{2}([A-Z][A-Z0-9_]*)\s+(\S+)")


def build_vmlinux(tree: Path, jobs: int, logf, steps_file: Path) -> None:
    try:
        expected = int(steps_file.read_text())
    except (OSError, ValueError):
        expected = 0
    cmd = ["make", f"-j{jobs}", "vmlinux"]
    logf.write(f"\n$ {' '.join(cmd)}\n")
    logf.flush()
    log(f"building vmlinux with make -j{jobs} (log: {logf.name})")
    proc = subprocess.Popen(cmd, cwd=tree, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace", bufsize=1)
    tail: deque[str] = deque(maxlen=60)
    state = {"steps": 0, "last": ""}

    def reader() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            logf.write(line)
            tail.append(line.rstrip("\n"))
            if m := _STEP.match(line):
                state["steps"] += 1
                state["last"] = f"{m[1]} {m[2]}"

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    start = time.monotonic()
    progress = None
    if sys.stdout.isatty():
        try:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress,
                                       TextColumn, TimeElapsedColumn)
            progress = Progress(
                TextColumn("kernel: building"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), TextColumn("{task.description}"),
            )
        except ImportError:
            progress = None
    try:
        if progress is not None:
            with progress:
                task = progress.add_task("", total=expected or None)
                while t.is_alive():
                    t.join(0.25)
                    total = max(expected, state["steps"]) if expected else None
                    progress.update(task, completed=state["steps"], total=total,
                                    description=state["last"][:48])
                done = max(expected, state["steps"])
                progress.update(task, completed=done, total=done, description="")
        else:
            last_print = 0.0
            while t.is_alive():
                t.join(1.0)
                now = time.monotonic()
                if now - last_print >= 15 or not t.is_alive():
                    last_print = now
                    pct = f" ~{min(99, 100 * state['steps'] // expected)}%" if expected else ""
                    log(f"  {int(now - start)}s: {state['steps']} steps{pct} ({state['last']})")
        rc = proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait()
        raise
    logf.flush()
    if rc != 0:
        sys.stderr.write("\n".join(tail) + "\n")
        raise BuildError(f"make vmlinux failed (exit {rc}); full log: {logf.name}")
    if state["steps"] > 50:  # a full build: remember its size for the next bar
        steps_file.write_text(f"{max(state['steps'], expected)}\n")
    log(f"built in {int(time.monotonic() - start)}s")


def has_pvh_note(vmlinux: Path) -> bool:
    """True if the ELF carries XEN_ELFNOTE_PHYS32_ENTRY (the PVH entry point)."""
    out = subprocess.run(["readelf", "-W", "-n", str(vmlinux)], capture_output=True,
                         text=True).stdout
    return any(line.split()[:1] == ["Xen"] and ("0x00000012" in line or "PHYS32_ENTRY" in line)
               for line in out.splitlines())


def install(tree: Path, key: str, kroot: Path) -> Path:
    out = kroot / key
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=kroot))
    try:
        vmlinux = tmp / assets.KERNEL_FILE
        # No debug info is built; drop the symbol table too (QEMU spends a few
        # ms loading it on every start). System.map keeps the symbols for
        # decoding oops addresses (the kernel has no kallsyms).
        subprocess.run(["objcopy", "--strip-all", str(tree / "vmlinux"), str(vmlinux)], check=True)
        if not has_pvh_note(vmlinux):
            raise BuildError("vmlinux has no PVH entry note (CONFIG_PVH); QEMU could not boot it")
        shutil.copy2(tree / ".config", tmp / "config")
        shutil.copy2(tree / "System.map", tmp / "System.map")
        os.chmod(tmp, 0o755)
        if out.exists():  # --force: swap the new build in, then drop the old one
            old = kroot / f".{key}.old.{os.getpid()}"
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# --------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Build (or reuse) the hyperrun guest kernel.")
    ap.add_argument("--force", action="store_true",
                    help="configure, verify and build again even if cached (make is incremental)")
    ap.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args(argv)

    try:
        frags = fragments()
        version = source_version()
        key = cache_key(frags, version)
        kroot = assets.cache_root() / "kernel"
        kroot.mkdir(parents=True, exist_ok=True)
        out = kroot / key
        vmlinux = out / assets.KERNEL_FILE

        if vmlinux.exists() and not args.force:
            assets.publish("kernel", key)
            log(f"{vmlinux} {describe(vmlinux)} (cached, key {key})")
            return 0

        with open(kroot / ".build.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if vmlinux.exists() and not args.force:  # built while we waited
                assets.publish("kernel", key)
                log(f"{vmlinux} {describe(vmlinux)} (cached, key {key})")
                return 0
            log(f"building key {key} ({SOURCE_PACKAGE} {version})")
            tree = ensure_source(kroot, version)
            with open(kroot / f"build-{key}.log", "w") as logf:
                configure(tree, frags, logf)
                build_vmlinux(tree, args.jobs, logf, kroot / f".build-steps-{version}")
            install(tree, key, kroot)
            (kroot / f"build-{key}.log").rename(out / "build.log")
            assets.publish("kernel", key)
        log(f"{vmlinux} {describe(vmlinux)} (built, key {key})")
        return 0
    except BuildError as e:
        print(f"kernel: error: {e}", file=sys.stderr)
        return 1
    except subprocess.CalledProcessError as e:
        print(f"kernel: error: {' '.join(map(str, e.cmd))} failed (exit {e.returncode})", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
