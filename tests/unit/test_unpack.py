"""Layer unpacking (hyperrun.image.unpack) and the erofs rootfs image
(hyperrun.image.rootfs). The layers are written here with tarfile,
including the hostile ones."""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

from hyperrun.image.rootfs import build_rootfs_image
from hyperrun.image.unpack import Layer, Limits, UnpackError, unpack_layers

OCI_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_GZIP = OCI_TAR + "+gzip"
OCI_ZSTD = OCI_TAR + "+zstd"
DOCKER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="ownership and device nodes need root")

# security.capability v2: cap_net_raw (13) permitted, effective bit set
CAP_NET_RAW = b"\x01\x00\x00\x02" + (1 << 13).to_bytes(4, "little") + bytes(12)


# ---------------------------------------------------------------------------
# building layers


def _info(name, type_=tarfile.REGTYPE, mode=0o644, uid=0, gid=0, mtime=1_600_000_000,
          **kw) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = type_
    ti.mode = mode
    ti.uid, ti.gid = uid, gid
    ti.mtime = mtime
    for k, v in kw.items():
        setattr(ti, k, v)
    return ti


def F(name, data=b"", **kw):
    data = data.encode() if isinstance(data, str) else data
    ti = _info(name, **kw)
    ti.size = len(data)
    return ti, data


def D(name, mode=0o755, **kw):
    return _info(name, tarfile.DIRTYPE, mode=mode, **kw), None


def S(name, target, **kw):
    return _info(name, tarfile.SYMTYPE, mode=0o777, linkname=target, **kw), None


def H(name, target, **kw):
    return _info(name, tarfile.LNKTYPE, linkname=target, **kw), None


def DEV(name, kind, major, minor, **kw):
    t = tarfile.CHRTYPE if kind == "c" else tarfile.BLKTYPE
    return _info(name, t, devmajor=major, devminor=minor, **kw), None


def FIFO(name, **kw):
    return _info(name, tarfile.FIFOTYPE, **kw), None


def WH(path):
    """Whiteout of path (the .wh. file that deletes it)."""
    parent, _, base = path.rpartition("/")
    return F(f"{parent}/.wh.{base}" if parent else f".wh.{base}")


def OPQ(dirpath):
    return F(f"{dirpath}/.wh..wh..opq")


def xattrs(**pairs) -> dict:
    """pax_headers for xattrs; binary values through surrogateescape."""
    return {f"SCHILY.xattr.{k.replace('__', '.')}":
            (v if isinstance(v, str) else v.decode("utf-8", "surrogateescape"))
            for k, v in pairs.items()}


def tar_bytes(entries, fmt=tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for ti, data in entries:
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def compress(raw: bytes, how: str | None) -> bytes:
    if how == "gzip":
        return gzip.compress(raw, compresslevel=1)
    if how == "zstd":
        import zstandard
        return zstandard.ZstdCompressor().compress(raw)
    return raw


_n = 0


def layer(tmp: Path, entries, how: str | None = "gzip", media: str | None = None,
          fmt=tarfile.PAX_FORMAT, raw: bytes | None = None) -> Layer:
    global _n
    _n += 1
    data = compress(tar_bytes(entries, fmt) if raw is None else raw, how)
    path = tmp / f"layer{_n}.blob"
    path.write_bytes(data)
    if media is None:
        media = {"gzip": OCI_GZIP, "zstd": OCI_ZSTD, None: OCI_TAR}[how]
    return Layer(path, media, "sha256:" + hashlib.sha256(data).hexdigest())


@pytest.fixture
def work(tmp_path):
    """(blobs dir, dest, snapshot of everything outside dest)."""
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    dest = tmp_path / "dest"
    dest.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_text("original")
    (outside / "dir").mkdir()
    (outside / "dir" / "keep").write_text("keep me")
    (tmp_path / "x").write_text("sibling of dest")
    return blobs, dest, tmp_path


def snapshot(root: Path, skip: Path) -> dict:
    """Everything under root except skip: type, mode, owner, size, mtime, content."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if Path(dirpath) == skip or skip in Path(dirpath).parents:
            dirnames[:] = []
            continue
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if p == skip:
                continue
            st = os.lstat(p)
            body = p.read_bytes() if stat.S_ISREG(st.st_mode) else (
                os.readlink(p) if stat.S_ISLNK(st.st_mode) else None)
            out[str(p)] = (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns, body)
    # and what lies around the temp dir itself
    out["<parent>"] = sorted(os.listdir(root.parent))
    return out


def unpack(dest, *layers, limits=Limits()):
    return unpack_layers(list(layers), dest, limits)


# ---------------------------------------------------------------------------
# normal content


@needs_root
def test_round_trip_of_every_entry_kind(work):
    blobs, dest, _ = work
    long_name = "deep/" + "n" * 150 + "/file"
    entries = [
        D("./", mode=0o755, mtime=1_000_000),
        D("etc", mtime=1_100_000),
        F("etc/hosts", "127.0.0.1 localhost\n", mtime=1_200_000),
        F("usr/bin/su", b"\x7fELF", mode=0o4755, uid=0, gid=0),
        F("usr/bin/wall", b"wall", mode=0o2755, gid=5),
        F("usr/bin/ping", b"ping", mode=0o755,
          pax_headers=xattrs(security__capability=CAP_NET_RAW, user__comment="hi")),
        D("tmp", mode=0o1777),
        D("home/user", mode=0o700, uid=1000, gid=1000, mtime=1_300_000,
          pax_headers=xattrs(user__dirattr="d")),
        F("home/user/.profile", "export X=1\n", mode=0o600, uid=1000, gid=1000),
        F("big-ids", "x", uid=3_000_000, gid=4_000_000),   # PAX uid/gid
        S("usr/bin/sh", "dash", mtime=1_400_000),
        S("etc/mtab", "/proc/self/mounts"),       # absolute: data, never followed
        S("up", "../../../../etc"),                # likewise
        H("usr/bin/su-again", "usr/bin/su"),
        DEV("dev/null", "c", 1, 3, mode=0o666),
        DEV("dev/loop0", "b", 7, 0, mode=0o660, gid=6),
        FIFO("run/initctl", mode=0o600),
        F(long_name, "long"),
        F("empty", b""),
        F("./dotslash", "ok"),
    ]
    st = unpack(dest, layer(blobs, entries))
    assert st.layers == 1 and st.entries == len(entries)
    assert st.bytes == sum(ti.size for ti, _ in entries if ti.isreg())

    def mode(p):
        return os.lstat(dest / p).st_mode

    assert (dest / "etc/hosts").read_text() == "127.0.0.1 localhost\n"
    assert stat.S_IMODE(mode("usr/bin/su")) == 0o4755
    assert stat.S_IMODE(mode("usr/bin/wall")) == 0o2755 and os.stat(dest / "usr/bin/wall").st_gid == 5
    assert stat.S_IMODE(mode("tmp")) == 0o1777
    assert os.getxattr(dest / "usr/bin/ping", "security.capability") == CAP_NET_RAW
    assert os.getxattr(dest / "usr/bin/ping", "user.comment") == b"hi"
    assert os.getxattr(dest / "home/user", "user.dirattr") == b"d"
    home = os.stat(dest / "home/user")
    assert (home.st_uid, home.st_gid, stat.S_IMODE(home.st_mode)) == (1000, 1000, 0o700)
    assert os.stat(dest / "home/user/.profile").st_uid == 1000
    big = os.stat(dest / "big-ids")
    assert (big.st_uid, big.st_gid) == (3_000_000, 4_000_000)
    assert os.readlink(dest / "usr/bin/sh") == "dash"
    assert os.readlink(dest / "etc/mtab") == "/proc/self/mounts"
    assert os.readlink(dest / "up") == "../../../../etc"
    su, again = os.stat(dest / "usr/bin/su"), os.stat(dest / "usr/bin/su-again")
    assert su.st_ino == again.st_ino and su.st_nlink == 2
    assert stat.S_ISCHR(mode("dev/null")) and os.stat(dest / "dev/null").st_rdev == os.makedev(1, 3)
    assert stat.S_IMODE(mode("dev/null")) == 0o666
    assert stat.S_ISBLK(mode("dev/loop0")) and os.stat(dest / "dev/loop0").st_rdev == os.makedev(7, 0)
    assert os.stat(dest / "dev/loop0").st_gid == 6
    assert stat.S_ISFIFO(mode("run/initctl")) and stat.S_IMODE(mode("run/initctl")) == 0o600
    assert (dest / long_name).read_text() == "long"
    assert (dest / "empty").read_bytes() == b""
    assert (dest / "dotslash").read_text() == "ok"
    # implicit parents: 0755
    assert stat.S_IMODE(mode("usr")) == 0o755 and stat.S_IMODE(mode("deep")) == 0o755
    # mtimes, directories included (set after their contents)
    assert os.stat(dest).st_mtime == 1_000_000
    assert os.stat(dest / "etc").st_mtime == 1_100_000
    assert os.stat(dest / "etc/hosts").st_mtime == 1_200_000
    assert os.stat(dest / "home/user").st_mtime == 1_300_000
    assert os.lstat(dest / "usr/bin/sh").st_mtime == 1_400_000
    assert st.warnings == []


def test_gnu_format_and_pax_mtime(work):
    blobs, dest, _ = work
    name = "g/" + "x" * 120
    gnu = layer(blobs, [F(name, "gnu", mtime=1234), S("g/s" + "y" * 120, "t" * 150)],
                fmt=tarfile.GNU_FORMAT)
    pax = layer(blobs, [F("p", "pax", mtime=1_500_000_000.25)])
    unpack(dest, gnu, pax)
    assert (dest / name).read_text() == "gnu"
    assert os.readlink(dest / ("g/s" + "y" * 120)) == "t" * 150
    assert os.stat(dest / "p").st_mtime_ns == 1_500_000_000_250_000_000


def test_hard_link_to_earlier_layer(work):
    blobs, dest, _ = work
    l1 = layer(blobs, [F("bin/busybox", "bb", mode=0o755)])
    l2 = layer(blobs, [H("bin/ls", "bin/busybox"), H("sbin/init", "./bin/busybox")])
    unpack(dest, l1, l2)
    ino = os.stat(dest / "bin/busybox").st_ino
    assert os.stat(dest / "bin/ls").st_ino == ino == os.stat(dest / "sbin/init").st_ino


def test_later_layer_replaces_file_without_touching_its_hard_links(work):
    blobs, dest, _ = work
    l1 = layer(blobs, [F("a", "old"), H("b", "a")])
    l2 = layer(blobs, [F("a", "new")])
    unpack(dest, l1, l2)
    assert (dest / "a").read_text() == "new"
    assert (dest / "b").read_text() == "old"


def test_existing_directory_is_kept_and_gets_new_metadata(work):
    blobs, dest, _ = work
    l1 = layer(blobs, [D("d", mode=0o700), F("d/old", "1")])
    l2 = layer(blobs, [D("d", mode=0o751, mtime=42), F("d/new", "2")])
    unpack(dest, l1, l2)
    assert sorted(os.listdir(dest / "d")) == ["new", "old"]
    assert stat.S_IMODE(os.stat(dest / "d").st_mode) == 0o751
    assert os.stat(dest / "d").st_mtime == 42


# ---------------------------------------------------------------------------
# whiteouts


def test_whiteouts(work):
    blobs, dest, _ = work
    lower = layer(blobs, [
        F("a/file", "x"), F("a/other", "y"),
        D("b"), F("b/dir/x", "x"), F("b/dir/y", "y"),
        D("c"), F("c/inner", "c"),
        F("d", "file d"),
        S("s", "/etc"),
        D("e"), F("e/old1", "1"), F("e/old2/sub", "2"), F("e/keep/oldchild", "3"),
        F("e/keep/samename", "lower"),
    ])
    upper = layer(blobs, [
        WH("a/file"),                     # delete a file
        WH("b/dir"),                      # delete a directory tree
        F("c", "now a file"),             # a directory replaced by a file
        D("d"), F("d/new", "n"),          # a file replaced by a directory
        WH("s"),                          # a symlink deleted (not followed)
        WH("nothing/there"),              # whiteout of nothing: fine
        # opaque, with entries of this layer before and after the marker
        F("e/before", "b"),
        D("e/keep"), F("e/keep/samename", "upper"),
        OPQ("e"),
        F("e/after", "a"),
    ])
    st = unpack(dest, lower, upper)
    assert sorted(os.listdir(dest / "a")) == ["other"]
    assert os.listdir(dest / "b") == []
    assert (dest / "c").read_text() == "now a file"
    assert (dest / "d/new").read_text() == "n"
    assert not os.path.lexists(dest / "s")
    assert sorted(os.listdir(dest / "e")) == ["after", "before", "keep"]
    assert os.listdir(dest / "e/keep") == ["samename"]
    assert (dest / "e/keep/samename").read_text() == "upper"
    assert st.whiteouts == 5
    # whiteout files never appear
    for dirpath, dirnames, filenames in os.walk(dest):
        assert not [n for n in dirnames + filenames if n.startswith(".wh.")]
    assert not (dest / "nothing").exists()


def test_opaque_marker_order_does_not_matter(work):
    blobs, _, tmp = work
    lower = [F("o/old", "1"), F("o/sub/old", "2")]
    adds = [F("o/new1", "n"), F("o/sub/new2", "n")]
    results = []
    for i, upper in enumerate([[OPQ("o")] + adds, adds + [OPQ("o")], adds[:1] + [OPQ("o")] + adds[1:]]):
        dest = tmp / f"d{i}"
        dest.mkdir()
        unpack(dest, layer(blobs, lower), layer(blobs, upper))
        results.append(sorted(str(p.relative_to(dest)) for p in dest.rglob("*")))
    assert results[0] == results[1] == results[2] == ["o", "o/new1", "o/sub", "o/sub/new2"]


def test_opaque_root_and_whiteout_of_a_directory_this_layer_adds_to(work):
    blobs, dest, _ = work
    lower = layer(blobs, [F("x", "1"), F("dir/old", "2")])
    upper = layer(blobs, [F("dir/new", "3"), WH("dir"), F("y", "4"), OPQ(".")])
    unpack(dest, lower, upper)
    assert sorted(os.listdir(dest)) == ["dir", "y"]
    assert os.listdir(dest / "dir") == ["new"]


def test_whiteout_cannot_be_used_to_delete_outside(work):
    blobs = work[0]
    l1 = layer(blobs, [S("evil", "../outside")])   # relative to dest: tmp/outside
    for bad in (WH("evil/victim"), OPQ("evil"), WH("evil/dir")):
        refused(work, [l1, layer(blobs, [bad])], bad[0].name, "symlink")


# ---------------------------------------------------------------------------
# compression


@pytest.mark.parametrize("how,media", [
    ("gzip", OCI_GZIP), ("zstd", OCI_ZSTD), (None, OCI_TAR), ("gzip", DOCKER_GZIP),
])
def test_compressions(work, how, media):
    blobs, dest, _ = work
    data = os.urandom(3 << 20) + b"tail"   # several chunks
    st = unpack(dest, layer(blobs, [F("f", data), F("g", "small")], how=how, media=media))
    assert (dest / "f").read_bytes() == data and (dest / "g").read_text() == "small"
    assert st.warnings == []


@pytest.mark.parametrize("how,media", [
    (None, OCI_GZIP),              # docker save: plain tar, labelled gzip
    ("gzip", OCI_TAR),             # gzip labelled plain
    ("zstd", OCI_GZIP),            # zstd labelled gzip
    ("gzip", "application/octet-stream"),   # unknown label: sniffed
])
def test_mislabelled_compression_is_sniffed(work, how, media):
    blobs, dest, _ = work
    st = unpack(dest, layer(blobs, [F("f", "content")], how=how, media=media))
    assert (dest / "f").read_text() == "content"
    if media != "application/octet-stream":
        assert any("media type" in w for w in st.warnings)


def test_multi_member_gzip(work):
    blobs, dest, _ = work
    raw = tar_bytes([F("a", "1" * 5000), F("b", "2")])
    blob = blobs / "multi.gz"
    blob.write_bytes(gzip.compress(raw[:3000]) + gzip.compress(raw[3000:]))
    unpack(dest, Layer(blob, OCI_GZIP, "sha256:multi"))
    assert (dest / "a").read_text() == "1" * 5000 and (dest / "b").read_text() == "2"


def test_empty_layer(work):
    blobs, dest, _ = work
    empty = blobs / "empty"
    empty.write_bytes(b"")
    st = unpack(dest, Layer(empty, OCI_TAR, "sha256:empty"), layer(blobs, []))
    assert st.entries == 0 and os.listdir(dest) == []


def test_corrupt_and_truncated_layers(work):
    blobs, dest, _ = work
    raw = tar_bytes([F("f", "x" * 2000)])
    bad = bytearray(raw)
    bad[0] ^= 0xFF   # header checksum no longer matches
    for data, how, what in [(bytes(bad), None, "checksum"), (raw[:1000], None, "ends inside"),
                            (gzip.compress(raw)[:-30], "raw-gz", "truncated|ends")]:
        blob = blobs / "bad"
        blob.write_bytes(data)
        with pytest.raises(UnpackError, match=what) as ei:
            unpack(dest, Layer(blob, OCI_TAR, "sha256:bad"))
        assert "sha256:bad" in str(ei.value)


# ---------------------------------------------------------------------------
# refusals: nothing outside dest, and the error names the entry


def refused(work, layers, entry: str, match: str | None = None, limits=Limits()):
    _, dest, tmp = work
    before = snapshot(tmp, dest)
    with pytest.raises(UnpackError, match=match) as ei:
        unpack(dest, *layers, limits=limits)
    assert snapshot(tmp, dest) == before, "something outside dest changed"
    assert ei.value.entry == entry
    assert repr(entry) in str(ei.value)
    assert ei.value.digest == layers[-1].digest and layers[-1].digest in str(ei.value)
    return ei.value


@pytest.mark.parametrize("name", ["../x", "a/../../x", "a/b/../../../x", "..", "./../x"])
def test_refuses_dotdot(work, name):
    blobs = work[0]
    refused(work, [layer(blobs, [F("ok", "1"), F(name, "pwned")])], name, "'..'")


@pytest.mark.parametrize("name", ["/etc/x", "//etc/x", "/"])
def test_refuses_absolute_names(work, name):
    blobs = work[0]
    refused(work, [layer(blobs, [F(name, "pwned")])], name, "absolute")


@pytest.mark.parametrize("target", ["/", "..", "../outside", "../../..", "/etc"])
def test_refuses_writing_through_a_symlink_same_layer(work, target):
    blobs, dest = work[0], work[1]
    # names no host file has, so that a regression cannot clobber one (and is cleaned up)
    unique = f"hyperrun-unpack-test-{os.getpid()}-{os.urandom(4).hex()}"
    victims = [f"evil/{unique}", f"evil/{unique}.d/new"]
    if target == "../outside":
        victims += ["evil/victim", "evil/dir/keep"]
    try:
        for victim in victims:
            refused(work, [layer(blobs, [S("evil", target), F(victim, "pwned")])], victim,
                    "symlink")
    finally:
        landed = Path(os.path.normpath(os.path.join(dest, target, unique)))
        if landed.is_file():
            landed.unlink()
        shutil.rmtree(f"{landed}.d", ignore_errors=True)


def test_refuses_writing_through_a_symlink_across_layers(work):
    blobs = work[0]
    l1 = layer(blobs, [D("a"), S("a/evil", "../../outside")])
    for entry in [F("a/evil/victim", "pwned"), D("a/evil/newdir"), S("a/evil/l", "x"),
                  DEV("a/evil/null", "c", 1, 3), FIFO("a/evil/fifo"), F("a/evil/sub/deep", "p")]:
        name = entry[0].name + ("/" if entry[0].isdir() else "")   # as tarfile writes it
        refused(work, [l1, layer(blobs, [entry])], name, "symlink")


def test_entry_replacing_a_symlink_does_not_follow_it(work):
    blobs, dest, tmp = work
    l1 = layer(blobs, [S("f", "../outside/victim"), S("d", "../outside/dir"),
                       S("h", "../outside/victim")])
    l2 = layer(blobs, [F("f", "mine"), D("d", mode=0o700), F("real", "r"), H("h", "real")])
    before = snapshot(tmp, dest)
    unpack(dest, l1, l2)
    assert snapshot(tmp, dest) == before
    assert (dest / "f").read_text() == "mine" and not (dest / "f").is_symlink()
    assert (dest / "d").is_dir() and not (dest / "d").is_symlink()
    assert os.stat(dest / "h").st_ino == os.stat(dest / "real").st_ino


@pytest.mark.parametrize("target", ["../outside/victim", "/etc/passwd", "a/../../outside/victim",
                                    "/"])
def test_refuses_hard_link_outside(work, target):
    blobs = work[0]
    refused(work, [layer(blobs, [F("a/f", "x"), H("link", target)])], "link",
            "hard link target")


def test_refuses_hard_link_through_a_symlink(work):
    blobs = work[0]
    l1 = layer(blobs, [S("evil", "../outside")])
    refused(work, [l1, layer(blobs, [H("stolen", "evil/victim")])], "stolen", "symlink")
    # the link itself through a symlink
    l2 = layer(blobs, [F("real", "r"), S("evil2", "../outside")])
    refused(work, [l2, layer(blobs, [H("evil2/linked", "real")])], "evil2/linked", "symlink")


def test_hard_link_to_a_symlink_links_the_symlink_itself(work):
    blobs, dest, tmp = work
    l1 = layer(blobs, [S("s", "../outside/victim"), H("h", "s")])
    before = snapshot(tmp, dest)
    unpack(dest, l1)
    assert snapshot(tmp, dest) == before
    assert os.readlink(dest / "h") == "../outside/victim"
    assert os.lstat(dest / "h").st_ino == os.lstat(dest / "s").st_ino


def test_refuses_missing_hard_link_target(work):
    blobs = work[0]
    refused(work, [layer(blobs, [H("link", "nothing")])], "link", "does not exist")


def test_refuses_garbage(work):
    blobs = work[0]
    blob = blobs / "junk"
    blob.write_bytes(os.urandom(4096))
    with pytest.raises(UnpackError, match="sha256:junk: bad tar header checksum"):
        unpack(work[1], Layer(blob, OCI_TAR, "sha256:junk"))


def test_refuses_unknown_entry_type(work):
    blobs = work[0]
    ti = _info("weird")
    ti.type = b"Z"
    refused(work, [layer(blobs, [(ti, None)])], "weird", "unsupported tar entry type")


def test_refuses_nul_in_name(work):
    blobs = work[0]
    ti, data = F("placeholder", "x")
    ti.pax_headers = {"path": "a\x00b"}
    refused(work, [layer(blobs, [(ti, data)])], "a\x00b", "NUL")


def test_refuses_paths_longer_than_path_max(work):
    blobs = work[0]
    name = "/".join(["d" * 200] * 25)   # 5024 bytes
    refused(work, [layer(blobs, [F(name, "x")])], name, "max_name_length|PATH_MAX")


def test_limit_depth(work):
    blobs, dest, _ = work
    ok = "/".join(["d"] * 200) + "/f"
    unpack(dest, layer(blobs, [F(ok, "deep")]))
    assert (dest / ok).read_text() == "deep"
    name = "/".join(["e"] * 300) + "/f"
    refused(work, [layer(blobs, [F(name, "x")])], name, "max_depth")


def test_limit_entries(work):
    blobs = work[0]
    entries = [F(f"f{i}", "x") for i in range(10)]
    err = refused(work, [layer(blobs, entries)], "f5", "max_entries",
                  limits=Limits(max_entries=5))
    assert "5" in str(err)


def test_limit_bytes(work):
    blobs = work[0]
    l1 = layer(blobs, [F("a", b"x" * 600)])
    l2 = layer(blobs, [F("b", b"y" * 600)])
    refused(work, [l1, l2], "b", "max_bytes", limits=Limits(max_bytes=1000))


def test_limit_name_length(work):
    blobs = work[0]
    refused(work, [layer(blobs, [F("n" * 60, "x")])], "n" * 60, "max_name_length",
            limits=Limits(max_name_length=50))


def test_limit_extended_header(work):
    blobs = work[0]
    ti, data = F("f", "x")
    ti.pax_headers = {"comment": "c" * 5000}
    with pytest.raises(UnpackError, match="max_extended_header"):
        unpack(work[1], layer(blobs, [(ti, data)]), limits=Limits(max_extended_header=4096))


def test_unsettable_xattr_is_a_counted_warning(work):
    blobs, dest, _ = work
    ti, data = F("f", "x", pax_headers=xattrs(bogusnamespace__x="1", user__ok="2"))
    st = unpack(dest, layer(blobs, [(ti, data)]))
    assert (dest / "f").read_text() == "x"
    assert os.getxattr(dest / "f", "user.ok") == b"2"
    assert st.skipped_xattrs == 1 and any("bogusnamespace.x" in w for w in st.warnings)


# ---------------------------------------------------------------------------
# the erofs image


def _erofs_mountable() -> bool:
    try:
        return ROOT and "erofs" in Path("/proc/filesystems").read_text() \
            and shutil.which("mount") is not None
    except OSError:
        return False


@pytest.mark.skipif(shutil.which("mkfs.erofs") is None, reason="erofs-utils not installed")
@needs_root
def test_rootfs_image_is_reproducible_and_complete(work):
    blobs, _, tmp = work
    entries = [
        D("./", mtime=1000), D("bin", mtime=2000), D("dev", mtime=2000), D("etc", mtime=2000),
        F("bin/su", b"\x7fELF su", mode=0o4755, mtime=3000,
          pax_headers=xattrs(security__capability=CAP_NET_RAW)),
        H("bin/su2", "bin/su"),
        F("etc/shadow", "root:*:", mode=0o640, gid=42, mtime=1_700_000_000),
        S("etc/localtime", "/usr/share/zoneinfo/UTC", mtime=4000),
        DEV("dev/null", "c", 1, 3, mode=0o666, mtime=5000),
        FIFO("dev/fifo", mtime=5000),
        D("tmp", mode=0o1777, mtime=6000),
    ]
    trees = []
    for i in range(2):
        tree = tmp / f"tree{i}"
        tree.mkdir()
        unpack(tree, layer(blobs, entries))
        trees.append(tree)
    out_a, out_b = tmp / "a.erofs", tmp / "b.erofs"
    size = build_rootfs_image(trees[0], out_a)
    assert size == out_a.stat().st_size > 0
    build_rootfs_image(trees[1], out_b)
    assert out_a.read_bytes() == out_b.read_bytes(), "two builds of the same tree differ"
    assert not [p for p in tmp.iterdir() if p.name.endswith(".tmp")]

    dump = subprocess.run(["dump.erofs", "--path=/etc/shadow", str(out_a)],
                          capture_output=True, text=True)
    if dump.returncode == 0:
        assert "Gid: 42" in dump.stdout

    if not _erofs_mountable():
        pytest.skip("cannot mount erofs here; checked reproducibility only")
    mnt = tmp / "mnt"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "erofs", "-o", "loop,ro", str(out_a), str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"mount -t erofs failed: {r.stderr.strip()}")
    try:
        su = os.stat(mnt / "bin/su")
        assert stat.S_IMODE(su.st_mode) == 0o4755 and su.st_mtime == 3000
        assert os.stat(mnt / "bin/su2").st_ino == su.st_ino and su.st_nlink == 2
        assert os.getxattr(mnt / "bin/su", "security.capability") == CAP_NET_RAW
        assert (mnt / "bin/su").read_bytes() == b"\x7fELF su"
        shadow = os.stat(mnt / "etc/shadow")
        assert (shadow.st_gid, stat.S_IMODE(shadow.st_mode)) == (42, 0o640)
        assert shadow.st_mtime == 1_700_000_000
        assert os.readlink(mnt / "etc/localtime") == "/usr/share/zoneinfo/UTC"
        null = os.lstat(mnt / "dev/null")
        assert stat.S_ISCHR(null.st_mode) and null.st_rdev == os.makedev(1, 3)
        assert stat.S_IMODE(null.st_mode) == 0o666
        assert stat.S_ISFIFO(os.lstat(mnt / "dev/fifo").st_mode)
        assert stat.S_IMODE(os.stat(mnt / "tmp").st_mode) == 0o1777
        assert os.stat(mnt / "tmp").st_mtime == 6000 and os.stat(mnt).st_mtime == 1000
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
