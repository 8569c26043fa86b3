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
  neither), /etc/passwd and /etc/group as upstream busybox has them
  (`nobody` 65534, which RunAsUserName asks for, `www-data`, `nogroup`).
- `gcr.io/k8s-staging-cri-tools/test-image-*`: that busybox plus a marker
  file (distinct images), a `User`, or a passwd/group with predefined
  groups, under the tags the Image Manager and security-context tests use.

- `registry.k8s.io/e2e-test-images/nginx:1.14-2`: that busybox plus Debian's
  real nginx (`/usr/sbin/nginx` from the `nginx` .deb, its shared
  libraries from the `libpcre2-8-0`, `libssl3`, `zlib1g`, `libcrypt1`
  .debs, libc from the host as for busybox), a minimal
  /etc/nginx/nginx.conf (`user www-data`, one worker, port 80, error log
  to stderr, no access log, no modules, pid file /var/run/nginx.pid) and
  an index page, run as upstream: `nginx -g 'daemon off;'`, whose master
  process is titled `nginx: master process nginx -g daemon off;`. Enough
  for the networking, port-forward and multi-container tests (HTTP 200)
  and the security-context PID tests (the pid file, `pidof nginx`, the
  master's title in /proc/1/cmdline).
- `registry.k8s.io/e2e-test-images/httpd:2.4.39-4`: a look-alike that runs
  busybox's httpd on port 80 under the upstream command
  (`httpd-foreground`, which logs Apache's start-up line first): enough
  for the multi-container tests, which check for an HTTP 200 and that line.
- `registry.k8s.io/e2e-test-images/nonewprivs:1.3`: that busybox plus
  `/usr/local/bin/nnp` (Entrypoint), a static program (a few lines of C,
  built with `gcc -static`) that prints `Effective uid: N` (geteuid()),
  installed setuid root (mode 4755, owner 0) as upstream: run as uid 1000
  it prints 0, or 1000 under no_new_privs.

- `gcr.io/k8s-staging-cri-tools/hostnet-nginx-amd64:latest`: the same
  nginx on port 12003, for the host-network port-forward spec (which a VM
  pod cannot pass: built so that containerd's run of it means something).

Not built: `test-image-digest` (its upstream sha256 cannot be rebuilt:
skip "public image with digest").

Use from pytest:

    from tests.critest_images import critest_images  # noqa: F401

    def test_x(critest_images): ...   # .registry, .registries_toml, .digests

or by hand (prints the registry address and the registries.toml path, then
keeps the registry running until killed):

    python -m tests.critest_images OUTDIR

Debian packages: docker-registry skopeo umoci dpkg (dpkg-deb) gcc, and the
.debs of `busybox`, `nginx`, `libpcre2-8-0`, `libssl3`, `zlib1g` and
`libcrypt1` (each taken from the cache or /var/cache/apt/archives, else
fetched into the cache with `apt-get download`; they are only unpacked,
not installed, so busybox's does not conflict with busybox-static). With
the .debs cached the build is offline.
"""
from __future__ import annotations

import glob
import hashlib
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
         "dpkg-deb": "dpkg", "gcc": "gcc"}

BUSYBOX_IMAGE = "registry.k8s.io/e2e-test-images/busybox:1.29-2"
CRI_TOOLS = "gcr.io/k8s-staging-cri-tools/"
NGINX_IMAGE = "registry.k8s.io/e2e-test-images/nginx:1.14-2"
# The host-network port-forward spec's image: nginx on 12003 (upstream's
# images/hostnet-nginx), for a pod on the node's network.
HOSTNET_NGINX_IMAGE = "gcr.io/k8s-staging-cri-tools/hostnet-nginx-amd64:latest"
HOSTNET_NGINX_PORT = 12003
NONEWPRIVS_IMAGE = "registry.k8s.io/e2e-test-images/nonewprivs:1.3"
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
# httpd, which the multi-container tests reach on port 80 (they check for
# HTTP 200, and httpd's start-up line in its log): a look-alike that runs
# busybox's httpd under the upstream image's command.
HTTPD_FOREGROUND = """#!/bin/sh
# httpd look-alike: Apache's start-up line, then busybox httpd on :80.
echo "[mpm_event:notice] AH00094: Command line: 'httpd -D FOREGROUND'" >&2
exec httpd -f -p 80 -h /usr/local/apache2/htdocs
"""
DERIVED.update({
    "registry.k8s.io/e2e-test-images/httpd:2.4.39-4":
        ("server", "usr/local/bin/httpd-foreground", HTTPD_FOREGROUND, "usr/local/apache2/htdocs",
         ["httpd-foreground"]),
})

# nginx: Debian's binary and the packages of the libraries it loads (libc,
# as for busybox, comes from the host).
NGINX_PACKAGES = ("nginx", "libpcre2-8-0", "libssl3", "zlib1g", "libcrypt1")
NGINX_CONF = """\
# nginx:1.14-2 look-alike (tests/critest_images.py): Debian's nginx on :80.
user www-data;
worker_processes 1;
pid /var/run/nginx.pid;
error_log stderr warn;

events {
    worker_connections 1024;
}

http {
    types {
        text/html html htm;
        text/plain txt;
    }
    default_type application/octet-stream;
    access_log off;
    keepalive_timeout 65;

    server {
        listen 80;
        server_name localhost;
        root /usr/share/nginx/html;
        index index.html;
    }
}
"""
NGINX_INDEX = """\
<!DOCTYPE html>
<html>
<head><title>Welcome to nginx!</title></head>
<body>
<h1>Welcome to nginx!</h1>
<p>If you see this page, the nginx web server is successfully installed and
working.</p>
</body>
</html>
"""
NGINX_CMD = ["nginx", "-g", "daemon off;"]

# nonewprivs: upstream's nnp prints its effective uid; it is setuid root.
NNP_C = r"""#include <stdio.h>
#include <unistd.h>

/* nonewprivs:1.3 look-alike (tests/critest_images.py), setuid root. */
int main(void)
{
    printf("Effective uid: %d\n", (int)geteuid());
    return 0;
}
"""
NNP = "/usr/local/bin/nnp"

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

def debs(cache: Path, packages: list[str] | tuple[str, ...]) -> list[Path]:
    """Debian's .debs of packages, each from cache or /var/cache/apt/archives;
    the others fetched into cache with one `apt-get download` (kept there, so
    later builds are offline)."""
    def cached(package: str) -> Path | None:
        for d in (cache, Path("/var/cache/apt/archives")):
            found = sorted(glob.glob(str(d / f"{package}_*.deb")))
            if found:
                return Path(found[-1])
        return None

    found = {p: cached(p) for p in packages}
    missing = [p for p, deb in found.items() if deb is None]
    if missing:
        cache.mkdir(parents=True, exist_ok=True)
        out = subprocess.run(["apt-get", "download", *missing], cwd=cache,
                             capture_output=True, text=True, check=False)
        for p in missing:
            found[p] = cached(p)
            if found[p] is None:
                raise RuntimeError(f"cannot get Debian's {p} .deb "
                                   f"(apt-get download {' '.join(missing)}):\n"
                                   f"{out.stderr}{out.stdout}")
    return [found[p] for p in packages]


def busybox_deb(cache: Path) -> Path:
    """Debian's `busybox` .deb: from cache, /var/cache/apt/archives, or apt-get download."""
    return debs(cache, ["busybox"])[0]


def _unpack(cache: Path, packages: list[Path], dest: Path) -> Path:
    """dpkg-deb -x each .deb into dest (under cache), once."""
    if not dest.exists():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cache, prefix=".unpack-"))
        for deb in packages:
            run("dpkg-deb", "-x", deb, tmp)
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
    return dest


def busybox_binary(cache: Path) -> Path:
    """The dynamic /bin/busybox from Debian's busybox package, unpacked under cache."""
    deb = busybox_deb(cache)
    return _unpack(cache, [deb], cache / ("unpacked-" + deb.stem)) / "bin" / "busybox"


def nginx_tree(cache: Path) -> Path:
    """Debian's nginx and the libraries it loads, unpacked under cache
    (usr/sbin/nginx, lib/ and usr/lib/x86_64-linux-gnu/...)."""
    packages = debs(cache, NGINX_PACKAGES)
    key = hashlib.sha256("\n".join(d.name for d in packages).encode()).hexdigest()[:12]
    return _unpack(cache, packages, cache / f"unpacked-{packages[0].stem}-{key}")


def _shared_libs(binary: Path, env: dict[str, str] | None = None) -> list[str]:
    """Absolute paths of the libraries binary loads (ldd), interpreter included."""
    out = run("ldd", binary, env=env).stdout
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


def _nginx_rootfs(root: Path, tree: Path, port: int) -> None:
    """Debian's nginx into a busybox rootfs: the binary, the libraries it
    loads (from the unpacked .debs, else the host's, under the names ldd
    gives), its configuration, directories and index page."""
    libdirs = [str(tree / d) for d in ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu")]
    binary = tree / "usr/sbin/nginx"
    for lib in _shared_libs(binary, {**os.environ, "LD_LIBRARY_PATH": ":".join(libdirs)}):
        path = Path(lib)
        inside = "/" + str(path.relative_to(tree)) if path.is_relative_to(tree) else lib
        dst = root / inside.lstrip("/")
        if not dst.exists():                           # libc & co.: already there for busybox
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(os.path.realpath(path), dst)
    (root / "usr/sbin").mkdir(parents=True, exist_ok=True)
    shutil.copy(binary, root / "usr/sbin/nginx")
    os.chmod(root / "usr/sbin/nginx", 0o755)
    (root / "etc/nginx").mkdir(parents=True, exist_ok=True)
    (root / "etc/nginx/nginx.conf").write_text(NGINX_CONF.replace("listen 80;", f"listen {port};"))
    for d in ("var/lib/nginx/body", "var/lib/nginx/proxy", "var/lib/nginx/fastcgi",
              "var/lib/nginx/uwsgi", "var/lib/nginx/scgi", "var/log/nginx", "run",
              "usr/share/nginx/html"):
        (root / d).mkdir(parents=True, exist_ok=True)
    if not (root / "var/run").exists():
        os.symlink("../run", root / "var/run")         # as Debian's and Alpine's
    (root / "usr/share/nginx/html/index.html").write_text(NGINX_INDEX)


def build_nginx(layout: Layout, base: str, tag: str, work: Path, cache: Path,
                port: int = 80) -> None:
    tree = nginx_tree(cache)
    layout.edit(base, work, lambda root: _nginx_rootfs(root, tree, port), new_tag=tag)
    args = ["config", "--image", layout.image(tag), "--clear=config.cmd",
            "--config.exposedports", f"{port}/tcp", "--config.stopsignal", "SIGTERM",
            "--no-history"]
    for word in NGINX_CMD:
        args += ["--config.cmd", word]
    layout.umoci(*args)


def build_nonewprivs(layout: Layout, base: str, tag: str, work: Path) -> None:
    """nnp, static and setuid root, as the image's entrypoint."""
    src = work / "nnp.c"
    src.write_text(NNP_C)
    binary = work / "nnp"
    run("gcc", "-static", "-O2", "-s", "-o", binary, src)

    def change(root: Path) -> None:
        dst = root / NNP.lstrip("/")
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(binary, dst)
        os.chown(dst, 0, 0)
        os.chmod(dst, 0o4755)
    layout.edit(base, work, change, new_tag=tag)
    layout.umoci("config", "--image", layout.image(tag), "--clear=config.cmd",
                 "--config.entrypoint", NNP, "--no-history")


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
    tags[NGINX_IMAGE] = _layout_tag(NGINX_IMAGE)
    build_nginx(layout, tags[BUSYBOX_IMAGE], tags[NGINX_IMAGE], work, cache)
    tags[HOSTNET_NGINX_IMAGE] = _layout_tag(HOSTNET_NGINX_IMAGE)
    build_nginx(layout, tags[BUSYBOX_IMAGE], tags[HOSTNET_NGINX_IMAGE], work, cache,
                port=HOSTNET_NGINX_PORT)
    tags[NONEWPRIVS_IMAGE] = _layout_tag(NONEWPRIVS_IMAGE)
    build_nonewprivs(layout, tags[BUSYBOX_IMAGE], tags[NONEWPRIVS_IMAGE], work)
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
        if " .deb (apt-get download" in str(e):
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
