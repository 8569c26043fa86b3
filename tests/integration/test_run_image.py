"""`hyperrun pull` then `hyperrun run IMAGE`, end to end: images built by
umoci/skopeo (hyperrun/sample_images.py), served by a real docker-registry, run in
real VMs from their erofs root with an overlay per container."""
import subprocess
from pathlib import Path

import pytest

from hyperrun.sample_images import LAYERED_EXPECT


@pytest.fixture
def root(tmp_path, monkeypatch, vm_assets):
    """A private data root for each test: its own store and metadata."""
    monkeypatch.setenv("HYPERRUN_ROOT", str(tmp_path / "root"))
    return tmp_path / "root"


def test_pull_then_run_applies_image_config(cli, pushed, root, no_leaks):
    ref = pushed.ref("busybox-config:latest")
    out = cli.out("pull", ref)
    assert pushed.digests["busybox-config:latest"] in out
    # Entrypoint sh -c, Cmd echo ..., Env GREETING, WorkingDir, User user:users.
    assert cli.out("run", ref) == "hello from /home/user as 1000:100\n"
    # Overrides: a command, env, workdir and user of our own.
    assert cli.out("run", "-e", "GREETING=hi", "-w", "/tmp", "-u", "0", ref,
                   'echo "$GREETING $(pwd) $(id -u)"') == "hi /tmp 0\n"
    assert cli.out("run", "--entrypoint", "cat", ref, "/etc/hyperrun-test") == "busybox\n"


def test_exit_codes_and_writes_stay_in_the_container(cli, pushed, root, no_leaks):
    ref = pushed.ref("busybox:latest")
    r = cli("run", ref, "sh", "-c", "echo x > /etc/new; cat /etc/new; exit 7")
    assert (r.returncode, r.stdout) == (7, b"x\n"), r
    # A new container starts from the image again, not from the last one's writes.
    r = cli("run", ref, "cat", "/etc/new")
    assert r.returncode == 1 and b"No such file" in r.stderr
    assert cli("run", ref, "/nope").returncode == 127


def test_layers_whiteouts_and_opaque_dirs(cli, pushed, root):
    checks = []
    for path, want in LAYERED_EXPECT.items():
        if want is None:
            checks.append(f'[ -e "/{path}" ] || [ -L "/{path}" ] && echo "BAD {path} exists"')
        elif want == "dir":
            checks.append(f'[ -d "/{path}" ] || echo "BAD {path} not a dir"')
        elif want.startswith("symlink:"):
            checks.append(f'[ "$(readlink /{path})" = "{want[8:]}" ] || echo "BAD {path} link"')
        else:
            checks.append(f'[ "$(cat /{path})" = "{want.rstrip()}" ] || echo "BAD {path} content"')
    out = cli.out("run", pushed.ref("layered:latest"), "sh", "-c",
                  "; ".join(checks) + "; echo done")
    assert out == "done\n", out


def test_platform_from_index(cli, pushed, root):
    assert cli.out("run", pushed.ref("multi:latest"), "cat", "/etc/hyperrun-test") == "amd64\n"
    r = cli("pull", "--platform", "linux/s390x", pushed.ref("multi:latest"))
    assert r.returncode != 0 and b"linux/amd64" in r.stderr, r


def test_second_container_reuses_the_prepared_rootfs(cli, pushed, root):
    r = cli("run", pushed.ref("busybox:latest"), "true")
    assert r.returncode == 0
    (rootfs,) = list((root / "rootfs").glob("*.erofs"))
    before = rootfs.stat()
    assert cli.out("run", pushed.ref("busybox:latest"), "echo", "again") == "again\n"
    after = rootfs.stat()
    assert (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns)
    assert not any((root / "tmp").iterdir())
    assert not list(Path("/dev/shm").glob("hyperrun-unpack-*"))


def test_images_rmi_and_gc(cli, pushed, root):
    ref = pushed.ref("busybox:latest")
    cli.out("pull", ref)
    listing = cli.out("images")
    assert f"{pushed.registry.host}/busybox" in listing and "latest" in listing
    # SIZE unpacked (its erofs root, built at pull), COMPRESSED the layers'
    # (issue 17: the compressed size was shown as SIZE).
    header, row = listing.splitlines()[:2]
    assert header.split()[-2:] == ["SIZE", "COMPRESSED"]
    size, compressed = row.split()[-2:]
    erofs = next((root / "rootfs").glob("*.erofs")).stat().st_size
    assert size == f"{erofs / 1e6:.1f}MB", listing
    assert float(compressed.removesuffix("MB")) < float(size.removesuffix("MB")), listing
    blobs = root / "content" / "blobs" / "sha256"
    assert any(blobs.iterdir())
    out = cli.out("rmi", ref)
    assert "Untagged" in out and "Deleted" in out
    assert not any(blobs.iterdir())
    r = cli("rmi", ref)
    assert r.returncode != 0 and b"no such image" in r.stderr


def test_load_docker_archive_and_oci_layout(cli, images, root, tmp_path):
    archive = tmp_path / "busybox.tar"
    subprocess.run(["skopeo", "copy", "-q", f"oci:{images.layout.path}:{images.busybox}",
                    f"docker-archive:{archive}:example.com/team/busybox:1.0"], check=True)
    out = cli.out("load", "-i", str(archive))
    assert "example.com/team/busybox:1.0" in out
    assert cli.out("run", "example.com/team/busybox:1.0", "cat", "/etc/hyperrun-test") == "busybox\n"
    layout_out = cli.out("load", "-i", str(images.layout.path))
    assert "Loaded image" in layout_out
    # The same layout as a tar (as `docker save` of recent Docker writes).
    layout_tar = tmp_path / "layout.tar"
    subprocess.run(["tar", "-C", str(images.layout.path), "-cf", str(layout_tar), "."], check=True)
    assert "Loaded image" in cli.out("load", "-i", str(layout_tar))
    r = cli("load", "-i", str(tmp_path / "missing.tar"))
    assert r.returncode != 0 and b"no such file" in r.stderr


def test_debian_image(cli, debian, root, no_leaks):
    """An image made with debootstrap --variant=minbase runs in a VM."""
    assert cli.out("run", debian, "cat", "/etc/debian_version").startswith("12.")
    assert cli.out("run", debian, "python3", "-c", "print(1)") == "1\n"
    assert cli.out("run", debian, "bash", "-c", "ls /usr/share/doc | wc -l").strip() != "0"


@pytest.mark.parametrize("entries", [
    [("../escape", "file")],
    [("/etc/absolute", "file")],
    [("evil", "symlink:/etc"), ("evil/pwned", "file")],
    [("hard", "hardlink:../../outside")],
], ids=["dotdot", "absolute", "symlink-escape", "hardlink-outside"])
def test_hostile_layer_is_refused_and_store_unchanged(cli, entries, images, registry, root, tmp_path):
    import io
    import tarfile

    from hyperrun.sample_images import run as run_tool

    tar_path = tmp_path / "hostile.tar"
    with tarfile.open(tar_path, "w") as tar:
        for name, kind in entries:
            info = tarfile.TarInfo(name)
            if kind.startswith("symlink:"):
                info.type, info.linkname = tarfile.SYMTYPE, kind[8:]
                tar.addfile(info)
            elif kind.startswith("hardlink:"):
                info.type, info.linkname = tarfile.LNKTYPE, kind[9:]
                tar.addfile(info)
            else:
                info.size = 5
                tar.addfile(info, io.BytesIO(b"owned"))
    layout = images.layout
    tag = f"hostile-{tmp_path.name}"
    layout.tag_descriptor(tag, {k: v for k, v in layout.descriptor(images.busybox).items()
                                if k != "annotations"})
    run_tool("umoci", "raw", "add-layer", "--image", layout.image(tag), str(tar_path))
    registry.push(layout.path, tag, f"hostile:{tag}")

    # The store holds one good image before.
    good = registry.push(layout.path, images.busybox, "good:latest")
    cli.out("pull", registry.ref("good:latest"))
    blobs = root / "content" / "blobs" / "sha256"
    before = sorted(p.name for p in blobs.iterdir())

    r = cli("pull", registry.ref(f"hostile:{tag}"))
    assert r.returncode != 0
    assert b"Traceback" not in r.stderr, r.stderr
    assert entries[-1][0].encode() in r.stderr, r.stderr  # the error names the entry
    assert sorted(p.name for p in blobs.iterdir()) == before
    assert not (tmp_path.parent / "escape").exists() and not Path("/etc/absolute").exists()
    assert not Path("/etc/pwned").exists()
    images_out = cli.out("images")
    assert "hostile" not in images_out and "good" in images_out
    assert good
