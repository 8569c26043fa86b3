"""The layers keep to what each may use (docs/ARCHITECTURE.md, "Layers"),
read from the package's source:
- the CRI's messages belong to hyperrun/api/ (its servicers translate them
  into the core's specs), and to the bench, which drives a daemon as a CRI
  client would;
- QMP belongs to hyperrun/vm/ (everything above goes through the VM
  interface);
- the package never imports the tests;
- the core and the layers under it import nothing above them, the leaves
  (specs, errdefs) import nothing of the project, and there
  is no import cycle between the package's subpackages.
"""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "hyperrun"
CRI_ALLOWED = ("api/", "bench.py")
# What each layer may not import (at any depth of the module path).
BELOW = {
    "vm": ("hyperrun.sandbox", "hyperrun.pods", "hyperrun.api"),
    "channel": ("hyperrun.vm", "hyperrun.sandbox", "hyperrun.pods", "hyperrun.api"),
    "network": ("hyperrun.sandbox", "hyperrun.pods.service", "hyperrun.api"),
    "image": ("hyperrun.sandbox", "hyperrun.pods", "hyperrun.api", "hyperrun.vm"),
    "sandbox": ("hyperrun.pods.service", "hyperrun.pods.task", "hyperrun.api"),
    "pods": ("hyperrun.api",),
}


def sources():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if not rel.startswith("proto/"):
            yield rel, ast.parse(path.read_text(), str(path))


def imports(tree) -> list[str]:
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    return names


def test_the_cri_is_spoken_only_by_the_api():
    found = [rel for rel, tree in sources()
             if any(n.startswith("hyperrun.proto.cri_api_pb2") for n in imports(tree))
             and not rel.startswith(CRI_ALLOWED)]
    assert found == []


def test_qmp_is_used_only_inside_vm():
    found = [f"{rel}:{node.lineno}" for rel, tree in sources() if not rel.startswith("vm/")
             for node in ast.walk(tree)
             if isinstance(node, ast.Attribute) and node.attr == "qmp"]
    found += [rel for rel, tree in sources() if not rel.startswith("vm/")
              and any(n.startswith("qemu.qmp") or n.startswith("hyperrun.vm.qmp")
                      for n in imports(tree))]
    assert found == []


def test_the_package_never_imports_the_tests():
    found = [rel for rel, tree in sources()
             if any(n == "tests" or n.startswith("tests.") for n in imports(tree))]
    assert found == []


def test_layers_import_nothing_above_them():
    found = []
    for rel, tree in sources():
        layer = rel.split("/")[0]
        for name in imports(tree):
            if name.startswith(BELOW.get(layer, ())):
                found.append(f"{rel} imports {name}")
    assert found == []


def test_no_import_cycle_between_subpackages():
    """Module-level imports only: a function's own import (for start-up
    speed) does not make a cycle at import time."""
    graph: dict[str, set[str]] = {}
    for rel, tree in sources():
        if "/" not in rel:
            continue
        package = rel.split("/")[0]
        for node in tree.body:
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                parts = name.split(".")
                if parts[0] == "hyperrun" and len(parts) > 1 and (PACKAGE / parts[1]).is_dir() \
                        and parts[1] != package:
                    graph.setdefault(package, set()).add(parts[1])

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in graph.get(start, ()):
            if nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt})):
                return True
        return False

    cycles = sorted(p for p in graph if reaches(p, p, {p}))
    assert cycles == [], graph


def test_the_leaves_import_nothing_of_the_project():
    """specs.py and errdefs.py are what every layer may import: they import
    no module of the project themselves."""
    found = [f"{rel} imports {name}" for rel, tree in sources() if rel in ("specs.py", "errdefs.py")
             for name in imports(tree) if name.startswith("hyperrun")]
    assert found == []


def test_a_run_without_a_daemon_loads_neither_grpc_nor_the_pull_nor_netlink():
    """The embedded host (a `hyperrun run` with no daemon) is on the path of
    every such run: what only the CRI, a pull or a CNI network needs is
    loaded when needed (measured: the host's start 0.24 s -> 0.12 s)."""
    import subprocess
    import sys

    code = ("import sys; import hyperrun.api.embedded, hyperrun.api.server; "
            "print(sorted(m for m in ('grpc', 'httpx', 'pyroute2') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
