#!/usr/bin/env python3
"""Assemble the guest root image: a read-only erofs with Python, the agent and crun.

Everything in the image comes from Debian packages (``apt-get download`` +
``dpkg-deb -x``) and the protobuf wheel matching the host's generated code,
never from the Python the host happens to run. The tree is pruned to what
is needed:

* ``python3.11``, ``crun`` and ``busybox`` (``sh``, ``true`` and a few
  applets for debugging), plus the closure of the shared libraries their
  ELF files (and the extension modules shipped) name in DT_NEEDED;
* the standard-library modules the agent's import closure reaches
  (``modulefinder`` over the staged Debian stdlib), plus what the
  interpreter itself loads at startup;
* the agent (``agent/hyperrun_agent``), the modules of the host package
  ``hyperrun`` that it imports, and the protobuf runtime it needs;

all precompiled with unchecked-hash pycs (a read-only root: no source is
ever stat'ed). ``/sbin/init`` starts the agent.

The image lands in ``<cache>/guest/<key>/rootfs.erofs``, where the key
hashes this file, the agent's sources, the shipped host modules, the exact
.deb versions and the protobuf version; ``<cache>/guest/current`` points at
it. A build whose key exists does nothing.

    python agent/build_image.py                # build (or reuse) and publish
    python agent/build_image.py --output X     # build into X only (tests)
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import fcntl
import hashlib
import importlib.machinery
import importlib.metadata
import importlib.util
import json
import modulefinder
import os
import py_compile
import re
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import time
import uuid
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from hyperrun import assets  # noqa: E402

try:
    from rich.console import Console

    _console = Console(highlight=False, soft_wrap=True)
except ImportError:  # pragma: no cover - rich is a project dependency
    _console = None

PY = "python3.11"
STDLIB = f"usr/lib/{PY}"
DYNLOAD = f"{STDLIB}/lib-dynload"
LIBDIR = "usr/lib/x86_64-linux-gnu"  # where every shipped library goes
INTERP = "/lib64/ld-linux-x86-64.so.2"
GUEST_PATH = "/usr/lib/hyperrun"  # agent, hyperrun subset, protobuf

# The packages asked for; their Depends/PreDepends are resolved below.
ROOT_PACKAGES = [
    f"{PY}-minimal",
    "libpython3.11-minimal",
    "libpython3.11-stdlib",
    "crun",
    "busybox-static",
]
# Needed by protobuf's upb extension (libstdc++.so.6), not by the above.
UPB_PACKAGES = ["libstdc++6"]
# Dependencies that carry no library an ELF we ship could need (maintainer
# scripts, data, configuration). Whatever library is really missing fails
# the DT_NEEDED closure below, naming the soname.
SKIP_PACKAGES = re.compile(
    r"^(dpkg|debconf.*|perl.*|libperl.*|tar|install-info|tzdata|media-types|"
    r"mime-support|mailcap|readline-common|.*-common|gcc-\d+-base|libc-bin|"
    r"base-files|usrmerge|sensible-utils|init-system-helpers)$"
)

BUSYBOX_APPLETS = [
    "sh", "true", "false", "ls", "cat", "echo", "mount", "umount", "ps",
    "dmesg", "mkdir", "ln", "rm", "sleep", "uname", "env", "reboot",
    "poweroff", "ip",
]

# Loaded by the interpreter itself (startup, codecs, error reporting),
# which no import statement of the agent names. Several are frozen into
# the interpreter; their sources are still shipped (os.py is the landmark
# getpath looks for) and cost little.
ALWAYS_STDLIB = [
    "encodings", "encodings.aliases", "encodings.utf_8", "encodings.utf_8_sig",
    "encodings.latin_1", "encodings.ascii", "encodings.raw_unicode_escape",
    "encodings.unicode_escape", "codecs", "io", "abc", "os", "stat",
    "posixpath", "genericpath", "_collections_abc",
    "linecache", "tokenize", "traceback", "warnings", "importlib",
    "importlib.machinery", "importlib.util", "zipimport",
    # So that a plain `python3` (no -S) works from a debugging shell.
    "site", "_sitebuiltins",
]
# Imported from C by protobuf's upb extension, so invisible to modulefinder.
ALWAYS_PROTOBUF = [
    "google.protobuf.message",
    "google.protobuf.internal.enum_type_wrapper",
    "google.protobuf.internal.well_known_types",
    "collections.abc",
    "copy",
    "enum",
]
# Imports made by the standard library lazily (inside functions) or
# optionally (``try: import x except ImportError``) into things the guest does
# without: not followed from the stdlib. An import of one of these by the
# agent itself (or the hyperrun modules it ships) is followed as usual.
SOFT_EXCLUDES = [
    "ssl", "_ssl", "_hashlib",                  # libssl + libcrypto: 5 MiB
    "bz2", "_bz2", "lzma", "_lzma",             # optional in shutil, tarfile...
    "tarfile", "zipfile",                        # shutil's archive functions
    "importlib.metadata", "importlib.resources", "importlib.readers",
    "readline", "pydoc", "_ctypes_test", "_testcapi", "_testinternalcapi",
    "sitecustomize", "usercustomize",           # Debian's hooks (apport)
]

VERIFY_TIMEOUT = 120  # seconds
DEBUG = False


# ----------------------------------------------------------------- output

class Progress:
    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def step(self, msg: str) -> None:
        dt = time.monotonic() - self.t0
        if _console:
            _console.print(f"[dim]{dt:6.1f}s[/dim] [bold cyan]guest[/bold cyan] {msg}")
        else:
            print(f"{dt:6.1f}s guest {msg}", flush=True)

    def warn(self, msg: str) -> None:
        if _console:
            _console.print(f"[bold yellow]warning:[/bold yellow] {msg}")
        else:
            print(f"warning: {msg}", file=sys.stderr, flush=True)


class BuildError(Exception):
    pass


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    kw.setdefault("check", True)
    try:
        return subprocess.run([str(c) for c in cmd], **kw)
    except subprocess.CalledProcessError as e:
        out = (e.stderr or e.stdout or "")
        if isinstance(out, bytes):
            out = out.decode(errors="replace")
        raise BuildError(f"{' '.join(map(str, cmd[:4]))}... failed ({e.returncode}):\n{out[-3000:]}") from None


def mib(n: int) -> str:
    return f"{n / 1048576:.1f} MiB"


def tree_size(root: Path) -> tuple[int, int]:
    total = files = 0
    for dirpath, _dirs, names in os.walk(root):
        for n in names:
            st = os.lstat(os.path.join(dirpath, n))
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
                files += 1
    return total, files


# ------------------------------------------------------------- packages

def resolve_packages(roots: list[str]) -> dict[str, str]:
    """name -> candidate version of the roots and their Depends/PreDepends."""
    out = run(
        ["apt-cache", "depends", "--recurse", "--no-recommends", "--no-suggests",
         "--no-conflicts", "--no-breaks", "--no-replaces", "--no-enhances", *roots],
        capture_output=True, text=True, check=False,
    )
    if out.returncode != 0 or not out.stdout.strip():
        raise BuildError(
            f"apt-cache depends failed (run `apt-get update` first?):\n{out.stderr}"
        )
    graph: dict[str, list[list[tuple[str, list[str]]]]] = {}
    pkg = None
    group: list[tuple[str, list[str]]] = []
    for line in out.stdout.splitlines():
        if not line.startswith(" "):
            pkg = line.strip()
            graph.setdefault(pkg, [])
            group = []
            continue
        m = re.match(r"^ ([ |])(PreDepends|Depends): (\S+)", line)
        if m:
            group.append((m.group(3), []))
            if m.group(1) == " ":
                graph[pkg].append(group)
                group = []
            continue
        m = re.match(r"^    (\S+)$", line)
        if m and pkg is not None:
            last = graph[pkg][-1] if not group else group
            last[-1][1].append(m.group(1))
    chosen: list[str] = []
    todo = list(roots)
    while todo:
        name = todo.pop(0)
        if name in chosen:
            continue
        chosen.append(name)
        for alts in graph.get(name, []):
            if any(SKIP_PACKAGES.match(a.strip("<>")) for a, _ in alts):
                continue
            pick = None
            for a, providers in alts:
                if a.startswith("<"):  # virtual: take its first provider
                    real = [p for p in providers if not SKIP_PACKAGES.match(p)]
                    if real:
                        pick = real[0]
                        break
                else:
                    pick = a
                    break
            if pick is not None:  # else only skipped packages provide it
                todo.append(pick)
    show = run(["apt-cache", "show", "--no-all-versions", *chosen],
               capture_output=True, text=True)
    versions: dict[str, str] = {}
    for para in show.stdout.split("\n\n"):
        fields = dict(re.findall(r"^(Package|Version|Architecture): (\S+)$", para, re.M))
        if "Package" in fields:
            versions[fields["Package"]] = f"{fields['Version']}_{fields['Architecture']}"
    missing = [p for p in chosen if p not in versions]
    if missing:
        raise BuildError(f"no candidate version for {missing} (apt-get update?)")
    return dict(sorted(versions.items()))


def apt_state() -> str:
    """A fingerprint of apt's package lists and configuration: while it
    holds, so does a previous resolution (apt-cache takes ~1 s a call)."""
    h = hashlib.sha256()
    for d in (Path("/var/lib/apt/lists"), Path("/etc/apt")):
        if not d.is_dir():
            continue
        for p in sorted(d.rglob("*")):
            if p.is_file() and p.name != "lock" and "partial" not in p.parts:
                st = p.stat()
                h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def resolve_packages_cached(roots: list[str], memo: Path) -> dict[str, str]:
    tag = hashlib.sha256(
        apt_state().encode() + Path(__file__).read_bytes() + " ".join(roots).encode()
    ).hexdigest()
    with contextlib.suppress(OSError, ValueError, KeyError):
        data = json.loads(memo.read_text())
        if data["tag"] == tag:
            return data["versions"]
    versions = resolve_packages(roots)
    tmp = memo.with_name(f".{memo.name}.{os.getpid()}")
    tmp.write_text(json.dumps({"tag": tag, "versions": versions}, indent=1))
    os.replace(tmp, memo)
    return versions


def deb_filename(name: str, version_arch: str) -> str:
    return f"{name}_{version_arch.replace(':', '%3a')}.deb"


def download_debs(versions: dict[str, str], debdir: Path, prog: Progress) -> list[Path]:
    debdir.mkdir(parents=True, exist_ok=True)
    want = {n: debdir / deb_filename(n, va) for n, va in versions.items()}
    missing = [n for n, p in want.items() if not p.exists()]
    if missing:
        prog.step(f"downloading {len(missing)} of {len(want)} debs into {debdir}")
        with tempfile.TemporaryDirectory(dir=debdir, prefix=".dl-") as tmp:
            run(["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root",
                 *[f"{n}={versions[n].rsplit('_', 1)[0]}" for n in missing]],
                cwd=tmp, capture_output=True, text=True)
            for n in missing:
                got = Path(tmp) / want[n].name
                if not got.exists():
                    raise BuildError(f"apt-get download gave no {got.name}")
                os.replace(got, want[n])
        # Older versions of the same packages are of no further use.
        for n, p in want.items():
            for old in debdir.glob(f"{glob_escape(n)}_*.deb"):
                if old != p and old.name.split("_")[0] == n:
                    old.unlink()
    else:
        prog.step(f"{len(want)} debs already in {debdir}")
    return list(want.values())


def glob_escape(s: str) -> str:
    return re.sub(r"([\[\]*?])", r"[\1]", s)


# ----------------------------------------------------------------- wheel

def protobuf_wheel(version: str, wheeldir: Path, impl: str, prog: Progress) -> Path:
    wheeldir.mkdir(parents=True, exist_ok=True)
    binary = sorted(wheeldir.glob(f"protobuf-{version}-cp*-abi3-manylinux*x86_64*.whl"))
    pure = sorted(wheeldir.glob(f"protobuf-{version}-py3-none-any.whl"))
    if impl == "upb" and binary:
        return binary[0]
    if impl == "python" and (pure or binary):
        return (pure or binary)[0]
    common = [sys.executable, "-m", "pip", "download", f"protobuf=={version}",
              "--only-binary=:all:", "--no-deps", "--disable-pip-version-check",
              "-q", "-d", wheeldir]
    attempts = []
    if impl == "upb":
        for plat in ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64"):
            attempts.append(["--platform", plat, "--python-version", "311",
                             "--implementation", "cp", "--abi", "abi3"])
    attempts.append(["--python-version", "311", "--implementation", "py",
                     "--abi", "none", "--platform", "any"])
    prog.step(f"downloading the protobuf {version} wheel for the guest")
    errors = []
    for extra in attempts:
        r = subprocess.run([str(c) for c in common + extra], capture_output=True, text=True)
        if r.returncode == 0:
            got = sorted(wheeldir.glob(f"protobuf-{version}-*.whl"))
            if impl == "upb" and not any("manylinux" in g.name for g in got):
                continue
            if got:
                return [g for g in got if "manylinux" in g.name or impl == "python"][0]
        errors.append(r.stderr.strip().splitlines()[-1:] if r.stderr else "")
    raise BuildError(f"pip could not download protobuf=={version} for the guest: {errors}")


# ------------------------------------------------------------------- ELF

def elf_deps(path: Path) -> tuple[list[str], str | None] | None:
    """(DT_NEEDED names, PT_INTERP) of a 64-bit little-endian ELF, else None."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"\x7fELF":
        return None
    if data[4] != 2 or data[5] != 1:
        raise BuildError(f"{path}: not a 64-bit little-endian ELF")
    phoff = struct.unpack_from("<Q", data, 0x20)[0]
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    loads, dyn, interp = [], None, None
    for i in range(phnum):
        p_type, _fl, off, vaddr, _pa, filesz, _mem, _al = struct.unpack_from(
            "<IIQQQQQQ", data, phoff + i * phentsize)
        if p_type == 1:
            loads.append((vaddr, off, filesz))
        elif p_type == 2:
            dyn = (off, filesz)
        elif p_type == 3:
            interp = data[off:off + filesz].split(b"\0")[0].decode()
    if dyn is None:
        return [], interp
    needed, strtab = [], None
    for j in range(dyn[0], dyn[0] + dyn[1], 16):
        tag, val = struct.unpack_from("<qQ", data, j)
        if tag == 0:
            break
        if tag == 1:
            needed.append(val)
        elif tag == 5:
            strtab = val
    if strtab is None:
        return [], interp
    for vaddr, off, filesz in loads:
        if vaddr <= strtab < vaddr + filesz:
            base = strtab - vaddr + off
            break
    else:
        raise BuildError(f"{path}: DT_STRTAB outside every PT_LOAD")
    names = []
    for n in needed:
        end = data.index(b"\0", base + n)
        names.append(data[base + n:end].decode())
    return names, interp


def staged(stage: Path, rel: str) -> Path:
    """Resolve ``rel`` inside the staging tree, following symlinks there."""
    parts = [p for p in rel.strip("/").split("/") if p]
    cur = stage
    hops = 0
    while parts:
        part = parts.pop(0)
        nxt = cur / part
        if nxt.is_symlink():
            hops += 1
            if hops > 40:
                raise BuildError(f"symlink loop at {rel}")
            target = os.readlink(nxt)
            if target.startswith("/"):
                cur = stage
            parts = [p for p in target.split("/") if p] + parts
            continue
        if part == "..":
            cur = cur.parent if cur != stage else stage
            continue
        if part == ".":
            continue
        cur = nxt
    return cur


LIB_SEARCH = ["lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu", "lib", "usr/lib"]


def find_lib(stage: Path, soname: str) -> Path | None:
    for d in LIB_SEARCH:
        p = staged(stage, f"{d}/{soname}")
        if p.is_file():
            return p
    return None


# ---------------------------------------------------------- modulefinder

_NAMESPACE = 100  # a PEP 420 namespace package (plain modulefinder crashes on those)


class GuestFinder(modulefinder.ModuleFinder):
    """ModuleFinder resolving builtins as the *guest* interpreter has them,
    understanding namespace packages, and skipping ``if TYPE_CHECKING:``
    blocks (annotations only, never executed)."""

    def __init__(self, path, builtins, **kw):
        super().__init__(path, **kw)
        self.guest_builtins = set(builtins)

    soft_excludes: frozenset[str] = frozenset()
    project_roots: tuple[Path, ...] = ()

    def _safe_import_hook(self, name, caller, fromlist, level=-1):
        # Soft excludes cut the stdlib's optional edges, not the project's.
        own = caller is not None and any(is_under(caller.__file__, r) for r in self.project_roots)
        if own:  # forget what the stdlib's cut edges recorded as missing
            soft = self.soft_excludes
            for k in [k for k in self.badmodules
                      if any(k == s or k.startswith(s + ".") for s in soft)]:
                del self.badmodules[k]
        saved = self.excludes
        self.excludes = list(saved) if own else list(saved) + list(self.soft_excludes)
        try:
            super()._safe_import_hook(name, caller, fromlist, level)
        finally:
            self.excludes = saved

    def find_module(self, name, path, parent=None):
        fullname = f"{parent.__name__}.{name}" if parent is not None else name
        if fullname in self.excludes:
            raise ImportError(name)
        if path is None:
            if name in self.guest_builtins:
                return None, None, ("", "", modulefinder._C_BUILTIN)
            path = self.path
        importlib.machinery.PathFinder.invalidate_caches()
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None:
            raise ImportError(f"No module named {name!r}", name=name)
        if spec.origin is None and spec.submodule_search_locations is not None:
            return None, list(spec.submodule_search_locations), ("", "", _NAMESPACE)
        return modulefinder._find_module(name, path)

    def load_module(self, fqname, fp, pathname, file_info):
        suffix, mode, kind = file_info
        if kind == _NAMESPACE:
            m = self.add_module(fqname)
            m.__file__ = None
            m.__path__ = pathname
            return m
        if kind == modulefinder._PY_SOURCE and fp is not None:
            src = fp.read()
            tree = ast.parse(src, pathname)
            _prune_static_branches(tree)
            co = compile(tree, pathname, "exec")
            m = self.add_module(fqname)
            m.__file__ = pathname
            m.__code__ = co
            self.scan_code(co, m)
            return m
        return super().load_module(fqname, fp, pathname, file_info)


def _static_truth(test: ast.expr) -> bool | None:
    """The value of an ``if`` test that is fixed on the guest, else None:
    ``TYPE_CHECKING``, ``__name__ == "__main__"`` (never true on import),
    ``sys.platform``/``os.name`` comparisons (linux, posix)."""
    if isinstance(test, ast.Name) and test.id == "TYPE_CHECKING":
        return False
    if isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING":
        return False
    if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
        v = _static_truth(test.operand)
        return None if v is None else not v
    if isinstance(test, ast.BoolOp):
        vals = [_static_truth(v) for v in test.values]
        if isinstance(test.op, ast.And):
            if False in vals:
                return False
            return True if all(v is True for v in vals) else None
        if True in vals:
            return True
        return False if all(v is False for v in vals) else None

    def known(e: ast.expr) -> str | None:
        if isinstance(e, ast.Name) and e.id == "__name__":
            return "<module>"  # never "__main__" when imported
        if isinstance(e, ast.Attribute) and isinstance(e.value, ast.Name):
            if e.value.id in ("sys", "_sys") and e.attr == "platform":
                return "linux"
            if e.value.id in ("os", "_os") and e.attr == "name":
                return "posix"
        return None

    if (isinstance(test, ast.Compare) and len(test.ops) == 1
            and isinstance(test.comparators[0], ast.Constant)
            and isinstance(test.comparators[0].value, str)):
        left = known(test.left)
        right = test.comparators[0].value
        if left is not None:
            if isinstance(test.ops[0], ast.Eq):
                return left == right
            if isinstance(test.ops[0], ast.NotEq):
                return left != right
    if (isinstance(test, ast.Call) and isinstance(test.func, ast.Attribute)
            and test.func.attr == "startswith" and len(test.args) == 1
            and isinstance(test.args[0], ast.Constant) and isinstance(test.args[0].value, str)):
        left = known(test.func.value)
        if left is not None and left != "<module>":
            return left.startswith(test.args[0].value)
    return None


def _prune_static_branches(tree: ast.AST) -> None:
    """Drop the branches that never run in the guest, so that their imports
    (Windows modules, doctest in ``if __name__ == "__main__":``, typing-only
    imports) are not followed. Only for the analysis: the shipped sources
    are untouched."""

    class Prune(ast.NodeTransformer):
        def visit_If(self, node):
            v = _static_truth(node.test)
            if v is None:
                return self.generic_visit(node)
            keep = node.body if v else node.orelse
            out = []
            for stmt in keep:
                r = self.visit(stmt)
                out.extend(r if isinstance(r, list) else [r] if r is not None else [])
            return out or [ast.Pass()]

    # Functions that only the ``if __name__ == "__main__":`` block reaches
    # (the stdlib's ``_test()``/``_main()`` that import doctest, argparse...).
    body = getattr(tree, "body", [])

    def refs(nodes) -> set[str]:
        out = set()
        for stmt in nodes:
            for n in ast.walk(stmt):
                if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load):
                    out.add(n.id)
                elif isinstance(n, ast.Constant) and isinstance(n.value, str):
                    out.add(n.value)  # __all__ entries, getattr names
        return out

    def is_main(stmt) -> bool:
        return (isinstance(stmt, ast.If) and isinstance(stmt.test, ast.Compare)
                and isinstance(stmt.test.left, ast.Name) and stmt.test.left.id == "__name__"
                and any(isinstance(c, ast.Constant) and c.value == "__main__"
                        for c in stmt.test.comparators))

    def closure(names: set[str]) -> set[str]:
        seen, todo = set(), [n for n in names if n in funcs]
        while todo:
            n = todo.pop()
            if n not in seen:
                seen.add(n)
                todo += [m for m in refs([funcs[n]]) if m in funcs and m not in seen]
        return seen

    funcs = {s.name: s for s in body if isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef))}
    mains = [s for s in body if is_main(s)]
    dead: set[str] = set()
    if mains and funcs:
        rest = [s for s in body if not is_main(s) and not isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef))]
        cands = {n for n in funcs if n.startswith("_") or n in ("main", "test")}
        live = closure(refs(rest) | refs([funcs[n] for n in funcs if n not in cands]))
        dead = (closure(refs(mains)) & cands) - live
    Prune().visit(tree)
    if dead:
        tree.body = [s for s in tree.body
                     if not (isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef)) and s.name in dead)]
    ast.fix_missing_locations(tree)


def agent_modules(agent_dir: Path) -> list[str]:
    pkg = agent_dir.name
    names = []
    for p in sorted(agent_dir.rglob("*.py")):
        rel = p.relative_to(agent_dir).with_suffix("")
        if "__pycache__" in rel.parts:
            continue
        parts = [pkg, *rel.parts]
        if parts[-1] == "__init__":
            parts.pop()
        names.append(".".join(parts))
    return names


def host_closure(agent_dir: Path) -> list[Path]:
    """The files of the host package ``hyperrun`` the agent imports.

    Cheap (no stdlib on the path: those imports just go unresolved), so the
    cache key can be computed before anything is downloaded."""
    f = GuestFinder([str(agent_dir.parent), str(REPO)], sys.builtin_module_names)
    for name in agent_modules(agent_dir):
        with contextlib.suppress(ImportError, SyntaxError):  # reported by the build
            f.import_hook(name)
    host = REPO / "hyperrun"
    return sorted(Path(m.__file__) for m in f.modules.values()
                  if m.__file__ and Path(m.__file__).is_relative_to(host))


def is_under(p: str | None, root: Path) -> bool:
    return bool(p) and Path(p).is_relative_to(root)


# ---------------------------------------------------------------- build

def guest_facts(stage: Path) -> dict:
    """Ask the staged Debian interpreter (through its own loader) about itself."""
    code = (
        "import sys, importlib.util; "
        "print(repr({'builtins': sys.builtin_module_names, "
        "'magic': importlib.util.MAGIC_NUMBER, 'tag': sys.implementation.cache_tag, "
        "'version': sys.version.split()[0]}))"
    )
    ld = staged(stage, INTERP)
    libpath = ":".join(str(stage / d) for d in LIB_SEARCH[:2])
    r = run([ld, "--library-path", libpath, stage / f"usr/bin/{PY}", "-I", "-S", "-c", code],
            capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"})
    return ast.literal_eval(r.stdout)


class Tree:
    """The final root tree; paths are guest paths without the leading '/'."""

    def __init__(self, root: Path):
        self.root = root
        self.files: dict[str, str] = {}  # guest path -> where it came from

    def dir(self, rel: str, mode: int = 0o755) -> Path:
        p = self.root / rel
        p.mkdir(parents=True, exist_ok=True)
        os.chmod(p, mode)
        return p

    def copy(self, src: Path, rel: str, mode: int | None = None) -> Path:
        dst = self.root / rel
        if rel in self.files:
            return dst
        self.dir(str(Path(rel).parent))
        shutil.copyfile(src, dst)
        if mode is None:
            mode = 0o755 if os.stat(src).st_mode & 0o111 else 0o644
        os.chmod(dst, mode)
        self.files[rel] = str(src)
        return dst

    def write(self, rel: str, data: str | bytes, mode: int = 0o644) -> Path:
        dst = self.root / rel
        self.dir(str(Path(rel).parent))
        dst.write_bytes(data.encode() if isinstance(data, str) else data)
        os.chmod(dst, mode)
        self.files[rel] = "<generated>"
        return dst

    def symlink(self, rel: str, target: str) -> None:
        dst = self.root / rel
        self.dir(str(Path(rel).parent))
        if dst.is_symlink() or dst.exists():
            dst.unlink()
        dst.symlink_to(target)


INIT = f"""#!/usr/bin/{PY} -IS
# PID 1 of the hyperrun guest: start the agent. Written by agent/build_image.py.
import sys
sys.path.insert(0, "{GUEST_PATH}")
from hyperrun_agent.__main__ import main
main()
"""

CHECK = r"""
import importlib, os, sys, time
sys.path.insert(0, ROOT + "/usr/lib/hyperrun")
failed = []
for name in NAMES:
    try:
        importlib.import_module(name)
    except Exception as e:
        failed.append(f"{name}: {type(e).__name__}: {e}")
if failed:
    print("IMPORT FAILURES:\n  " + "\n  ".join(failed))
    sys.exit(1)
impl = None
if "google.protobuf" in sys.modules:
    from google.protobuf.internal import api_implementation
    impl = api_implementation.Type()
nosrc = [m.__name__ for m in list(sys.modules.values())
         if getattr(m, "__spec__", None) and m.__spec__.origin
         and m.__spec__.origin.endswith(".py") and m.__spec__.cached
         and not os.path.exists(m.__spec__.cached)]
print(repr({"impl": impl, "modules": len(sys.modules), "nopyc": nosrc}))
"""


def build(args, prog: Progress, key: str, versions: dict[str, str], pb_version: str,
          host_files: list[Path], out: Path) -> int:
    """Build the image into ``out``; returns the size of the tree."""
    cache = assets.cache_root() / "guest"
    agent_dir: Path = args.agent_dir
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=cache))
    try:
        return _build(args, prog, key, versions, pb_version, host_files, out, cache, agent_dir, work)
    finally:
        if args.keep_tree:
            prog.step(f"kept the work tree in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def _build(args, prog, key, versions, pb_version, host_files, out, cache, agent_dir, work) -> int:
    stage = work / "stage"
    pbdir = work / "protobuf"
    tree = Tree(work / "root")
    stage.mkdir()
    tree.root.mkdir(mode=0o755)

    debs = download_debs(versions, cache / "debs", prog)
    prog.step(f"unpacking {len(debs)} debs")
    for deb in debs:
        run(["dpkg-deb", "-x", deb, stage], capture_output=True, text=True)

    facts = guest_facts(stage)
    if not facts["version"].startswith("3.11."):
        raise BuildError(f"staged Python is {facts['version']}, expected 3.11")
    if facts["magic"] != importlib.util.MAGIC_NUMBER:
        raise BuildError(
            f"bytecode magic differs: guest {facts['magic']!r}, host "
            f"{importlib.util.MAGIC_NUMBER!r}; build with a Python {facts['version'][:4]}")
    if facts["tag"] != sys.implementation.cache_tag:
        raise BuildError(f"cache tag differs: {facts['tag']} vs {sys.implementation.cache_tag}")

    wheel = protobuf_wheel(pb_version, cache / "wheels", args.protobuf, prog)
    with zipfile.ZipFile(wheel) as z:
        z.extractall(pbdir)
    if args.protobuf == "python":
        shutil.rmtree(pbdir / "google" / "_upb", ignore_errors=True)

    # ---- Python modules: the closure of the agent's imports
    prog.step(f"finding the import closure of {agent_dir}")
    stdlib = stage / STDLIB
    dynload = stage / DYNLOAD
    path = [str(agent_dir.parent), str(REPO), str(pbdir), str(stdlib), str(dynload)]
    host_root = REPO / "hyperrun"
    finder = GuestFinder(path, facts["builtins"])
    finder.soft_excludes = frozenset(SOFT_EXCLUDES)
    if args.protobuf == "python":  # the C backends' glue, unusable without them
        finder.soft_excludes |= {"google._upb", "google.protobuf.pyext.cpp_message"}
    finder.project_roots = (agent_dir, host_root)
    ours = agent_modules(agent_dir)
    for name in ours:
        try:
            finder.import_hook(name)
        except SyntaxError as e:
            raise BuildError(f"{name}: {e}") from None
    extras = list(ALWAYS_STDLIB)
    if args.protobuf == "upb":
        extras += ALWAYS_PROTOBUF
        extras += ["google._upb._message"]
    if any(n.startswith("google.") for n in finder.modules):
        extras += ["google.protobuf.internal.api_implementation"]
    for name in extras:
        if name.startswith("google.") and not any(n.startswith("google.") for n in finder.modules):
            continue
        finder.import_hook(name)

    # Unresolved imports: fatal when the agent or the hyperrun modules it
    # ships make them; the standard library's own optional imports
    # (Windows, macOS, features left out above) are expected.
    project = {n for n, m in finder.modules.items()
               if is_under(m.__file__, agent_dir) or is_under(m.__file__, host_root)}
    missing, maybe = finder.any_missing_maybe()
    bad = []
    for name in missing + maybe:
        callers = set(finder.badmodules[name]) & project
        if not callers:
            continue
        if name in maybe and name not in missing:
            parent = finder.modules.get(name.rpartition(".")[0])
            if parent is not None and parent.__file__ and not parent.__file__.endswith(".py"):
                continue  # an attribute of an extension module
        bad.append(f"{name}, imported by {', '.join(sorted(callers))}")
    if bad:
        raise BuildError("the agent imports modules the guest cannot have:\n  " + "\n  ".join(bad))

    shipped_std, shipped_host, shipped_pb, exts = [], [], [], []
    for name, m in sorted(finder.modules.items()):
        f = m.__file__
        if not f:
            continue
        p = Path(f)
        if p.is_relative_to(stdlib):
            rel = f"{STDLIB}/{p.relative_to(stdlib)}"
            p = staged(stage, rel)  # a symlink in the package points inside it
            shipped_std.append(name)
        elif p.is_relative_to(pbdir):
            rel = f"{GUEST_PATH[1:]}/{p.relative_to(pbdir)}"
            shipped_pb.append(name)
        elif p.is_relative_to(host_root):
            rel = f"{GUEST_PATH[1:]}/{p.relative_to(REPO)}"
            shipped_host.append(p)
        elif p.is_relative_to(agent_dir):
            continue  # the whole package is copied below
        else:
            raise BuildError(f"module {name} resolves to {p}, which is not shippable")
        tree.copy(p, rel, 0o644)
        if not p.suffix == ".py":
            exts.append(rel)
    if sorted(shipped_host) != sorted(host_files):
        raise BuildError("host module closure changed during the build; run again")
    # The interpreter looks for lib-dynload to decide its exec_prefix.
    tree.dir(DYNLOAD)

    for p in sorted(agent_dir.rglob("*")):
        if p.is_file() and "__pycache__" not in p.parts and not p.name.endswith((".pyc", ".pyo")):
            tree.copy(p, f"{GUEST_PATH[1:]}/{agent_dir.name}/{p.relative_to(agent_dir)}", 0o644)
    prog.step(
        f"pruned: {len(shipped_std)} stdlib modules ({sum(1 for e in exts if e.startswith(STDLIB))} "
        f"extensions), {len(shipped_pb)} protobuf modules, {len(shipped_host)} hyperrun files, "
        f"{len(ours)} agent modules")
    if DEBUG:
        print("stdlib:", " ".join(shipped_std))
        print("protobuf:", " ".join(shipped_pb))

    # ---- programs
    tree.copy(stage / f"usr/bin/{PY}", f"usr/bin/{PY}", 0o755)
    tree.symlink("usr/bin/python3", PY)
    tree.copy(staged(stage, "usr/bin/crun"), "usr/bin/crun", 0o755)
    tree.copy(staged(stage, "bin/busybox"), "usr/bin/busybox", 0o755)
    for applet in BUSYBOX_APPLETS:
        tree.symlink(f"usr/bin/{applet}", "busybox")
    for top, target in (("bin", "usr/bin"), ("sbin", "usr/sbin"), ("lib", "usr/lib"),
                        ("lib64", "usr/lib64")):
        tree.symlink(top, target)

    # ---- shared libraries: the DT_NEEDED closure
    prog.step("resolving shared libraries (DT_NEEDED closure)")
    ld = find_lib(stage, "ld-linux-x86-64.so.2")
    if ld is None:
        raise BuildError("no dynamic loader in the staged libc6")
    tree.copy(ld, f"{LIBDIR}/ld-linux-x86-64.so.2", 0o755)
    tree.symlink("usr/lib64/ld-linux-x86-64.so.2", "../lib/x86_64-linux-gnu/ld-linux-x86-64.so.2")
    queue = [r for r in list(tree.files) if (tree.root / r).is_file()]
    seen_libs: set[str] = set()
    while queue:
        rel = queue.pop()
        info = elf_deps(tree.root / rel)
        if info is None:
            continue
        needed, interp = info
        if interp and interp != INTERP:
            raise BuildError(f"{rel} wants the loader {interp}, not {INTERP}")
        for so in needed:
            if so in seen_libs:
                continue
            seen_libs.add(so)
            src = find_lib(stage, so)
            if src is None:
                raise BuildError(f"{rel} needs {so}, which no downloaded package provides")
            queue.append(str(tree.copy(src, f"{LIBDIR}/{so}", 0o644).relative_to(tree.root)))
    prog.step(f"{len(seen_libs)} shared libraries: {' '.join(sorted(seen_libs))}")

    # ---- /etc, mount points, init
    for d in ("proc", "sys", "dev", "run", "tmp", "mnt", "var", "root", "etc", "usr/sbin"):
        tree.dir(d, 0o1777 if d == "tmp" else 0o700 if d == "root" else 0o755)
    tree.write("etc/passwd", "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n")
    tree.write("etc/group", "root:x:0:\nnogroup:x:65534:\n")
    tree.write("etc/resolv.conf", "")
    tree.write("etc/hosts", "127.0.0.1\tlocalhost\n::1\tlocalhost\n")
    tree.write("etc/ld.so.conf", f"/{LIBDIR}\n")
    tree.write("usr/sbin/init", INIT, 0o755)
    if shutil.which("ldconfig") or Path("/sbin/ldconfig").exists():
        # A loader cache: one open() per library instead of probing every
        # default directory and its glibc-hwcaps subdirectories.
        run([shutil.which("ldconfig") or "/sbin/ldconfig", "-X", "-r", tree.root],
            capture_output=True, text=True)
    if not (agent_dir / "__main__.py").exists():
        prog.warn(f"{agent_dir}/__main__.py does not exist: /sbin/init will fail at boot")

    # ---- bytecode
    sources = sorted(r for r in tree.files if r.endswith(".py"))
    prog.step(f"compiling {len(sources)} modules (unchecked-hash pycs)")
    for rel in sources:
        src = tree.root / rel
        cfile = importlib.util.cache_from_source(str(src))
        try:
            py_compile.compile(
                str(src), cfile=cfile, dfile="/" + rel, doraise=True,
                invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
        except py_compile.PyCompileError as e:
            raise BuildError(str(e)) from None
        os.chmod(cfile, 0o644)
        os.chmod(os.path.dirname(cfile), 0o755)

    # ---- does it run?
    names = sorted(set(ours) | set(shipped_std) | set(shipped_pb) |
                   {n for n, m in finder.modules.items() if is_under(m.__file__, host_root)})
    # Only what the interpreter would really import: skip __main__-style
    # scripts of the stdlib that run on import.
    names = [n for n in names if n not in ("this", "antigravity")]
    verify(tree.root, names, prog)

    # ---- the image
    size, nfiles = tree_size(tree.root)
    prog.step(f"mkfs.erofs: {nfiles} files, {mib(size)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}")
    fs_uuid = uuid.UUID(bytes=hashlib.sha256(key.encode()).digest()[:16])
    run(["mkfs.erofs", "--quiet", "-x-1", "--all-root", "-T0", f"-U{fs_uuid}", tmp, tree.root],
        capture_output=True, text=True)
    os.chmod(tmp, 0o644)
    os.replace(tmp, out)
    prog.step(f"image: {mib(out.stat().st_size)} ({len(shipped_std)} stdlib modules, "
              f"protobuf {pb_version} {args.protobuf})")
    return size


def verify(root: Path, names: list[str], prog: Progress) -> None:
    """Import every shipped module with the guest interpreter inside the
    tree, and run crun and busybox there."""
    env = {"PATH": "/usr/sbin:/usr/bin", "HOME": "/", "TERM": "linux"}
    mode = "loader"
    if os.geteuid() == 0:
        # A chroot, in a private PID and mount namespace with /proc mounted
        # (crun re-executes itself through /proc/self/exe).
        mode = "chroot"
        probe = subprocess.run(["unshare", "--pid", "--fork", f"--mount-proc={root}/proc",
                                "chroot", str(root), "/usr/bin/busybox", "true"],
                               capture_output=True, env=env)
        if probe.returncode == 0:
            mode = "unshare"
    prefix = "" if mode != "loader" else str(root)
    code = f"ROOT = {prefix!r}\nNAMES = {names!r}\n{CHECK}"

    def guest(*argv: str) -> list[str]:
        if mode == "unshare":
            return ["unshare", "--pid", "--fork", f"--mount-proc={root}/proc",
                    "chroot", str(root), *argv]
        if mode == "chroot":
            return ["chroot", str(root), *argv]
        # Not root: the tree's own loader and libraries, no chroot.
        return [str(root / LIBDIR / "ld-linux-x86-64.so.2"), "--library-path",
                str(root / LIBDIR), str(root) + argv[0], *argv[1:]]

    prog.step(f"verifying: importing {len(names)} modules with the guest interpreter ({mode})")
    try:
        r = subprocess.run(guest(f"/usr/bin/{PY}", "-I", "-S", "-c", code),
                           capture_output=True, text=True, env=env, timeout=VERIFY_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise BuildError(f"importing the shipped modules took over {VERIFY_TIMEOUT}s: does an "
                         "agent module do work at import (it must not)?") from None
    if r.returncode != 0:
        raise BuildError(f"the guest interpreter failed to import the shipped modules:\n"
                         f"{r.stdout[-4000:]}{r.stderr[-4000:]}")
    result = ast.literal_eval(r.stdout.strip().splitlines()[-1])
    if result["nopyc"]:
        raise BuildError(f"modules imported without a pyc: {result['nopyc']}")
    checks = [["/usr/bin/busybox", "true"]]
    if mode == "unshare":
        checks.append(["/usr/bin/crun", "--version"])
    else:
        prog.warn("crun not run (it needs /proc: run the build as root); its libraries were checked")
    for argv in checks:
        r = subprocess.run(guest(*argv), capture_output=True, text=True, env=env,
                           timeout=VERIFY_TIMEOUT)
        if r.returncode != 0:
            raise BuildError(f"{' '.join(argv)} fails in the tree:\n{r.stderr}")
    prog.step(f"verified: imports ok (protobuf implementation: {result['impl']}), "
              f"{' and '.join(Path(c[0]).name for c in checks)} run")


# ------------------------------------------------------------------ main

def compute_key(args, versions: dict[str, str], pb_version: str, host_files: list[Path]) -> str:
    h = hashlib.sha256()

    def add(label: str, data: bytes) -> None:
        h.update(label.encode() + b"\0" + len(data).to_bytes(8, "little") + data)

    add("builder", Path(__file__).read_bytes())
    for p in sorted(args.agent_dir.rglob("*")):
        if p.is_file() and "__pycache__" not in p.parts and not p.name.endswith((".pyc", ".pyo")):
            add(f"agent/{p.relative_to(args.agent_dir)}", p.read_bytes())
    for p in host_files:
        add(f"host/{p.relative_to(REPO)}", p.read_bytes())
    for name, va in versions.items():
        add("deb", f"{name}={va}".encode())
    add("protobuf", f"{pb_version} {args.protobuf}".encode())
    return h.hexdigest()[:16]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--agent-dir", type=Path, default=REPO / "agent" / "hyperrun_agent",
                    help="the agent package to ship (default: %(default)s)")
    ap.add_argument("--protobuf", choices=("upb", "python"), default="upb",
                    help="protobuf implementation: upb C extension or pure Python")
    ap.add_argument("--output", type=Path,
                    help="write the image here instead of the cache; do not publish")
    ap.add_argument("--keep-tree", action="store_true", help="keep the work tree (debugging)")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    args.agent_dir = args.agent_dir.resolve()
    global DEBUG
    DEBUG = args.verbose
    prog = Progress()

    try:
        if args.agent_dir.name != "hyperrun_agent":
            raise BuildError(f"the agent package must be named hyperrun_agent: {args.agent_dir}")
        if not args.agent_dir.is_dir():
            raise BuildError(f"no agent package at {args.agent_dir}")
        cache = assets.cache_root() / "guest"
        cache.mkdir(parents=True, exist_ok=True)
        roots = ROOT_PACKAGES + (UPB_PACKAGES if args.protobuf == "upb" else [])
        versions = resolve_packages_cached(roots, cache / "packages.json")
        pb_version = importlib.metadata.version("protobuf")
        host_files = host_closure(args.agent_dir)
        key = compute_key(args, versions, pb_version, host_files)

        if args.output:
            out = args.output.resolve()
            size = build(args, prog, key, versions, pb_version, host_files, out)
            print(f"guest image: {out} {mib(out.stat().st_size)} (built in "
                  f"{time.monotonic() - prog.t0:.1f}s, tree {mib(size)})")
            return 0

        image = cache / key / assets.GUEST_FILE
        with open(cache / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time per cache
            if image.exists():
                assets.publish("guest", key)
                sizefile = image.parent / "tree-size"
                tree = f", tree {mib(int(sizefile.read_text()))}" if sizefile.exists() else ""
                print(f"guest image: {image} {mib(image.stat().st_size)} (cached{tree})")
                return 0
            prog.step(f"building guest image {key}: {len(versions)} packages, protobuf {pb_version}")
            size = build(args, prog, key, versions, pb_version, host_files, image)
            (image.parent / "tree-size").write_text(f"{size}\n")
            assets.publish("guest", key)
        prog.step(f"published {cache / 'current'} -> {key}")
        print(f"guest image: {image} {mib(image.stat().st_size)} (built in "
              f"{time.monotonic() - prog.t0:.1f}s, tree {mib(size)})")
        return 0
    except BuildError as e:
        if _console:
            _console.print(f"[bold red]guest image build failed:[/bold red] {e}")
        else:
            print(f"guest image build failed: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
