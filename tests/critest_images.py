"""The images critest (cri-tools v1.29.0) needs, built from Debian packages.

critest pulls images by fixed names (`registry.k8s.io/e2e-test-images/...`,
`gcr.io/k8s-staging-cri-tools/...`). We build look-alikes with `umoci`,
push them with `skopeo` to Debian's `docker-registry` on 127.0.0.1, and
write a `registries.toml` that mirrors `registry.k8s.io` and `gcr.io` to
it, so critest runs with its own image names and no network
(`HYPERRUN_REGISTRIES=<that file>`). What each image must hold is in
`/root/.cache/hyperrun/tools/critest-images.md`; in short:

- `registry.k8s.io/e2e-test-images/busybox:1.29-2`: Debian's *dynamic*
  `busybox` (not busybox-static, whose sh runs applets built-in and breaks
  the masked-paths test) with its shared libraries, every applet a *hard
  link* in /bin, small `pgrep` and `ipcs` scripts (Debian's busybox has
  neither), /etc/passwd and /etc/group as upstream busybox has them.
- `gcr.io/k8s-staging-cri-tools/test-image-*`: that busybox plus a marker
  file (distinct images), a `User`, or a passwd/group with predefined
  groups, under the tags the Image Manager and security-context tests use.

- `nginx:1.14-2`, `httpd:2.4.39-4`: look-alikes that run busybox's httpd
  on port 80 under the upstream commands (`nginx -g 'daemon off;'`,
  `httpd-foreground`, which logs Apache's start-up line): enough for the
  networking, port-forward and multi-container tests, which check for an
  HTTP 200 and that line; not for the security-context PID tests, which
  need the real nginx's process titles.

Not built yet: nonewprivs (a setuid binary), hostnet-nginx (its test needs
a host-network pod, which a VM cannot be), and `test-image-digest` (its
upstream sha256 cannot be rebuilt: skip "public image with digest").

Use from pytest:

    from tests.critest_images import critest_images  # noqa: F401

    def test_x(critest_images): ...   # .registry, .registries_toml, .digests

or by hand (prints the registry address and the registries.toml path, then
keeps the registry running until killed):

    python -m tests.critest_images OUTDIR

Debian packages: docker-registry skopeo umoci dpkg (dpkg-deb), and the
`busybox` .deb (fetched with `apt-get download busybox` when no copy is
found in the cache or /var/cache/apt/archives; it is only unpacked, not
installed, so it does not conflict with busybox-static).
"""
from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from hyperrun.sample_images import Layout, Registry, run, start_registry

PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
TOOLS = {"docker-registry": "docker-registry", "skopeo": "skopeo", "umoci": "umoci",
         "dpkg-deb": "dpkg"}

BUSYBOX_IMAGE = "registry.k8s.io/e2e-test-images/busybox:1.29-2"
CRI_TOOLS = "gcr.io/k8s-staging-cri-tools/"
MIRRORED = ("registry.k8s.io", "gcr.io")

# Upstream busybox:1.29's /etc/passwd and /etc/group.
PASSWD = """\
root:x:0:0:root:/root:/bin/sh
daemon:x:1:1:daemon:/usr/sbin:/bin/false
bin:x:2:2:bin:/bin:/bin/false
sys:x:3:3:sys:/dev:/bin/false
sync:x:4:100:sync:/bin:/bin/sync
mail:x:8:8:mail:/var/spool/mail:/bin/false
www-data:x:33:33:www-data:/var/www:/bin/false
operator:x:37:37:Operator:/var:/bin/false
nobody:x:65534:65534:nobody:/home:/bin/false
"""
GROUP = """\
root:x:0:
daemon:x:1:
bin:x:2:
sys:x:3:
adm:x:4:
tty:x:5:
disk:x:6:
lp:x:7:
mail:x:8:
kmem:x:9:
wheel:x:10:root
cdrom:x:11:
dialout:x:18:
floppy:x:19:
video:x:28:
audio:x:29:
tape:x:32:
www-data:x:33:
operator:x:37:
utmp:x:43:
plugdev:x:46:
staff:x:50:
lock:x:54:
netdev:x:82:
users:x:100:
nogroup:x:65534:
"""

# `pgrep NAME`: the pids whose comm is NAME, nothing on stderr; rc 1 if none.
PGREP = r"""#!/bin/sh
# pgrep NAME (Debian's busybox has no pgrep): pids whose /proc/PID/comm is NAME.
[ $# -ge 1 ] || { echo "usage: pgrep NAME" >&2; exit 2; }
name="$1"; found=1
for d in /proc/[0-9]*; do
    comm=$(cat "$d/comm" 2>/dev/null) || continue
    if [ "$comm" = "$name" ]; then echo "${d#/proc/}"; found=0; fi
done
exit $found
"""

# `ipcs -m`: shared memory segments, shmid in the 2nd column (as util-linux).
IPCS = r"""#!/bin/sh
# ipcs [-m] (Debian's busybox has no ipcs): System V shared memory segments.
echo
echo "------ Shared Memory Segments --------"
echo "key        shmid      owner      perms      bytes      nattch     status"
[ -r /proc/sysvipc/shm ] || exit 0
tail -n +2 /proc/sysvipc/shm | while read key shmid perms size cpid lpid nattch uid rest; do
    printf '0x%08x %-10s %-10s %-10s %-10s %-10s\n' "$key" "$shmid" "$uid" "$perms" "$size" "$nattch"
done
echo
"""

# name (as critest uses it, with its tag) -> how to derive it from the busybox base:
# ("marker", path) adds an empty file; ("user", USER) sets config User;
# ("predefined-group",) adds default-user 1000 and group 50000, USER 1000.
DERIVED: dict[str, tuple] = {
    CRI_TOOLS + "test-image-user-uid:latest": ("user", "1002"),
    CRI_TOOLS + "test-image-user-username:latest": ("user", "www-data"),
    CRI_TOOLS + "test-image-user-uid-group:latest": ("user", "1003:1004"),
    CRI_TOOLS + "test-image-user-username-group:latest": ("user", "www-data:1004"),
    CRI_TOOLS + "test-image-predefined-group:latest": ("predefined-group",),
    CRI_TOOLS + "test-image-tag:test": ("marker", "test"),
    CRI_TOOLS + "test-image-tag:all": ("marker", "all"),
    CRI_TOOLS + "test-image-latest:latest": ("marker", "test-image-latest"),
    CRI_TOOLS + "test-image-1:latest": ("marker", "test-image-1"),
    CRI_TOOLS + "test-image-2:latest": ("marker", "test-image-2"),
    CRI_TOOLS + "test-image-3:latest": ("marker", "test-image-3"),
    # one image under three tags
    CRI_TOOLS + "test-image-tags:1": ("marker", "same-image"),
}
# Web servers the networking, port-forward and multi-container tests reach
# on port 80 (they check for HTTP 200, and httpd's start-up line in its log):
# look-alikes that run busybox's httpd under the upstream images' commands.
# Not for the security-context PID tests, which need the real nginx's
# process titles.
NGINX = """#!/bin/sh
# nginx look-alike: `nginx -g 'daemon off;'` serves /usr/share/nginx/html on :80.
mkdir -p /var/run && echo $$ > /var/run/nginx.pid
exec httpd -f -p 80 -h /usr/share/nginx/html
"""
HTTPD_FOREGROUND = """#!/bin/sh
# httpd look-alike: Apache's start-up line, then busybox httpd on :80.
echo "[mpm_event:notice] AH00094: Command line: 'httpd -D FOREGROUND'" >&2
exec httpd -f -p 80 -h /usr/local/apache2/htdocs
"""
DERIVED.update({
    "registry.k8s.io/e2e-test-images/nginx:1.14-2":
        ("server", "usr/sbin/nginx", NGINX, "usr/share/nginx/html", ["nginx", "-g", "daemon off;"]),
    "registry.k8s.io/e2e-test-images/httpd:2.4.39-4":
        ("server", "usr/local/bin/httpd-foreground", HTTPD_FOREGROUND, "usr/local/apache2/htdocs",
         ["httpd-foreground"]),
})
SAME_AS = {CRI_TOOLS + "test-image-tags:2": CRI_TOOLS + "test-image-tags:1",
           CRI_TOOLS + "test-image-tags:3": CRI_TOOLS + "test-image-tags:1"}


def missing_tools() -> list[str]:
    return sorted({pkg for tool, pkg in TOOLS.items() if shutil.which(tool) is None})


def _layout_tag(name: str) -> str:
    """An OCI layout tag for an image name (umoci tags: [A-Za-z0-9_.-])."""
    return "".join(c if c.isalnum() or c in "_.-" else "_" for c in name)


def _split(name: str) -> tuple[str, str]:
    """registry.k8s.io/e2e-test-images/busybox:1.29-2 ->
    (registry.k8s.io, e2e-test-images/busybox:1.29-2)."""
    host, _, rest = name.partition("/")
    return host, rest


# ------------------------------------------------------------------ busybox (dynamic)

def busybox_deb(cache: Path) -> Path:
    """Debian's `busybox` .deb: from cache, /var/cache/apt/archives, or apt-get download."""
    for d in (cache, Path("/var/cache/apt/archives")):
        found = sorted(glob.glob(str(d / "busybox_*.deb")))
        if found:
            return Path(found[-1])
    cache.mkdir(parents=True, exist_ok=True)
    out = subprocess.run(["apt-get", "download", "busybox"], cwd=cache,
                         capture_output=True, text=True, check=False)
    found = sorted(glob.glob(str(cache / "busybox_*.deb")))
    if not found:
        raise RuntimeError(f"cannot get Debian's busybox .deb (apt-get download busybox):\n"
                           f"{out.stderr}{out.stdout}")
    return Path(found[-1])


def busybox_binary(cache: Path) -> Path:
    """The dynamic /bin/busybox from Debian's busybox package, unpacked under cache."""
    deb = busybox_deb(cache)
    dest = cache / ("unpacked-" + deb.stem)
    binary = dest / "bin" / "busybox"
    if not binary.exists():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cache, prefix=".unpack-"))
        run("dpkg-deb", "-x", deb, tmp)
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
    return binary


def _shared_libs(binary: Path) -> list[str]:
    """Absolute paths of the libraries binary loads (ldd), interpreter included."""
    out = run("ldd", binary).stdout
    libs = []
    for line in out.splitlines():
        line = line.strip()
        if "=>" in line:
            target = line.split("=>", 1)[1].strip().split(" ")[0]
            if target.startswith("/"):
                libs.append(target)
        elif line.startswith("/"):
            libs.append(line.split(" ")[0])
    return libs


def _busybox_rootfs(root: Path, binary: Path) -> None:
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "etc", "root", "home", "tmp", "var/www",
              "var/spool/mail", "proc", "sys", "dev"):
        (root / d).mkdir(parents=True, exist_ok=True)
    os.chmod(root / "tmp", 0o1777)
    os.chmod(root / "root", 0o700)
    for lib in _shared_libs(binary):
        dst = root / lib.lstrip("/")
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(os.path.realpath(lib), dst)        # the file itself, under the asked name
    bb = root / "bin" / "busybox"
    shutil.copy(binary, bb)
    os.chmod(bb, 0o755)
    applets = run(binary, "--list").stdout.split()
    for applet in applets:
        link = root / "bin" / applet
        if applet != "busybox" and not link.exists():
            os.link(bb, link)                          # hard links, as upstream
    for name, text in (("pgrep", PGREP), ("ipcs", IPCS)):
        (root / "bin" / name).write_text(text)
        os.chmod(root / "bin" / name, 0o755)
    (root / "etc/passwd").write_text(PASSWD)
    (root / "etc/group").write_text(GROUP)
    (root / "etc/hostname").write_text("busybox\n")


def build_busybox(layout: Layout, tag: str, work: Path, binary: Path) -> str:
    layout.umoci("new", "--image", layout.image(tag))
    layout.edit(tag, work, lambda root: _busybox_rootfs(root, binary))
    layout.umoci("config", "--image", layout.image(tag), "--os", "linux",
                 "--architecture", "amd64", "--config.cmd", "sh",
                 "--config.env", PATH_ENV, "--no-history")
    return layout.digest(tag)


def _derive(layout: Layout, base: str, tag: str, work: Path, how: tuple) -> None:
    kind = how[0]
    if kind == "marker":
        def change(root: Path) -> None:
            (root / how[1]).write_text("")
        layout.edit(base, work, change, new_tag=tag)
    elif kind == "server":
        _, script, text, docroot, cmd = how

        def change(root: Path) -> None:
            (root / script).parent.mkdir(parents=True, exist_ok=True)
            (root / script).write_text(text)
            os.chmod(root / script, 0o755)
            (root / docroot).mkdir(parents=True, exist_ok=True)
            (root / docroot / "index.html").write_text("<h1>It works!</h1>\n")
        layout.edit(base, work, change, new_tag=tag)
        args = ["config", "--image", layout.image(tag), "--clear=config.cmd", "--no-history"]
        for word in cmd:
            args += ["--config.cmd", word]
        layout.umoci(*args)
    elif kind == "user":
        layout.umoci("config", "--image", layout.image(base), "--tag", tag,
                     "--config.user", how[1], "--no-history")
    elif kind == "predefined-group":
        def change(root: Path) -> None:
            with open(root / "etc/passwd", "a") as f:
                f.write("default-user:x:1000:1000:Linux User,,,:/home/default-user:/bin/sh\n")
            with open(root / "etc/group", "a") as f:
                f.write("default-user:x:1000:\ngroup-defined-in-image:x:50000:default-user\n")
            home = root / "home/default-user"
            home.mkdir(parents=True, exist_ok=True)
            os.chown(home, 1000, 1000)
        layout.edit(base, work, change, new_tag=tag)
        layout.umoci("config", "--image", layout.image(tag), "--config.user", "1000",
                     "--no-history")
    else:
        raise ValueError(how)


def build_images(directory: Path, cache: Path | None = None) -> tuple[Layout, dict[str, str]]:
    """Build every image into one OCI layout under directory.
    Returns the layout and {critest image name: layout tag}."""
    d = Path(directory)
    work = d / "work"
    work.mkdir(parents=True, exist_ok=True)
    cache = Path(cache) if cache else d / "cache"
    binary = busybox_binary(cache)
    layout = Layout(d / "oci")
    tags = {BUSYBOX_IMAGE: _layout_tag(BUSYBOX_IMAGE)}
    build_busybox(layout, tags[BUSYBOX_IMAGE], work, binary)
    for name, how in DERIVED.items():
        tags[name] = _layout_tag(name)
        _derive(layout, tags[BUSYBOX_IMAGE], tags[name], work, how)
    for name, same in SAME_AS.items():
        tags[name] = tags[same]
    shutil.rmtree(work, ignore_errors=True)
    return layout, tags


# ------------------------------------------------------------------ registry

@dataclass
class CritestImages:
    registry: Registry
    registries_toml: Path
    digests: dict[str, str] = field(default_factory=dict)  # critest name -> manifest digest

    def stop(self) -> None:
        self.registry.stop()


def write_registries_toml(path: Path, registry: Registry) -> Path:
    path = Path(path)
    path.write_text("".join(f'[[registry]]\nprefix = "{host}"\nmirrors = ["{registry.url}"]\n\n'
                            for host in MIRRORED))
    return path


def serve(directory: Path, cache: Path | None = None) -> CritestImages:
    """Build the images, start a registry with them, write registries.toml."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    layout, tags = build_images(d / "images", cache)
    reg = start_registry(d / "registry")
    try:
        digests = {}
        for name, tag in tags.items():
            _, repo_ref = _split(name)
            digests[name] = reg.push(layout.path, tag, repo_ref)
        toml = write_registries_toml(d / "registries.toml", reg)
    except BaseException:
        reg.stop()
        raise
    return CritestImages(reg, toml, digests)


def _default_cache() -> Path:
    try:
        from hyperrun.paths import cache_root
        return cache_root() / "test" / "critest-images"
    except Exception:  # noqa: BLE001 - outside the venv: a private cache
        return Path(tempfile.gettempdir()) / "hyperrun-critest-images-cache"


@pytest.fixture(scope="session")
def critest_images(tmp_path_factory):
    """critest's images in a loopback registry; .registries_toml mirrors
    registry.k8s.io and gcr.io to it (set HYPERRUN_REGISTRIES to it)."""
    missing = missing_tools()
    if missing:
        pytest.skip(f"needs Debian packages: apt-get install {' '.join(missing)}")
    try:
        images = serve(tmp_path_factory.mktemp("critest-images"), _default_cache())
    except RuntimeError as e:
        if "busybox .deb" in str(e):
            pytest.skip(str(e))
        raise
    yield images
    images.stop()


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m tests.critest_images OUTDIR", file=sys.stderr)
        return 2
    missing = missing_tools()
    if missing:
        print(f"needs Debian packages: apt-get install {' '.join(missing)}", file=sys.stderr)
        return 1
    images = serve(Path(argv[0]).absolute(), _default_cache())

    def stop(signum, frame):
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        print(f"registry {images.registry.host}")
        print(f"registries.toml {images.registries_toml}")
        for name, digest in images.digests.items():
            print(f"  {name} {digest}")
        sys.stdout.flush()
        # Poll rather than wait(): a signal arriving inside Popen.wait() would
        # leave its lock held for the stop() below.
        while images.registry.proc.poll() is None:
            time.sleep(0.5)
    finally:
        images.stop()
    print(f"docker-registry exited ({images.registry.proc.returncode}); "
          f"log: {images.registry.log}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
