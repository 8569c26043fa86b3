"""Regenerate hyperrun/proto/*_pb2*.py from proto/**/*.proto with grpcio-tools.

Imports are rewritten to be package-relative so the generated modules work
both in the host package and in the guest image, which ships the agent's.
A schema in a subdirectory is flattened into one module name:
proto/cri/api.proto becomes cri_api_pb2 (messages) and cri_api_pb2_grpc
(gRPC stubs). The CRI modules are host-only: nothing the guest imports may
import them, and they need the grpcio runtime.
"""
from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "proto"
OUT = Path(__file__).resolve().parent
# Host <-> guest (ttRPC): messages only.
FILES = ["ttrpc.proto", "agent.proto"]
# Client <-> daemon (gRPC): messages and service stubs.
GRPC_FILES = ["cri/api.proto"]


def _module(proto: str) -> str:
    """cri/api.proto -> cri_api_pb2; agent.proto -> agent_pb2."""
    return proto.removesuffix(".proto").replace("/", "_") + "_pb2"


def _protoc(args: list[str]) -> None:
    from grpc_tools import protoc

    if protoc.main(["protoc", f"-I{SRC}", *args]) != 0:
        raise SystemExit("protoc failed")


def generate(out: Path) -> list[Path]:
    raw = out / "raw"
    raw.mkdir()
    common = [f"--python_out={raw}", f"--pyi_out={raw}"]
    _protoc(common + [str(SRC / f) for f in FILES])
    _protoc(common + [f"--grpc_python_out={raw}"] + [str(SRC / f) for f in GRPC_FILES])

    written = []
    for proto in FILES + GRPC_FILES:
        stem = proto.removesuffix(".proto")  # e.g. "cri/api"
        pkg, _, name = stem.rpartition("/")
        flat = _module(proto)
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"):
            src = raw / f"{stem}{suffix}"
            if not src.exists():
                continue
            text = src.read_text()
            # `import agent_pb2 as ...` -> `from . import agent_pb2 as ...`
            text = re.sub(r"^import (\w+_pb2)", r"from . import \1", text, flags=re.M)
            if pkg:
                dotted = pkg.replace("/", ".")
                # `from cri import api_pb2 as ...` -> `from . import cri_api_pb2 as ...`
                text = re.sub(rf"^from {re.escape(dotted)} import {name}_pb2\b",
                              f"from . import {flat}", text, flags=re.M)
                # the module name given to the message classes, and the
                # path named in the grpc version error
                text = text.replace(f"'{dotted}.{name}_pb2'", f"'{flat}'")
                text = text.replace(f"{stem}_pb2_grpc.py", f"{flat}_grpc.py")
            dest = out / f"{flat}{suffix.removeprefix('_pb2')}"
            dest.write_text(text)
            written.append(dest)
    return sorted(written)


def main() -> None:
    check = "--check" in sys.argv
    with tempfile.TemporaryDirectory() as tmp:
        for path in generate(Path(tmp)):
            dest = OUT / path.name
            if check:
                if not dest.exists() or dest.read_text() != path.read_text():
                    raise SystemExit(f"{dest} is stale or edited: run `make proto`")
            else:
                dest.write_text(path.read_text())
                print(f"generated {dest.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
