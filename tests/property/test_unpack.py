"""The layer unpacker (hyperrun/image/unpack.py) under hostile archives.

Layers are generated three ways: well-formed tar archives (tarfile, in
ustar, GNU and PAX formats) whose names, link targets, types, numbers and
PAX records are hostile; such archives with bytes mutated (header checksums
fixed up, so the mutation reaches the parser); and raw bytes, some shaped as
header blocks with valid checksums. Each goes plain or compressed.

Whatever the input, unpack_layers either raises UnpackError or leaves a tree
that is entirely inside the destination: nothing appears or changes beside
it in a sentinel parent directory, nor at a fixed absolute canary path the
hostile names aim at; no hard link in the tree shares an inode with a file
outside; the destination is still a directory; no fd or thread is left
behind. Symlinks in the result may point anywhere (their targets are data,
resolved later inside the guest's root); what is checked is that the
unpacker never went through one, which the untouched sentinel shows.
"""
from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import shutil
import stat
import tarfile
import tempfile
import threading
from pathlib import Path

import pytest
import zstandard
from hypothesis import given, strategies as st

from hyperrun.image.unpack import GiB, Layer, Limits, UnpackError, unpack_layers

from . import budget, counted

# hypothesis warns that the archives are long to print (only on failures)
pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")

# An absolute path hostile names aim at; it must never come to exist.
CANARY = Path(tempfile.gettempdir()) / f"hyperrun-fuzz-canary-{os.getpid()}"
_CB = os.fsencode(CANARY)

MEDIA = {
    "tar": "application/vnd.oci.image.layer.v1.tar",
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
    "xz": "application/vnd.oci.image.layer.v1.tar",   # sniffed, not labelled
    "bzip2": "application/vnd.docker.image.rootfs.diff.tar",
}


def compress(data: bytes, kind: str) -> bytes:
    if kind == "gzip":
        return gzip.compress(data, 1)
    if kind == "zstd":
        return zstandard.ZstdCompressor(level=1).compress(data)
    if kind == "xz":
        return lzma.compress(data, preset=0)
    if kind == "bzip2":
        return bz2.compress(data, 1)
    return data


# ---------------------------------------------------------------------------
# strategies

hostile_component = st.one_of(
    st.sampled_from([b"..", b".", b"", b"etc", b"outside", b"victim", b"dest", b".wh.a", b".wh.b",
                     b".wh.dir", b".wh.link", b".wh..wh..opq", b".wh..wh.plnk", b".wh..", b".wh.",
                     b".wh...", b"x" * 256, "é".encode(), b"\xff\xfe", b"a\\b", b" ", b"a\0b"]),
    st.binary(min_size=1, max_size=6))
# a few names, so that entries collide: a file where a directory was, a path
# through an earlier symlink, a hard link to an earlier entry, whiteouts
plain_component = st.sampled_from([b"a", b"b", b"dir", b"link"])
component = st.one_of(plain_component, plain_component, plain_component, hostile_component)
prefix = st.one_of(st.just(b""), st.just(b""), st.just(b""), st.just(b""), st.sampled_from(
    [b"./", b"/", b"../", b"../../", b"dir/../../", _CB + b"/",
     b"../" * 12 + _CB.lstrip(b"/") + b"/", b"//", b"./../"]))
plain_name = st.lists(plain_component, min_size=1, max_size=3).map(b"/".join)
hostile_name = st.builds(lambda p, parts: p + b"/".join(parts), prefix,
                         st.lists(component, min_size=0, max_size=4))
name = st.one_of(plain_name, plain_name, plain_name, hostile_name)
link_target = st.one_of(name, st.sampled_from([b"/", b"..", b"../outside", b"../outside/victim",
                                               b"../outside/dir", b"../../sentinel/outside",
                                               _CB, _CB + b"/f", b"/etc/passwd", b"/proc/self/root",
                                               b"a", b"dir", b"link", b"dir/a", b"link/victim",
                                               b""]))

TYPES = [tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE,
         tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE, tarfile.CONTTYPE,
         tarfile.GNUTYPE_SPARSE, b"V", b"D", b"M", b"Z"]
COMMON_TYPES = [tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE]
hostile_number = st.one_of(st.integers(-(1 << 70), 1 << 70), st.sampled_from(
    [-1, (1 << 32) - 2, (1 << 32) - 1, 1 << 32, (1 << 63) - 1, 1 << 63, -(1 << 63), 8 ** 11,
     8 ** 12, 0xFFF, 0x1000, 0xFFFFF, 0x100000]))
number = st.one_of(*[st.integers(0, 70000)] * 20, hostile_number)
pax_value = st.one_of(st.text(max_size=12), number.map(str),
                      st.sampled_from(["-1", "1e9", "nan", "0x10", "1.5", "-1.5", "99999999999999",
                                       "../outside/victim", str(CANARY), "é", "", " 1", "link/a",
                                       "AAAA", "AAA", "=", "a/../../b"]))
pax_key = st.sampled_from(["path", "linkpath", "size", "uid", "gid", "mtime", "atime", "uname",
                           "SCHILY.xattr.user.a", "SCHILY.xattr.trusted.t",
                           "SCHILY.xattr.security.capability", "SCHILY.xattr.",
                           "SCHILY.xattr.user.a\0b", "SCHILY.xattr.system.posix_acl_access",
                           "LIBARCHIVE.xattr.user.b", "LIBARCHIVE.xattr.%00", "GNU.sparse.major",
                           "GNU.sparse.size", "devmajor", "devminor", "hdrcharset", "comment"])
member = st.fixed_dictionaries({
    "type": st.one_of(*[st.sampled_from(COMMON_TYPES)] * 3, st.sampled_from(TYPES)),
    "name": name,
    "linkname": link_target,
    "data": st.binary(max_size=64),
    "size": st.one_of(st.none(), st.none(), st.none(), st.integers(0, 2000)),  # None: len(data)
    "mode": st.one_of(st.integers(0, 0o7777), st.integers(0, 0o7777), hostile_number),
    "uid": number, "gid": number, "mtime": number,
    "devmajor": st.one_of(*[st.integers(0, 300)] * 10, hostile_number),
    "devminor": st.one_of(*[st.integers(0, 300)] * 10, hostile_number),
    "pax": st.one_of(st.just({}), st.just({}), st.dictionaries(pax_key, pax_value, max_size=3)),
})
# Escape attempts: every field is ordinary but names and link targets. A
# layer stops at its first refused entry, so the attempts come as short
# "gadgets": a symlink (or hard link) and then an entry that goes through it,
# or a single entry that climbs ("..") or names an absolute path; several
# layers let a later one use what an earlier one left.
escape_component = st.sampled_from([b"a", b"dir", b"link", b"..", b".", b"outside", b"victim",
                                    b"sentinel", b"dest"])
escape_name = st.builds(lambda p, parts: p + b"/".join(parts),
                        st.sampled_from([b"", b"", b"", b"./", b"/", _CB + b"/"]),
                        st.lists(escape_component, min_size=1, max_size=5))
escape_target = st.one_of(escape_name, *[st.sampled_from(
    [b"..", b"../outside", b"../outside/victim", b"../outside/dir", b"../../sentinel/outside",
     b"../outside/link", _CB, b"/etc/passwd", b"/", b"link", b"link/victim", b"dir/../..",
     b"dir/.."])] * 3)
link_name = st.sampled_from([b"link", b"dir/link", b"a"])
ENTRY_TYPES = [tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE,
               tarfile.FIFOTYPE, tarfile.CHRTYPE]


def _m(type_: bytes, name_: bytes, linkname: bytes = b"") -> dict:
    return {"type": type_, "name": name_, "linkname": linkname, "data": b"escaped", "size": None,
            "mode": 0o755, "uid": 0, "gid": 0, "mtime": 1 << 30, "devmajor": 1, "devminor": 3,
            "pax": {}}


gadget = st.one_of(
    # a symlink, then an entry through it
    st.builds(lambda n, t, typ, rest, lt: [_m(tarfile.SYMTYPE, n, t), _m(typ, n + b"/" + rest, lt)],
              link_name, escape_target, st.sampled_from(ENTRY_TYPES),
              st.sampled_from([b"x", b"victim", b"dir", b"dir/x", b"link", b"."]), escape_target),
    # a symlink, then a hard link to something through it
    st.builds(lambda n, t, h, rest: [_m(tarfile.SYMTYPE, n, t),
                                     _m(tarfile.LNKTYPE, h, n + b"/" + rest)],
              link_name, escape_target, st.sampled_from([b"h", b"dir/h"]),
              st.sampled_from([b"victim", b"x", b"link"])),
    # a symlink replaced by a directory, a file or another symlink
    st.builds(lambda n, t, typ, lt: [_m(tarfile.SYMTYPE, n, t), _m(typ, n, lt)],
              link_name, escape_target, st.sampled_from(ENTRY_TYPES), escape_target),
    # a hard link to whatever
    st.builds(lambda n, t: [_m(tarfile.LNKTYPE, n, t)], escape_name, escape_target),
    # one entry
    st.builds(lambda typ, n, t: [_m(typ, n, t)], st.sampled_from(ENTRY_TYPES), escape_name,
              escape_target),
)
escape_archive = st.builds(
    lambda fmt, gadgets: build_tar({"format": fmt, "global_pax": {},
                                    "members": [m for g in gadgets for m in g]}),
    st.sampled_from([tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]),
    st.lists(gadget, min_size=1, max_size=2))

FORMATS = [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]
archive_spec = st.fixed_dictionaries({
    "format": st.sampled_from(FORMATS),
    "global_pax": st.one_of(st.just({}), st.dictionaries(pax_key, pax_value, max_size=2)),
    "members": st.lists(member, max_size=10),
})


def build_tar(spec) -> bytes:
    """A tar archive as tarfile writes it; members tarfile refuses to write
    (too long for the format, numbers out of range) are left out."""
    fmt = spec["format"]
    out = io.BytesIO()
    kw = {"pax_headers": spec["global_pax"]} if fmt == tarfile.PAX_FORMAT and \
        spec["global_pax"] else {}
    with tarfile.open(fileobj=out, mode="w", format=fmt, **kw) as tar:
        for m in spec["members"]:
            ti = tarfile.TarInfo(os.fsdecode(m["name"]))
            ti.type = m["type"]
            ti.linkname = os.fsdecode(m["linkname"])
            data = m["data"]
            ti.size = len(data) if m["size"] is None else m["size"]
            data = (data * (ti.size // max(len(data), 1) + 1))[:ti.size] if data else \
                bytes(ti.size)
            for key in ("mode", "uid", "gid", "mtime", "devmajor", "devminor"):
                setattr(ti, key, m[key])
            if fmt == tarfile.PAX_FORMAT:
                ti.pax_headers = dict(m["pax"])
            try:
                buf = ti.tobuf(fmt, tar.encoding, tar.errors)
            except (ValueError, OverflowError, UnicodeError, TypeError, tarfile.TarError):
                continue
            tar.fileobj.write(buf)
            tar.offset += len(buf)
            tar.fileobj.write(data)
            blocks, rest = divmod(len(data), tarfile.BLOCKSIZE)
            if rest:
                tar.fileobj.write(tarfile.NUL * (tarfile.BLOCKSIZE - rest))
                blocks += 1
            tar.offset += blocks * tarfile.BLOCKSIZE
    return out.getvalue()


def fix_checksums(data: bytearray) -> None:
    """Give every block that looks like a tar header a valid checksum."""
    for off in range(0, len(data) - 511, 512):
        block = data[off:off + 512]
        if block[257:262] == b"ustar":
            chk = sum(block[:148]) + 8 * 32 + sum(block[156:512])
            data[off + 148:off + 156] = b"%06o\0 " % (chk & 0o777777)


mutation = st.tuples(st.sampled_from(["set", "flip", "insert", "delete", "truncate"]),
                     st.floats(0, 1), st.binary(min_size=1, max_size=8))


def mutate(data: bytes, mutations, fix: bool) -> bytes:
    buf = bytearray(data)
    for op, where, value in mutations:
        at = int(where * len(buf)) if buf else 0
        if op == "set":
            buf[at:at + len(value)] = value
        elif op == "flip":
            if buf:
                at = min(at, len(buf) - 1)
                buf[at] ^= value[0] or 0x80
        elif op == "insert":
            buf[at:at] = value
        elif op == "delete":
            del buf[at:at + len(value) * 37]
        else:
            del buf[at:]
    if fix:
        fix_checksums(buf)
    return bytes(buf)


def header_block(name: bytes, typ: bytes, size: bytes, rest: bytes) -> bytes:
    """A 512-byte header of mostly random fields, with a valid checksum."""
    block = bytearray((rest * (512 // max(len(rest), 1) + 1))[:512] if rest else bytes(512))
    block[0:100] = name[:100].ljust(100, b"\0")
    block[124:136] = size[:12].ljust(12, b"\0")
    block[156:157] = typ
    block[257:263] = b"ustar\0"
    fix_checksums(block)
    return bytes(block)


raw_layer = st.one_of(
    st.binary(max_size=2048),
    st.lists(st.one_of(
        st.builds(header_block, name, st.sampled_from(TYPES + [b"x", b"g", b"L", b"K", b"\0"]),
                  st.one_of(st.sampled_from([b"0", b"777", b"77777777777", b"\x80" + b"\xff" * 11,
                                             b"\xff" * 12, b"\x80\0\0\0\0\0\0\0\0\x10\0\0",
                                             b"-1", b"zz"]), st.binary(max_size=12)),
                  st.binary(max_size=40)),
        st.binary(max_size=600),
        st.just(bytes(512))), max_size=6).map(b"".join))

well_formed = st.builds(build_tar, archive_spec)
mutated = st.builds(mutate, well_formed, st.lists(mutation, min_size=1, max_size=4), st.booleans())
kind = st.sampled_from(["tar", "tar", "tar", "gzip", "zstd", "xz", "bzip2"])
layer = st.tuples(st.one_of(well_formed, escape_archive, mutated, raw_layer), kind,
                  st.booleans(), st.sampled_from(sorted(set(MEDIA.values()))))


# ---------------------------------------------------------------------------
# the check


def _snapshot(root: Path) -> dict:
    """Everything under root (not following symlinks): type, mode, owner,
    size, mtime, link count, symlink targets and file contents."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for n in [*dirnames, *filenames, "."]:
            p = os.path.join(dirpath, n)
            st_ = os.lstat(p)
            item = (stat.S_IFMT(st_.st_mode), st_.st_mode, st_.st_uid, st_.st_gid, st_.st_size,
                    st_.st_mtime_ns, st_.st_nlink)
            if stat.S_ISLNK(st_.st_mode):
                item += (os.readlink(p),)
            elif stat.S_ISREG(st_.st_mode):
                item += (Path(p).read_bytes(),)
            out[os.path.relpath(p, root)] = item
    return out


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def check_unpack(blobs: list[tuple[bytes, str]], limits: Limits = Limits()):
    """Unpack the layers in a fresh sentinel directory; returns the
    UnpackError or None, after checking that nothing escaped."""
    with tempfile.TemporaryDirectory(prefix="hyperrun-fuzz-") as tmp:
        tmp = Path(tmp)
        blobdir = tmp / "blobs"
        blobdir.mkdir()
        sentinel = tmp / "sentinel"
        outside = sentinel / "outside"
        (outside / "dir").mkdir(parents=True)
        (outside / "victim").write_bytes(b"victim")
        os.symlink("victim", outside / "link")
        dest = sentinel / "dest"
        dest.mkdir()
        layers = []
        for i, (data, media) in enumerate(blobs):
            path = blobdir / f"{i}"
            path.write_bytes(data)
            layers.append(Layer(path, media, f"sha256:{i:064x}"))
        before_out, before_blobs = _snapshot(outside), _snapshot(blobdir)
        fds, threads = _fds(), threading.active_count()
        error = None
        try:
            unpack_layers(layers, dest, limits)
        except UnpackError as exc:
            error = exc
        assert _fds() == fds, "file descriptors left open"
        assert threading.active_count() == threads, "threads left behind"
        if os.path.lexists(CANARY):
            (shutil.rmtree if os.path.isdir(CANARY) and not os.path.islink(CANARY)
             else os.unlink)(CANARY)   # for the next example (and the shrinker)
            raise AssertionError(f"{CANARY} was created")
        assert sorted(os.listdir(tmp)) == ["blobs", "sentinel"], os.listdir(tmp)
        assert sorted(os.listdir(sentinel)) == ["dest", "outside"], \
            f"created beside the destination: {os.listdir(sentinel)}"
        assert _snapshot(outside) == before_out, "something outside the destination changed"
        assert _snapshot(blobdir) == before_blobs
        st_dest = os.lstat(dest)
        assert stat.S_ISDIR(st_dest.st_mode), "the destination was replaced"
        # every inode in the tree is linked only from inside the tree
        links: dict[tuple[int, int], list[int]] = {}
        for dirpath, dirnames, filenames in os.walk(dest, followlinks=False):
            for n in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
                s = os.lstat(os.path.join(dirpath, n))
                assert s.st_dev == st_dest.st_dev
                seen = links.setdefault((s.st_dev, s.st_ino), [0, s.st_nlink])
                seen[0] += 1
        for (_dev, ino), (count, nlink) in links.items():
            assert count == nlink, f"inode {ino} has {nlink} links, {count} inside the tree"
        return error


def _rendered(layers) -> list[tuple[bytes, str]]:
    out = []
    for data, kind_, labelled, media in layers:
        out.append((compress(data, kind_), MEDIA[kind_] if labelled else media))
    return out


# ---------------------------------------------------------------------------
# properties


@budget(1.0)
@given(layers=st.lists(st.tuples(well_formed, kind, st.booleans(),
                                 st.sampled_from(sorted(set(MEDIA.values())))),
                       min_size=1, max_size=3))
@counted
def test_well_formed_hostile_archives(layers):
    check_unpack(_rendered(layers))


@budget(1.0)
@given(layers=st.lists(escape_archive, min_size=1, max_size=4))
@counted
def test_escape_attempts(layers):
    check_unpack([(data, MEDIA["tar"]) for data in layers])


@budget(1.0)
@given(layers=st.lists(layer, min_size=1, max_size=3))
@counted
def test_mutated_and_random_archives(layers):
    check_unpack(_rendered(layers))


@budget(0.5)
@given(data=st.one_of(st.builds(compress, st.one_of(well_formed, raw_layer),
                                st.sampled_from(["gzip", "zstd", "xz", "bzip2"])),
                      st.binary(max_size=256)),
       cut=st.floats(0, 1), junk=st.binary(max_size=64))
@counted
def test_truncated_and_corrupt_compressed_layers(data, cut, junk):
    data = data[:int(len(data) * cut)] + junk
    check_unpack([(data, MEDIA["gzip"])])


# -- limits ------------------------------------------------------------------


def _tar(members: list[tuple[tarfile.TarInfo, bytes | None]], fmt=tarfile.PAX_FORMAT) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tar:
        for ti, data in members:
            tar.addfile(ti, io.BytesIO(data) if data is not None else None)
    return out.getvalue()


def _file(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    return ti, data


@budget(0.5)
@given(sizes=st.lists(st.integers(0, 3000), min_size=1, max_size=10),
       max_entries=st.integers(1, 12), max_bytes=st.integers(0, 20000))
@counted
def test_entry_and_byte_limits(sizes, max_entries, max_bytes):
    data = _tar([_file(f"f{i}", b"x" * n) for i, n in enumerate(sizes)])
    error = check_unpack([(data, MEDIA["tar"])],
                         Limits(max_entries=max_entries, max_bytes=max_bytes))
    total = 0
    for i, n in enumerate(sizes):
        if i + 1 > max_entries:
            assert error is not None and "max_entries" in str(error), error
            return
        total += n
        if total > max_bytes:
            assert error is not None and "max_bytes" in str(error), error
            return
    assert error is None, error


@budget(0.5)
@given(depth=st.integers(1, 40), width=st.integers(1, 40), max_depth=st.integers(1, 40),
       max_name=st.integers(1, 400), fmt=st.sampled_from([tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]))
@counted
def test_name_length_and_depth_limits(depth, width, max_depth, max_name, fmt):
    """Long names (GNU long-name or PAX path records) and deep ones."""
    name = "/".join(["d" * width] * depth)
    error = check_unpack([(_tar([_file(name, b"x")], fmt), MEDIA["tar"])],
                         Limits(max_depth=max_depth, max_name_length=max_name))
    if len(name) > max_name:
        assert error is not None and "max_name_length" in str(error), error
    elif depth > max_depth:
        assert error is not None and "max_depth" in str(error), error
    elif width > 255:
        assert error is not None
    else:
        assert error is None, error


def _gnu_base256(value: int, width: int) -> bytes:
    return bytes([0x80]) + value.to_bytes(width - 1, "big")


@budget(0.5)
@given(size=st.one_of(st.integers(1 << 20, 1 << 40), st.integers(1 << 40, (1 << 88) - 1)),
       typ=st.sampled_from([b"x", b"g", b"L", b"K"]), limit=st.integers(0, 1 << 20))
@counted
def test_huge_extended_header_refused_before_reading(size, typ, limit):
    """A PAX or GNU long-name header announcing more than the limit is
    refused on its header block, before anything of that size is read (the
    stream ends right after it)."""
    block = header_block(b"././@LongLink", typ, _gnu_base256(size, 12), b"")
    error = check_unpack([(block, MEDIA["tar"])], Limits(max_extended_header=limit))
    assert error is not None
    if size > limit:
        assert "max_extended_header" in str(error), error


@budget(0.5)
@given(size=st.integers(33 * GiB, (1 << 88) - 1), typ=st.sampled_from([b"0", b"\0", b"7"]))
@counted
def test_huge_file_refused_before_writing(size, typ):
    block = header_block(b"big", typ, _gnu_base256(size, 12), b"")
    error = check_unpack([(block + bytes(1024), MEDIA["tar"])])
    assert error is not None and "max_bytes" in str(error), error
