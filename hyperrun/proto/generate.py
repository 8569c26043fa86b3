"""Regenerate hyperrun/proto/*_pb2.py from proto/*.proto with grpcio-tools.

Imports are rewritten to be package-relative so the generated modules work
both in the host package and in the guest image, which ships them.
"""
from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "proto"
OUT = Path(__file__).resolve().parent
# Only these are compiled to Python here; the CRI schema gets grpc stubs later.
FILES = ["ttrpc.proto", "agent.proto"]


def generate(out: Path) -> list[Path]:
    from grpc_tools import protoc

    args = ["protoc", f"-I{SRC}", f"--python_out={out}", f"--pyi_out={out}"]
    if protoc.main(args + [str(SRC / f) for f in FILES]) != 0:
        raise SystemExit("protoc failed")
    written = sorted(out.glob("*_pb2.py*"))
    for path in written:
        text = path.read_text()
        text = re.sub(r"^import (\w+_pb2)", r"from . import \1", text, flags=re.M)
        path.write_text(text)
    return written


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
