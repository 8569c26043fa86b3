"""The L1 machine of the KVM lane: a Debian 12 root image, built from
Debian's packages and PyPI by `debootstrap` and a chroot, cached by a key
of its inputs (this file, the package list, pyproject.toml) as the guest
kernel and image are.

L1 runs under TCG on a host without usable KVM. With `-cpu max` it sees
SVM with nested paging, so its stock kernel loads `kvm_amd` and
`vhost_vsock`: the hyperrun inside it runs its VMs with KVM and its agent
channel over vsock, the mode users with real KVM get.

The image holds no project code: the checkout is shared in at each run
(lane.py) and copied to /hyperrun, which the venv's `.pth` names. What the
image does hold is what the tests call on a host (QEMU, the OCI tools, a
registry, CNI plugins, procps, ...) and a venv with the project's Python
dependencies, installed in the chroot with the host's network (L1 has
none).

    <cache>/nested/<key>/{root.img,vmlinuz,initrd.img}
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from hyperrun.paths import cache_root  # noqa: E402

SUITE = "bookworm"
# What a host running hyperrun's tests needs, for a minbase system: the
# same as the Makefile's APT_PACKAGES but the kernel and guest image
# builds (their results are shared in), plus L1's own kernel and tools.
PACKAGES = [
    "linux-image-amd64", "kmod", "procps", "iproute2", "iptables", "util-linux",
    "qemu-system-x86", "qemu-utils", "erofs-utils", "busybox-static",
    "docker-registry", "skopeo", "umoci", "apache2-utils", "openssl", "curl",
    "containernetworking-plugins", "ca-certificates", "python3", "python3-venv",
    "e2fsprogs", "xz-utils", "zstd",
    "runc",  # the bench's baseline (hyperrun bench start in L1)
]
VENV = "/opt/hyperrun-venv"
CHECKOUT = "/hyperrun"       # where L1's init copies the checkout (the venv's .pth)
STUB_INIT = "/sbin/lane-init"  # mounts the checkout share, runs its tests/nested/init.sh
FREE_GIB = 8                 # room for the tests' stores and registries (sparse)


class BuildError(Exception):
    pass


def log(msg: str) -> None:
    print(f"l1-image: {msg}", flush=True)


def mirror() -> str:
    """The host's Debian mirror (deb822 or one-line sources)."""
    for path in [Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list")]:
        try:
            text = path.read_text()
        except OSError:
            continue
        if m := re.search(r"^URIs:\s*(\S+/debian)\s*$", text, re.M) or \
                re.search(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+/debian)\s+" + SUITE, text, re.M):
            return m.group(1)
    return "http://deb.debian.org/debian"


PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
# The project's dependencies and its dev extras.
REQUIREMENTS = [*PROJECT["dependencies"], *PROJECT["optional-dependencies"]["dev"],
                "setuptools>=68"]


def key() -> str:
    h = hashlib.sha256()
    for label, data in [("builder", Path(__file__).read_bytes()),
                        ("packages", " ".join(PACKAGES).encode()),
                        ("python", "\n".join(REQUIREMENTS).encode()),
                        ("version", PROJECT["version"].encode()),
                        ("suite", SUITE.encode())]:
        h.update(label.encode() + b"\0" + len(data).to_bytes(8, "little") + data)
    return h.hexdigest()[:16]


def run(cmd: list[str], what: str, logf) -> None:
    """Run a build step, its output to the build log; a failure shows its end."""
    t0 = time.monotonic()
    logf.write(f"\n$ {' '.join(cmd)}\n")
    logf.flush()
    proc = subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        logf.flush()
        tail = Path(logf.name).read_text(errors="replace")[-3000:]
        raise BuildError(f"{what} failed ({proc.returncode}); log {logf.name}:\n{tail}")
    log(f"{what}: {time.monotonic() - t0:.0f}s")


STUB = """#!/bin/sh
# L1's init: the lane's script comes from the checkout shared at each run.
mount -t proc proc /proc 2>/dev/null  # the initramfs moved them here already
mount -t sysfs sys /sys 2>/dev/null
mount -t devtmpfs dev /dev 2>/dev/null
modprobe -a 9pnet_virtio 9p
mkdir -p /mnt/checkout
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144 checkout /mnt/checkout
exec /bin/sh /mnt/checkout/tests/nested/init.sh
"""

CONSOLE_SCRIPT = f"""#!{VENV}/bin/python
import sys
from hyperrun.cli.main import main
sys.exit(main())
"""


def install_python(root: Path, logf) -> None:
    """The venv with the project's dependencies, and the project itself as
    an editable install of CHECKOUT written by hand (metadata, .pth and the
    console script): the checkout arrives only at run time. The wheels are
    downloaded by the host's pip (its index, proxy and CAs are the host's
    settings) for the same Python minor version, then installed offline."""
    wheels = root / "tmp/wheels"
    run([sys.executable, "-m", "pip", "download", "-q", "-d", str(wheels),
         *REQUIREMENTS], "pip download", logf)
    run(["chroot", str(root), "python3", "-m", "venv", VENV], "venv", logf)
    run(["chroot", str(root), "env", "-u", "PIP_FIND_LINKS", "-u", "PIP_CERT",
         f"{VENV}/bin/pip", "install", "-q", "--no-index", "--find-links", "/tmp/wheels",
         *REQUIREMENTS], "pip install (offline)", logf)
    shutil.rmtree(wheels)
    site = next((root / VENV.lstrip("/") / "lib").glob("python3*/site-packages"))
    (site / "hyperrun-checkout.pth").write_text(CHECKOUT + "\n")
    info = site / f"hyperrun-{PROJECT['version']}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: hyperrun\n"
                                   f"Version: {PROJECT['version']}\n")
    (info / "entry_points.txt").write_text("[console_scripts]\nhyperrun = hyperrun.cli.main:main\n")
    (info / "RECORD").write_text("")
    script = root / VENV.lstrip("/") / "bin/hyperrun"
    script.write_text(CONSOLE_SCRIPT)
    script.chmod(0o755)


def build(out: Path, work: Path) -> None:
    root = work / "root"
    with open(out / "build.log", "a") as logf:
        log(f"debootstrap {SUITE} from {mirror()} ({len(PACKAGES)} packages and their "
            f"dependencies; log {out / 'build.log'})")
        done = work / "debootstrap.done"  # a failed build's tree is taken up again
        if not done.exists():
            shutil.rmtree(root, ignore_errors=True)
            run(["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}",
                 SUITE, str(root), mirror()], "debootstrap", logf)
            done.touch()
        install_python(root, logf)
        (root / STUB_INIT.lstrip("/")).write_text(STUB)
        (root / STUB_INIT.lstrip("/")).chmod(0o755)
        (root / "etc/hostname").write_text("hyperrun-l1\n")
        (root / "etc/resolv.conf").write_text("")  # L1 has no network
        for name in ["checkout", "assets", "results"]:
            (root / "mnt" / name).mkdir(parents=True, exist_ok=True)
        boot = root / "boot"
        vmlinuz = max(boot.glob("vmlinuz-*"))
        initrd = boot / vmlinuz.name.replace("vmlinuz", "initrd.img")
        if not initrd.exists():
            raise BuildError(f"no initrd beside {vmlinuz}")
        shutil.copy(vmlinuz, out / "vmlinuz")
        shutil.copy(initrd, out / "initrd.img")
        shutil.rmtree(root / "var/cache/apt/archives", ignore_errors=True)
        (root / "var/cache/apt/archives/partial").mkdir(parents=True)
        used = int(subprocess.run(["du", "-sxB1", str(root)], capture_output=True, text=True,
                                  check=True).stdout.split()[0])
        size_mib = used // (1 << 20) + FREE_GIB * 1024
        image = out / "root.img.tmp"
        run(["mkfs.ext4", "-q", "-F", "-L", "l1root", "-d", str(root), str(image), f"{size_mib}M"],
            f"mkfs.ext4 ({used >> 20} MiB used of {size_mib} MiB)", logf)
        image.rename(out / "root.img")


def ensure() -> Path:
    """The cached L1 build for this key (built if missing): its directory."""
    if os.geteuid() != 0:
        raise BuildError("building the L1 image needs root (debootstrap, chroot)")
    k = key()
    base = cache_root() / "nested"
    out = base / k
    base.mkdir(parents=True, exist_ok=True)
    with open(base / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time per cache
        if (out / "root.img").exists():
            log(f"cached: {out}")
            return out
        t0 = time.monotonic()
        out.mkdir(exist_ok=True)
        work = base / f"work-{k}"  # kept if the build fails: the next one goes on from it
        work.mkdir(exist_ok=True)
        try:
            build(out, work)
        except BaseException:
            for f in ("root.img.tmp", "vmlinuz", "initrd.img"):
                (out / f).unlink(missing_ok=True)
            raise
        shutil.rmtree(work)
        log(f"built {out} in {time.monotonic() - t0:.0f}s")
        for old in base.iterdir():  # earlier keys' images and trees: GBs each
            if old.is_dir() and k not in old.name:
                shutil.rmtree(old, ignore_errors=True)
        return out


if __name__ == "__main__":
    try:
        print(ensure())
    except BuildError as exc:
        print(f"l1-image: {exc}", file=sys.stderr)
        sys.exit(1)
