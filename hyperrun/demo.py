"""`make demo`: build a small image with real OCI tools, load it, run it in
a VM, and say what happened at each step.

The image is busybox (Debian's busybox-static) made into an OCI image with
umoci and written as a `docker save` archive by skopeo — the same tools
and helpers the tests use — so the demo needs no registry and no network.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

HYPERRUN = str(Path(sys.executable).parent / "hyperrun")
IMAGE = "demo/busybox:latest"


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def sh(*argv: str) -> None:
    print("$ " + " ".join(argv), flush=True)
    subprocess.run(argv, check=True)


def main() -> None:
    from hyperrun.sample_images import Layout, build_busybox, configure_busybox

    build = Path("build")
    build.mkdir(exist_ok=True)
    archive = build / "demo-busybox.tar"
    os.environ.setdefault("HYPERRUN_ROOT", str((build / "demo-root").resolve()))
    with tempfile.TemporaryDirectory(prefix="hyperrun-demo-") as work:
        step("building an OCI image from Debian's busybox-static with umoci")
        layout = Layout(Path(work) / "oci")
        build_busybox(layout, "busybox", Path(work))
        configure_busybox(layout, "busybox", "demo")
        step("writing it as a docker-save archive with skopeo")
        archive.unlink(missing_ok=True)
        sh("skopeo", "copy", "-q", f"oci:{layout.path}:demo", f"docker-archive:{archive}:{IMAGE}")
    step(f"loading it into hyperrun's image store ({os.environ['HYPERRUN_ROOT']})")
    sh(HYPERRUN, "load", "-i", str(archive))
    sh(HYPERRUN, "images")
    step("running the image's own command in a VM (Entrypoint, Env, WorkingDir, User)")
    sh(HYPERRUN, "run", "--rm", IMAGE)
    step("running a command of ours: its own kernel, hostname and processes")
    sh(HYPERRUN, "run", "--rm", IMAGE, "echo kernel $(uname -r) on $(hostname); ps")
    step("exit codes come back as they are")
    r = subprocess.run([HYPERRUN, "run", "--rm", "--entrypoint", "sh", IMAGE, "-c", "exit 3"])
    print(f"exit code: {r.returncode}")
    print("\nDone. Try: .venv/bin/hyperrun run -it --entrypoint sh", IMAGE,
          f"(with HYPERRUN_ROOT={os.environ['HYPERRUN_ROOT']})")


if __name__ == "__main__":
    main()
