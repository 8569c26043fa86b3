"""A minimal container root filesystem from Debian's busybox-static, for the
demo, the tests and the benchmarks (images arrive with `hyperrun pull`)."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

BUSYBOX = "/bin/busybox"

PASSWD = """root:x:0:0:root:/root:/bin/sh
daemon:x:1:1:daemon:/usr/sbin:/bin/false
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
app:x:1000:1000:app:/home/app:/bin/sh
"""
GROUP = """root:x:0:
daemon:x:1:
users:x:100:app
app:x:1000:
nogroup:x:65534:
"""


def make_rootfs(dest: Path) -> Path:
    """Create (or refresh) a busybox rootfs at dest; returns dest."""
    if not os.path.exists(BUSYBOX):
        raise FileNotFoundError(f"{BUSYBOX} missing: apt install busybox-static")
    dest.mkdir(parents=True, exist_ok=True)
    for d in ("bin", "etc", "root", "tmp", "home/app", "proc", "sys", "dev", "var", "usr/bin"):
        (dest / d).mkdir(parents=True, exist_ok=True)
    os.chmod(dest / "tmp", 0o1777)
    os.chown(dest / "home/app", 1000, 1000) if os.geteuid() == 0 else None
    shutil.copy2(BUSYBOX, dest / "bin/busybox")
    applets = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True,
                             check=True).stdout.split()
    for applet in applets:
        link = dest / "bin" / applet
        if not link.exists() and not link.is_symlink():
            link.symlink_to("busybox")
    (dest / "etc/passwd").write_text(PASSWD)
    (dest / "etc/group").write_text(GROUP)
    (dest / "etc/hostname").write_text("busybox\n")
    return dest


if __name__ == "__main__":
    import sys

    print(make_rootfs(Path(sys.argv[1])))
