"""Apply image layers (tar archives, plain or compressed) to a directory,
as containerd and umoci do: in order, with OCI whiteouts, ownership, modes,
devices, hard links, xattrs and mtimes.

Nothing lands outside the destination. Every path is resolved from a
directory fd of `dest`, one component at a time, without following
symlinks (`O_PATH | O_NOFOLLOW | O_DIRECTORY`), and every create, unlink,
link, mknod, chown and utime is an `*at` call relative to the resolved
parent's fd. An entry whose parent path goes through a symlink is refused,
as are `..` components, absolute names, hard links leaving the tree, and
entry types this module does not know. A symlink entry is data: it may point
anywhere, because it is never followed here.

The tar reader is our own (a streaming ustar/GNU/PAX parser): it writes file
data straight from the decompressor's buffers. Decompression (gzip with
ISA-L when `isal` is installed, else zlib; zstd) runs on a second thread and
releases the GIL, as do the writes, so the two overlap.
"""
from __future__ import annotations

import errno
import os
import queue
import shutil
import stat
import threading
import time
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

GiB = 1 << 30
PATH_MAX = 4096   # including the terminating NUL
NAME_MAX = 255
BLOCK = 512
CHUNK = 1 << 20           # compressed bytes read at a time
OUT_CHUNK = 4 << 20       # most decompressed bytes produced per step
QUEUE_DEPTH = 8           # decompressed chunks in flight between the threads
DIR_CACHE = 256           # directory fds kept open
MAX_WARNINGS = 100        # warnings kept in UnpackStats.warnings (the rest counted)

GZIP_MEDIA = {
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
}
ZSTD_MEDIA = {
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
}
TAR_MEDIA = {
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.docker.image.rootfs.diff.tar",
}

WHITEOUT = b".wh."
OPAQUE = b".wh..wh..opq"
WHITEOUT_META = b".wh..wh."   # aufs bookkeeping (.wh..wh.plnk, ...): ignored

_O_DIR = os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC
_O_DIR_RD = os.O_RDONLY | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC
_O_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_ZERO_BLOCK = bytes(BLOCK)
_ID_NONE = (1 << 32) - 1                        # (uid_t)-1: "no change" to chown, not an id
_TIME_MAX_NS = ((1 << 63) - 1) * 1_000_000_000  # seconds must fit a time_t
# errors from setxattr that mean "this filesystem (or we) cannot keep it":
# a counted warning, not a failure
_XATTR_SOFT = {errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM, errno.EACCES, errno.EINVAL,
               errno.E2BIG, errno.ERANGE, errno.ENOSPC, errno.EDQUOT}


@dataclass(frozen=True)
class Layer:
    """One layer blob: the file, its media type, and its digest (for messages)."""
    path: Path
    media_type: str
    digest: str


@dataclass(frozen=True)
class Limits:
    """Bounds on what a set of layers may make the unpacker do."""
    max_bytes: int = 32 * GiB            # file data written, all layers together
    max_entries: int = 2_000_000         # tar entries, all layers together
    max_name_length: int = PATH_MAX - 1  # bytes in one entry's name (or link target)
    max_extended_header: int = 1 << 20   # bytes of PAX / GNU long-name headers of one entry
    max_depth: int = 256                 # components in one entry's name


@dataclass
class UnpackStats:
    entries: int = 0
    bytes: int = 0
    layers: int = 0
    seconds: float = 0.0
    whiteouts: int = 0
    skipped_xattrs: int = 0
    warnings: list[str] = field(default_factory=list)


class UnpackError(Exception):
    """A layer could not be applied (refused, malformed, or over a limit).
    `digest` and `entry` name where; `entry` is None for layer-level errors."""

    def __init__(self, message: str, digest: str = "", entry: str | None = None) -> None:
        super().__init__(message)
        self.digest = digest
        self.entry = entry


def unpack_layers(layers: list[Layer], dest: Path, limits: Limits = Limits()) -> UnpackStats:
    """Apply `layers` in order into `dest`, an (empty) directory the caller
    created; directory mtimes are set last, once every layer is in.

    On any error (UnpackError, or OSError from the filesystem) `dest` is left
    partly unpacked and is the caller's to delete: unpack into a temporary
    directory and rename it into place only on success. Ownership and device
    nodes need root; without it ownership is left as is and devices are
    skipped, with warnings.
    """
    start = time.monotonic()
    stats = UnpackStats()
    with _Unpacker(dest, limits, stats) as unpacker:
        for layer in layers:
            unpacker.apply(layer)
            stats.layers += 1
        unpacker.finish()
    stats.seconds = time.monotonic() - start
    return stats


# ---------------------------------------------------------------------------
# decompression


def _sniff(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(6)
    if head[:2] == b"\x1f\x8b":
        return "gzip"
    if head[:4] == b"\x28\xb5\x2f\xfd":
        return "zstd"
    if head[:6] == b"\xfd7zXZ\x00":
        return "xz"
    if head[:3] == b"BZh":
        return "bzip2"
    return "tar"


def _media_compression(media_type: str) -> str | None:
    base = media_type.split(";", 1)[0].strip()
    if base in GZIP_MEDIA:
        return "gzip"
    if base in ZSTD_MEDIA:
        return "zstd"
    if base in TAR_MEDIA:
        return "tar"
    return None


try:   # ISA-L inflates about twice as fast as zlib; same API
    from isal import isal_zlib as _inflate
except ImportError:  # pragma: no cover
    _inflate = zlib
_INFLATE_ERRORS = (zlib.error, _inflate.error)


def _gzip_chunks(f) -> Iterator[bytes]:
    d = _inflate.decompressobj(31)
    while True:
        data = f.read(CHUNK)
        if not data:
            out = d.flush()   # output still held back by the max_length bound
            if out:
                yield out
            if not d.eof:
                raise _LayerError("compressed stream is truncated")
            return
        while data:
            out = d.decompress(data, OUT_CHUNK)
            if out:
                yield out
            if d.eof:
                rest = d.unused_data
                if rest[:2] != b"\x1f\x8b":   # trailing padding after the last member
                    return
                d = _inflate.decompressobj(31)   # another gzip member follows
                data = rest
            else:
                data = d.unconsumed_tail


def _zstd_chunks(f) -> Iterator[bytes]:
    import zstandard
    reader = zstandard.ZstdDecompressor().stream_reader(f, read_size=CHUNK,
                                                         read_across_frames=True)
    while True:
        out = reader.read(OUT_CHUNK)
        if not out:
            return
        yield out


def _stdlib_chunks(module: str) -> Callable:
    def chunks(f) -> Iterator[bytes]:
        import bz2
        import lzma
        d = lzma.LZMADecompressor() if module == "xz" else bz2.BZ2Decompressor()
        while not d.eof:
            data = b"" if d.needs_input is False else f.read(CHUNK)
            if not data and d.needs_input:
                raise _LayerError("compressed stream is truncated")
            out = d.decompress(data, OUT_CHUNK)
            if out:
                yield out
    return chunks


def _raw_chunks(f) -> Iterator[bytes]:
    while True:
        data = f.read(OUT_CHUNK)
        if not data:
            return
        yield data


class _Source:
    """Uncompressed tar bytes of one layer, produced on a background thread
    (decompression releases the GIL, so it overlaps the writes)."""

    def __init__(self, path: Path, kind: str) -> None:
        gen = {"gzip": _gzip_chunks, "zstd": _zstd_chunks, "tar": _raw_chunks,
               "xz": _stdlib_chunks("xz"), "bzip2": _stdlib_chunks("bzip2")}[kind]
        self._file = open(path, "rb", buffering=0)
        self._gen = gen(self._file)
        self._queue: queue.Queue = queue.Queue(QUEUE_DEPTH)
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._run, name="unpack-decompress", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for chunk in self._gen:
                if self._stop.is_set():
                    return
                while not self._put(chunk):
                    if self._stop.is_set():
                        return
            self._put_final(None)
        except BaseException as e:  # handed to the reading thread
            self._put_final(e)

    def _put(self, item) -> bool:
        try:
            self._queue.put(item, timeout=0.1)
            return True
        except queue.Full:
            return False

    def _put_final(self, item) -> None:
        while not self._put(item):
            if self._stop.is_set():
                return

    def next(self) -> bytes:
        """The next chunk; b"" at the end."""
        if self._done:
            return b""
        item = self._queue.get()
        if item is None:
            self._done = True
            return b""
        if isinstance(item, BaseException):
            self._done = True
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.05)
            except queue.Empty:
                pass
        self._file.close()


class _LayerError(Exception):
    """An error about the layer (or an entry, when `entry` is given); turned
    into UnpackError with the digest attached."""

    def __init__(self, message: str, entry: bytes | None = None) -> None:
        super().__init__(message)
        self.entry = entry


class _Reader:
    """Sequential reads over a _Source's chunks."""

    def __init__(self, source: _Source) -> None:
        self._next = source.next
        self._buf = b""
        self._pos = 0
        self.offset = 0   # bytes consumed

    def _fill(self) -> bool:
        chunk = self._next()
        if not chunk:
            return False
        if self._pos < len(self._buf):
            self._buf = self._buf[self._pos:] + chunk
        else:
            self._buf = chunk
        self._pos = 0
        return True

    def read(self, n: int) -> bytes:
        """Exactly n bytes, or fewer at the end of the stream."""
        while len(self._buf) - self._pos < n:
            if not self._fill():
                break
        out = self._buf[self._pos:self._pos + n]
        self._pos += len(out)
        self.offset += len(out)
        return out

    def write_to(self, fd: int, n: int) -> None:
        """Copy the next n bytes to fd."""
        write = os.write
        while n:
            avail = len(self._buf) - self._pos
            if not avail:
                if not self._fill():
                    raise _LayerError("tar stream ends inside a file")
                avail = len(self._buf)
            take = n if n < avail else avail
            view = memoryview(self._buf)[self._pos:self._pos + take]
            while view:
                view = view[write(fd, view):]
            self._pos += take
            self.offset += take
            n -= take

    def skip(self, n: int) -> None:
        while n:
            avail = len(self._buf) - self._pos
            if not avail:
                if not self._fill():
                    raise _LayerError("tar stream ends inside an entry")
                avail = len(self._buf)
            take = n if n < avail else avail
            self._pos += take
            self.offset += take
            n -= take


# ---------------------------------------------------------------------------
# tar headers


def _num(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:   # GNU base-256
        value = int.from_bytes(field[1:], "big")
        if field[0] == 0xFF:
            value -= 1 << (8 * (len(field) - 1))
        return value
    field = field.split(b"\0", 1)[0].strip()
    try:
        return int(field, 8) if field else 0
    except ValueError:
        raise _LayerError(f"malformed number {field!r} in a tar header") from None


def _cstr(field: bytes) -> bytes:
    i = field.find(b"\0")
    return field if i < 0 else field[:i]


def _pax_time_ns(value: bytes) -> int:
    text = value.decode("ascii")
    neg = text.startswith("-")
    whole, _, frac = text.lstrip("+-").partition(".")
    ns = int(whole or "0") * 1_000_000_000 + int((frac + "000000000")[:9])
    return -ns if neg else ns


def _parse_pax(data: bytes) -> dict[bytes, bytes]:
    records: dict[bytes, bytes] = {}
    pos = 0
    while pos < len(data):
        if data[pos] == 0:   # NUL padding at the end
            break
        space = data.find(b" ", pos)
        if space < 0:
            raise _LayerError("malformed PAX header")
        try:
            length = int(data[pos:space])
        except ValueError:
            raise _LayerError("malformed PAX header") from None
        end = pos + length
        if length <= 0 or end > len(data) or data[end - 1:end] != b"\n":
            raise _LayerError("malformed PAX header")
        key, eq, value = data[space + 1:end - 1].partition(b"=")
        if not eq:
            raise _LayerError("malformed PAX header")
        records[key] = value
        pos = end
    return records


class _Entry:
    __slots__ = ("name", "type", "mode", "uid", "gid", "size", "mtime_ns", "linkname",
                 "devmajor", "devminor", "xattrs")


# ---------------------------------------------------------------------------
# applying entries


def _show(name: bytes) -> str:
    return name.decode("utf-8", "backslashreplace")


class _Unpacker:
    def __init__(self, dest: Path, limits: Limits, stats: UnpackStats) -> None:
        self.limits = limits
        self.stats = stats
        self.root = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.is_root = os.geteuid() == 0
        # rel path (b"a/b") -> fd of that directory, least recently used first
        self.dirs: OrderedDict[bytes, int] = OrderedDict()
        # rel path -> mtime (ns) of directories, applied at the end
        self.dir_mtimes: dict[bytes, int] = {}
        # paths (and their ancestors) this layer put in place
        self.touched: set[bytes] = set()
        self.digest = ""
        self.entry: bytes | None = None
        self.warned = 0

    def __enter__(self) -> _Unpacker:
        return self

    def __exit__(self, *exc) -> None:
        for fd in self.dirs.values():
            os.close(fd)
        self.dirs.clear()
        os.close(self.root)

    # -- messages ----------------------------------------------------------

    def warn(self, message: str) -> None:
        self.warned += 1
        if self.warned <= MAX_WARNINGS:
            self.stats.warnings.append(f"layer {self.digest}: {message}")
        elif self.warned == MAX_WARNINGS + 1:
            self.stats.warnings.append("further warnings not listed")

    def refuse(self, reason: str, entry: bytes | None = None) -> UnpackError:
        entry = self.entry if entry is None else entry
        shown = None if entry is None else _show(entry)
        where = f"layer {self.digest}" + ("" if shown is None else f": entry {shown!r}")
        return UnpackError(f"{where}: {reason}", self.digest, shown)

    # -- per layer ---------------------------------------------------------

    def apply(self, layer: Layer) -> None:
        self.digest = layer.digest
        self.entry = None
        self.touched = set()
        try:
            kind = _sniff(layer.path)
        except OSError as e:
            raise self.refuse(f"cannot read layer blob {layer.path}: {e.strerror}") from e
        labelled = _media_compression(layer.media_type)
        if labelled is not None and labelled != kind:
            self.warn(f"media type {layer.media_type} but the blob is {kind}; reading it as {kind}")
        source = _Source(layer.path, kind)
        try:
            self._read_tar(_Reader(source))
        except _LayerError as e:
            raise self.refuse(str(e), e.entry) from None
        except UnpackError:
            raise
        except _INFLATE_ERRORS as e:
            raise self.refuse(f"corrupt gzip data: {e}") from None
        except OSError as e:
            if self.entry is None:
                raise self.refuse(f"cannot read layer: {e}") from e
            raise self.refuse(f"{e.strerror or e}") from e
        except Exception as e:   # zstd/lzma/bz2 decompression errors have their own types
            if type(e).__module__.split(".")[0] in ("zstandard", "_lzma", "lzma", "_bz2", "bz2"):
                raise self.refuse(f"corrupt compressed data: {e}") from None
            raise
        finally:
            source.close()

    def _read_tar(self, reader: _Reader) -> None:
        limits = self.limits
        stats = self.stats
        global_pax: dict[bytes, bytes] = {}
        pax: dict[bytes, bytes] = {}
        long_name = long_link = None
        pending = 0   # bytes of extended headers read for the coming entry (or globally)
        while True:
            self.entry = None
            at = reader.offset
            hdr = reader.read(BLOCK)
            if len(hdr) < BLOCK:
                if not hdr and at == 0:
                    return   # an empty blob: an empty layer
                raise _LayerError("tar stream ends without its end-of-archive marker"
                                  if not hdr else "tar stream ends inside a header")
            if hdr == _ZERO_BLOCK:
                return   # end of archive; anything after it is ignored
            try:
                chksum = _num(hdr[148:156])
            except _LayerError:
                chksum = -1
            if chksum != sum(hdr) - sum(hdr[148:156]) + 256 and chksum != _signed_sum(hdr):
                raise _LayerError(f"bad tar header checksum at offset {at} (not a tar archive,"
                                  f" or a corrupt one)")
            typ = hdr[156:157]
            size = _num(hdr[124:136])
            if typ in (b"x", b"g", b"L", b"K"):
                pending += size
                if pending > limits.max_extended_header or size < 0:
                    raise _LayerError(f"extended headers of {pending} bytes at offset {at} exceed"
                                      f" the limit max_extended_header "
                                      f"({limits.max_extended_header})")
                data = reader.read(size)
                if len(data) < size:
                    raise _LayerError("tar stream ends inside an extended header")
                reader.skip(-size % BLOCK)
                if typ == b"x":
                    pax.update(_parse_pax(data))
                elif typ == b"g":
                    # a global name, link or size for every entry makes no sense: ignored
                    global_pax.update((k, v) for k, v in _parse_pax(data).items()
                                      if k not in (b"path", b"linkpath", b"size"))
                elif typ == b"L":
                    long_name = data.rstrip(b"\0")
                else:
                    long_link = data.rstrip(b"\0")
                continue

            e = _Entry()
            if long_name is not None:
                name = long_name
            else:
                name = _cstr(hdr[0:100])
                if hdr[257:263] == b"ustar\x00":   # POSIX ustar: a prefix field
                    prefix = _cstr(hdr[345:500])
                    if prefix:
                        name = prefix + b"/" + name
            e.type = typ
            e.mode = _num(hdr[100:108])
            e.uid = _num(hdr[108:116])
            e.gid = _num(hdr[116:124])
            e.size = size
            e.mtime_ns = _num(hdr[136:148]) * 1_000_000_000
            e.linkname = long_link if long_link is not None else _cstr(hdr[157:257])
            e.devmajor = e.devminor = 0
            if typ in (b"3", b"4"):
                e.devmajor = _num(hdr[329:337])
                e.devminor = _num(hdr[337:345])
            e.xattrs = None
            records = {**global_pax, **pax} if global_pax else pax
            if records:
                name = self._apply_pax(e, records, name)
            pax = {}
            long_name = long_link = None
            pending = sum(len(k) + len(v) for k, v in global_pax.items()) if global_pax else 0
            self.entry = name

            stats.entries += 1
            if stats.entries > limits.max_entries:
                raise _LayerError(f"more than {limits.max_entries} entries: over the limit "
                                  f"max_entries", name)
            if e.size < 0:
                raise _LayerError("negative size", name)
            # a hostile header's numbers must fit the syscalls (else an untyped OverflowError)
            if not (0 <= e.uid < _ID_NONE and 0 <= e.gid < _ID_NONE):
                raise _LayerError(f"uid/gid {e.uid}/{e.gid} out of range", name)
            if not (0 <= e.devmajor <= 0xFFF and 0 <= e.devminor <= 0xFFFFF):
                raise _LayerError(f"device {e.devmajor}:{e.devminor} out of range", name)
            if not -_TIME_MAX_NS <= e.mtime_ns <= _TIME_MAX_NS:
                raise _LayerError(f"mtime {e.mtime_ns // 1_000_000_000} out of range", name)
            if e.type in (b"0", b"\0", b"7"):
                if stats.bytes + e.size > limits.max_bytes:
                    raise _LayerError(f"writing {e.size} more bytes would exceed the limit "
                                      f"max_bytes ({limits.max_bytes})", name)
                self._entry(e, name, reader)
                stats.bytes += e.size
                reader.skip(-e.size % BLOCK)
            else:
                self._entry(e, name, None)
                reader.skip(e.size + (-e.size % BLOCK))

    def _apply_pax(self, e: _Entry, records: dict[bytes, bytes], name: bytes) -> bytes:
        for key, value in records.items():
            try:
                if key == b"path":
                    name = value
                elif key == b"linkpath":
                    e.linkname = value
                elif key == b"size":
                    e.size = int(value)
                elif key == b"uid":
                    e.uid = int(value)
                elif key == b"gid":
                    e.gid = int(value)
                elif key == b"mtime":
                    e.mtime_ns = _pax_time_ns(value)
                elif key.startswith(b"SCHILY.xattr."):
                    if e.xattrs is None:
                        e.xattrs = {}
                    e.xattrs[key[13:]] = value
                elif key.startswith(b"LIBARCHIVE.xattr."):
                    import base64
                    import urllib.parse
                    if e.xattrs is None:
                        e.xattrs = {}
                    xname = urllib.parse.unquote_to_bytes(key[17:])
                    e.xattrs[xname] = base64.b64decode(value + b"=" * (-len(value) % 4))
                elif key.startswith(b"GNU.sparse."):
                    raise _LayerError("GNU sparse files are not supported", name)
                elif key in (b"devmajor", b"devminor"):
                    setattr(e, key.decode(), int(value))
            except ValueError:
                raise _LayerError(f"malformed PAX record {_show(key)}", name) from None
        return name

    # -- paths -------------------------------------------------------------

    def _split(self, name: bytes, what: str = "name") -> tuple[bytes, ...]:
        if b"\0" in name:
            raise _LayerError(f"{what} contains a NUL byte")
        if len(name) > self.limits.max_name_length:
            raise _LayerError(f"{what} is {len(name)} bytes long: over the limit "
                              f"max_name_length ({self.limits.max_name_length})")
        if len(name) >= PATH_MAX:
            raise _LayerError(f"{what} is longer than PATH_MAX")
        if name.startswith(b"/"):
            raise _LayerError(f"absolute {what} refused")
        parts = tuple(p for p in name.split(b"/") if p and p != b".")
        if len(parts) > self.limits.max_depth:
            raise _LayerError(f"{what} is {len(parts)} directories deep: over the limit "
                              f"max_depth ({self.limits.max_depth})")
        for p in parts:
            if p == b"..":
                raise _LayerError(f"{what} has a '..' component: refused")
            if len(p) > NAME_MAX:
                raise _LayerError(f"{what} has a component longer than NAME_MAX")
        return parts

    def _dir(self, parts: tuple[bytes, ...], create: bool) -> int | None:
        """fd of the directory at `parts`, walked from dest without following
        symlinks, from the nearest directory whose fd is cached; missing
        directories are made (0755) when `create`, else None. A symlink on
        the way is refused."""
        if not parts:
            return self.root
        dirs = self.dirs
        fd = dirs.get(b"/".join(parts))
        if fd is not None:
            dirs.move_to_end(b"/".join(parts))
            return fd
        i = len(parts) - 1
        fd = self.root
        while i:
            cached = dirs.get(b"/".join(parts[:i]))
            if cached is not None:
                dirs.move_to_end(b"/".join(parts[:i]))
                fd = cached
                break
            i -= 1
        for j in range(i, len(parts)):
            name = parts[j]
            key = b"/".join(parts[:j + 1])
            try:
                child = os.open(name, _O_DIR, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    return None
                os.mkdir(name, 0o755, dir_fd=fd)
                child = self._new_implicit_dir(fd, name, key)
            except NotADirectoryError:
                if stat.S_ISLNK(os.lstat(name, dir_fd=fd).st_mode):
                    raise _LayerError(f"path goes through the symlink {_show(key)!r}: "
                                      f"refused") from None
                if not create:
                    return None
                # a file of a lower layer where this layer has a directory
                os.unlink(name, dir_fd=fd)
                os.mkdir(name, 0o755, dir_fd=fd)
                child = self._new_implicit_dir(fd, name, key)
            self._cache(key, child)   # evicts the oldest, never fd (the newest)
            fd = child
        return fd

    def _new_implicit_dir(self, parent: int, name: bytes, key: bytes) -> int:
        fd = os.open(name, _O_DIR_RD, dir_fd=parent)
        os.fchmod(fd, 0o755)   # whatever the umask
        self._touch(key)
        return fd

    def _cache(self, key: bytes, fd: int) -> None:
        old = self.dirs.pop(key, None)
        if old is not None and old != fd:
            os.close(old)
        self.dirs[key] = fd
        if len(self.dirs) > DIR_CACHE:
            _, victim = self.dirs.popitem(last=False)
            os.close(victim)

    def _forget(self, key: bytes) -> None:
        """A directory at `key` was removed: drop what we know below it."""
        prefix = key + b"/"
        for k in [k for k in self.dirs if k == key or k.startswith(prefix)]:
            os.close(self.dirs.pop(k))
        for k in [k for k in self.dir_mtimes if k == key or k.startswith(prefix)]:
            del self.dir_mtimes[k]

    def _touch(self, key: bytes) -> None:
        touched = self.touched
        while key and key not in touched:
            touched.add(key)
            key = key.rpartition(b"/")[0]

    def _remove(self, parent: int, name: bytes, key: bytes) -> bool:
        """Remove whatever is at name (a directory: its whole tree)."""
        try:
            st = os.lstat(name, dir_fd=parent)
        except FileNotFoundError:
            return False
        if stat.S_ISDIR(st.st_mode):
            self._forget(key)
            shutil.rmtree(name, dir_fd=parent)
        else:
            os.unlink(name, dir_fd=parent)
        return True

    # -- whiteouts ----------------------------------------------------------

    def _hide_lower(self, fd_parent: int, name: bytes, key: bytes) -> None:
        """Remove what lower layers have at key, keeping what this layer put there."""
        if key not in self.touched:
            self._remove(fd_parent, name, key)
            return
        try:
            fd = os.open(name, _O_DIR_RD, dir_fd=fd_parent)
        except (NotADirectoryError, FileNotFoundError):
            return   # this layer's own non-directory: nothing lower is left there
        except OSError as e:
            if e.errno == errno.ELOOP:   # this layer's own symlink
                return
            raise
        try:
            self._clear_lower(fd, key)
        finally:
            os.close(fd)

    def _clear_lower(self, fd: int, key: bytes) -> None:
        """Apply _hide_lower to every child of the directory open at fd (readable)."""
        for child in map(os.fsencode, os.listdir(fd)):
            self._hide_lower(fd, child, key + b"/" + child if key else child)

    def _whiteout(self, parts: tuple[bytes, ...], base: bytes, name: bytes) -> None:
        pkey = b"/".join(parts[:-1])
        if base == OPAQUE:
            # the directory stays (made if missing); what lower layers put in
            # it goes, what this layer adds (before or after this entry) stays
            self.stats.whiteouts += 1
            parent = self._dir(parts[:-1], create=True)
            self._touch(pkey)
            fd = os.open(b".", _O_DIR_RD, dir_fd=parent)
            try:
                self._clear_lower(fd, pkey)
            finally:
                os.close(fd)
        elif base.startswith(WHITEOUT_META):
            self.warn(f"aufs metadata entry {_show(name)!r} ignored")
        else:
            target = base[len(WHITEOUT):]
            if target in (b"", b".", b".."):
                raise _LayerError("malformed whiteout")
            self.stats.whiteouts += 1
            parent = self._dir(parts[:-1], create=False)
            if parent is not None:   # no parent: nothing below to hide
                self._hide_lower(parent, target, pkey + b"/" + target if pkey else target)

    # -- one entry ----------------------------------------------------------

    def _entry(self, e: _Entry, name: bytes, reader: _Reader | None) -> None:
        parts = self._split(name)
        typ = e.type
        if not parts:   # the root directory itself
            if typ != b"5":
                raise _LayerError("a non-directory entry names the root")
            self._set_dir_meta(self.root, b"", e)
            return
        base = parts[-1]
        key = b"/".join(parts)

        if base.startswith(WHITEOUT):
            self._whiteout(parts, base, name)
            return

        if typ in (b"0", b"\0", b"7"):
            parent = self._dir(parts[:-1], create=True)
            self._touch(key)
            self._file(parent, base, key, e, reader)
        elif typ == b"5":
            parent = self._dir(parts[:-1], create=True)
            self._touch(key)
            self._mkdir(parent, base, key, e)
        elif typ == b"2":
            target = e.linkname
            if not target:
                raise _LayerError("symlink with an empty target")
            if b"\0" in target:
                raise _LayerError("symlink target contains a NUL byte")
            if len(target) >= PATH_MAX:
                raise _LayerError("symlink target is longer than PATH_MAX")
            parent = self._dir(parts[:-1], create=True)
            self._touch(key)
            self._replace(parent, base, key)
            os.symlink(target, base, dir_fd=parent)
            self._set_meta_at(parent, base, e, typ)
        elif typ == b"1":
            self._hardlink(parts, key, e)
        elif typ in (b"3", b"4", b"6"):
            parent = self._dir(parts[:-1], create=True)
            self._touch(key)
            self._replace(parent, base, key)
            kind = {b"3": stat.S_IFCHR, b"4": stat.S_IFBLK, b"6": stat.S_IFIFO}[typ]
            try:
                os.mknod(base, kind | 0o600, os.makedev(e.devmajor, e.devminor), dir_fd=parent)
            except PermissionError:
                if self.is_root:
                    raise
                self.warn(f"entry {_show(name)!r}: device node skipped (needs root)")
                return
            self._set_meta_at(parent, base, e, typ)
        else:
            raise _LayerError(f"unsupported tar entry type {typ!r}"
                              + (" (GNU sparse file)" if typ == b"S" else ""))

    def _replace(self, parent: int, name: bytes, key: bytes) -> None:
        self._remove(parent, name, key)

    def _file(self, parent: int, name: bytes, key: bytes, e: _Entry, reader: _Reader) -> None:
        try:
            fd = os.open(name, _O_FILE, 0o600, dir_fd=parent)
        except FileExistsError:
            self._remove(parent, name, key)
            fd = os.open(name, _O_FILE, 0o600, dir_fd=parent)
        try:
            if e.size:
                reader.write_to(fd, e.size)
            if self.is_root:
                os.fchown(fd, e.uid, e.gid)
            os.fchmod(fd, e.mode & 0o7777)
            if e.xattrs:
                self._xattrs(fd, e.xattrs)
            os.utime(fd, ns=(e.mtime_ns, e.mtime_ns))
        finally:
            os.close(fd)

    def _mkdir(self, parent: int, name: bytes, key: bytes, e: _Entry) -> None:
        try:
            os.mkdir(name, 0o700, dir_fd=parent)
        except FileExistsError:
            st = os.lstat(name, dir_fd=parent)
            if not stat.S_ISDIR(st.st_mode):   # a file or symlink becomes a directory
                os.unlink(name, dir_fd=parent)
                os.mkdir(name, 0o700, dir_fd=parent)
        fd = os.open(name, _O_DIR_RD, dir_fd=parent)
        try:
            self._set_dir_meta(fd, key, e)
        except BaseException:
            os.close(fd)
            raise
        self._cache(key, fd)

    def _set_dir_meta(self, fd: int, key: bytes, e: _Entry) -> None:
        if self.is_root:
            os.fchown(fd, e.uid, e.gid)
        os.fchmod(fd, e.mode & 0o7777)
        if e.xattrs:
            self._xattrs(fd, e.xattrs)
        self.dir_mtimes[key] = e.mtime_ns

    def _set_meta_at(self, parent: int, name: bytes, e: _Entry, typ: bytes) -> None:
        """Owner, mode, xattrs, mtime of a symlink, device or FIFO, by name
        relative to its parent's fd, never following a symlink."""
        if self.is_root:
            os.chown(name, e.uid, e.gid, dir_fd=parent, follow_symlinks=False)
        if typ != b"2":
            # chmod has no no-follow form on Linux: go through an O_PATH fd
            fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
            try:
                if not stat.S_ISLNK(os.fstat(fd).st_mode):
                    os.chmod(f"/proc/self/fd/{fd}", e.mode & 0o7777)
            finally:
                os.close(fd)
        if e.xattrs:
            path = os.fsencode(f"/proc/self/fd/{parent}/") + name
            self._xattrs(path, e.xattrs, follow=False)
        os.utime(name, ns=(e.mtime_ns, e.mtime_ns), dir_fd=parent, follow_symlinks=False)

    def _xattrs(self, target, xattrs: dict[bytes, bytes], follow: bool = True) -> None:
        for key, value in xattrs.items():
            if b"\0" in key:  # setxattr would raise an untyped ValueError
                raise _LayerError(f"xattr name {_show(key)!r} contains a NUL byte")
            try:
                if follow:
                    os.setxattr(target, key, value)
                else:
                    os.setxattr(target, key, value, follow_symlinks=False)
            except OSError as err:
                if err.errno not in _XATTR_SOFT:
                    raise
                self.stats.skipped_xattrs += 1
                self.warn(f"entry {_show(self.entry or b'')!r}: xattr {_show(key)} not set: "
                          f"{err.strerror}")

    def _hardlink(self, parts: tuple[bytes, ...], key: bytes, e: _Entry) -> None:
        tparts = self._split(e.linkname, "hard link target")
        if not tparts:
            raise _LayerError("hard link to the root directory")
        tkey = b"/".join(tparts)
        if tkey == key:
            raise _LayerError("hard link to itself")
        tparent = self._dir(tparts[:-1], create=False)
        if tparent is None:
            raise _LayerError(f"hard link target {_show(e.linkname)!r} does not exist")
        tparent = os.dup(tparent)   # stays open while the link's own parent is resolved
        try:
            try:
                st = os.lstat(tparts[-1], dir_fd=tparent)
            except FileNotFoundError:
                raise _LayerError(f"hard link target {_show(e.linkname)!r} does not exist") \
                    from None
            if stat.S_ISDIR(st.st_mode):
                raise _LayerError(f"hard link target {_show(e.linkname)!r} is a directory")
            parent = self._dir(parts[:-1], create=True)
            self._touch(key)
            self._replace(parent, parts[-1], key)
            os.link(tparts[-1], parts[-1], src_dir_fd=tparent, dst_dir_fd=parent,
                    follow_symlinks=False)
        finally:
            os.close(tparent)

    # -- the end -------------------------------------------------------------

    def finish(self) -> None:
        """Directory mtimes, deepest first (creating entries in a directory
        changes its mtime, so these go last)."""
        self.entry = None
        for key in sorted(self.dir_mtimes, key=lambda k: k.count(b"/"), reverse=True):
            ns = self.dir_mtimes[key]
            if not key:
                os.utime(self.root, ns=(ns, ns))
                continue
            parts = tuple(key.split(b"/"))
            try:
                parent = self._dir(parts[:-1], create=False)
            except _LayerError:
                parent = None
            if parent is None:
                continue
            os.utime(parts[-1], ns=(ns, ns), dir_fd=parent, follow_symlinks=False)


def _signed_sum(hdr: bytes) -> int:
    import struct
    signed = struct.unpack("148b8x356b", hdr)
    return sum(signed) + 256
