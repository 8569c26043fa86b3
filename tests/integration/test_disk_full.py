"""Disk full during a pull: a clear error, nothing partial in the store's
blobs, the metadata unchanged, and the pull works once there is room."""
import os
import subprocess
from pathlib import Path

import pytest


@pytest.fixture
def small_root(tmp_path):
    """A 1 MiB tmpfs as the data root: too small for the busybox image."""
    if os.geteuid() != 0:
        pytest.skip("not root: cannot mount a small tmpfs")
    root = tmp_path / "root"
    root.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(root)], check=True)
    try:
        yield root
    finally:
        subprocess.run(["umount", "-l", str(root)], check=True)


def blobs(root: Path) -> list[str]:
    d = root / "content" / "blobs" / "sha256"
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


def test_pull_onto_a_full_disk(cli, pushed, small_root, tmp_path):
    ref = pushed.ref("busybox:latest")
    env = {**os.environ, "HYPERRUN_ROOT": str(small_root)}
    r = cli("pull", ref, env=env)
    assert r.returncode != 0, r
    assert b"no space left on the device of" in r.stderr, r.stderr
    assert b"Traceback" not in r.stderr
    # Whatever is in blobs/ was verified whole: each file's name is its digest.
    import hashlib
    for name in blobs(small_root):
        data = (small_root / "content" / "blobs" / "sha256" / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == name
    listing = cli("images", env=env)
    assert listing.returncode == 0 and ref.split("/")[-1].split(":")[0] not in \
        listing.stdout.decode().split("\n", 1)[1], listing
    # With room (the same store, now larger), the pull completes.
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_root)], check=True)
    r = cli("pull", ref, env=env)
    assert r.returncode == 0, r
    assert "busybox" in cli("images", env=env).stdout.decode()
