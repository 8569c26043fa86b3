"""Where a registry is reached: mirrors, plain HTTP, TLS trust.

Configuration is a TOML file (read with the standard library's tomllib):

    [[registry]]
    prefix = "docker.io"                    # a registry, or registry/repository-prefix
    mirrors = ["http://127.0.0.1:5000", "https://mirror.example.com"]

    [[registry]]
    prefix = "registry.internal:5000"
    insecure = true                         # plain HTTP allowed, TLS not verified
    ca = "/etc/hyperrun/certs/internal.pem" # extra CA to trust (added to the system's)

A mirror is a URL (its scheme says HTTP or HTTPS) or a table
``{ url = "...", insecure = true, ca = "..." }``; a mirror without its own
TLS settings takes them from a ``[[registry]]`` entry whose prefix is the
mirror's host. Mirrors are tried in order, then the registry itself, and a
mirror serves the same repository path as upstream
(docker.io/library/busybox -> http://mirror/v2/library/busybox/...).

The file is $HYPERRUN_REGISTRIES if set; else /etc/hyperrun/registries.toml
if it exists; else <data root>/registries.toml if that exists; else none.

Registries on loopback addresses (127.0.0.0/8, ::1, localhost) need no
configuration for plain HTTP, as in Docker: HTTPS is tried first (verified,
so a local TLS registry still needs its CA) and plain HTTP is used when the
server does not speak TLS.
"""
from __future__ import annotations

import functools
import ipaddress
import os
import ssl
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from hyperrun.image.reference import DOCKER_HUB, Reference
from hyperrun.paths import data_root

ETC_PATH = Path("/etc/hyperrun/registries.toml")
ENV = "HYPERRUN_REGISTRIES"
DOCKER_HUB_HOST = "registry-1.docker.io"


class HostsConfigError(Exception):
    """The registries file is unreadable or wrong; the message names it."""


@dataclass(frozen=True)
class Mirror:
    url: str
    insecure: bool | None = None    # None: as the [[registry]] entry of its host says
    ca: Path | None = None


@dataclass(frozen=True)
class RegistryConfig:
    prefix: str
    mirrors: tuple[Mirror, ...] = ()
    insecure: bool = False
    ca: Path | None = None


@dataclass(frozen=True)
class Endpoint:
    """One server to ask: a mirror, or the registry itself."""
    host: str                      # host[:port] to connect to
    schemes: tuple[str, ...]       # in the order to try: ("https",), ("https", "http"), ("http",)
    verify_tls: bool = True
    ca: Path | None = None
    path: str = ""                 # a mirror's path prefix before /v2/ (usually empty)
    mirror: bool = False

    def url(self, scheme: str, path: str) -> str:
        return f"{scheme}://{self.host}{self.path}{path}"

    def ssl_context(self) -> ssl.SSLContext:
        # Cached (loading the system's CAs takes ~20 ms); a changed CA file is reloaded.
        try:
            stamp = self.ca.stat().st_mtime_ns if self.ca else 0
        except OSError:
            stamp = -1
        return _ssl_context(self.verify_tls, self.ca, stamp, self.host)

    def __str__(self) -> str:
        return f"{'/'.join(self.schemes)}://{self.host}{self.path}"


@functools.lru_cache(maxsize=32)
def _ssl_context(verify_tls: bool, ca: Path | None, _stamp: int, host: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context()   # the system's CAs (Debian: ca-certificates)
    if not verify_tls:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    elif ca is not None:
        try:
            ctx.load_verify_locations(cafile=str(ca))
        except (OSError, ssl.SSLError) as e:
            raise HostsConfigError(f"cannot load CA {ca} for {host}: {e}") from None
    return ctx


def default_ssl_context() -> ssl.SSLContext:
    """The system's trust, verified (cached)."""
    return _ssl_context(True, None, 0, "")


def is_loopback(host: str) -> bool:
    """host is "name", "name:port", "[v6]" or "[v6]:port"."""
    if host.startswith("["):
        name = host[1:host.find("]")] if "]" in host else host[1:]
    else:
        name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    if name.lower() == "localhost" or name.lower().endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name.split("%")[0]).is_loopback
    except ValueError:
        return False


@dataclass
class Hosts:
    registries: list[RegistryConfig] = field(default_factory=list)
    source: Path | None = None

    @classmethod
    def load(cls, path: Path | str | None = None) -> "Hosts":
        """Read the registries file (see the module doc for where it is);
        no file means no mirrors and no insecure registries."""
        if path is None:
            path = default_path()
            if path is None:
                return cls()
        path = Path(path)
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise HostsConfigError(f"registries file {path} does not exist") from None
        except OSError as e:
            raise HostsConfigError(f"cannot read registries file {path}: {e}") from None
        except tomllib.TOMLDecodeError as e:
            raise HostsConfigError(f"{path}: invalid TOML: {e}") from None
        return cls.from_dict(data, source=path)

    @classmethod
    def from_dict(cls, data: dict, source: Path | None = None) -> "Hosts":
        where = str(source) if source else "registries config"
        unknown = set(data) - {"registry"}
        if unknown:
            raise HostsConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
        entries = data.get("registry", [])
        if not isinstance(entries, list):
            raise HostsConfigError(f"{where}: 'registry' must be an array of tables ([[registry]])")
        regs = []
        for i, entry in enumerate(entries):
            regs.append(_registry_config(entry, f"{where}: [[registry]] #{i + 1}", source))
        return cls(regs, source)

    def config_for(self, name: str) -> RegistryConfig | None:
        """The entry with the longest prefix matching name ("registry/repo"
        or just "registry") at a path boundary."""
        best = None
        for reg in self.registries:
            p = reg.prefix
            if name == p or name.startswith(p + "/"):
                if best is None or len(p) > len(best.prefix):
                    best = reg
        return best

    def endpoints(self, ref: Reference) -> list[Endpoint]:
        """The servers to try for ref, in order: its mirrors, then the registry."""
        reg = self.config_for(ref.name)
        out = []
        for m in reg.mirrors if reg else ():
            out.append(self._mirror_endpoint(m))
        out.append(self._registry_endpoint(ref.registry, reg))
        return out

    def _registry_endpoint(self, registry: str, reg: RegistryConfig | None) -> Endpoint:
        host = DOCKER_HUB_HOST if registry == DOCKER_HUB else registry
        insecure = bool(reg and reg.insecure)
        ca = reg.ca if reg else None
        if insecure:
            return Endpoint(host, ("https", "http"), verify_tls=False)
        if is_loopback(host):
            return Endpoint(host, ("https", "http"), ca=ca)
        return Endpoint(host, ("https",), ca=ca)

    def _mirror_endpoint(self, m: Mirror) -> Endpoint:
        parts = urlsplit(m.url if "://" in m.url else f"//{m.url}")
        host = parts.netloc
        own = self.config_for(host)
        own = own if own is not None and own.prefix == host else None
        insecure = m.insecure if m.insecure is not None else bool(own and own.insecure)
        ca = m.ca or (own.ca if own else None)
        path = parts.path.rstrip("/")
        if path.endswith("/v2"):
            path = path[:-3]
        if parts.scheme == "http":
            schemes = ("http",)
        elif parts.scheme == "https":
            schemes = ("https",)
        else:
            schemes = ("https", "http") if insecure or is_loopback(host) else ("https",)
        return Endpoint(host, schemes, verify_tls=not insecure, ca=ca, path=path, mirror=True)


def default_path() -> Path | None:
    if env := os.environ.get(ENV):
        return Path(env)
    for p in (ETC_PATH, data_root() / "registries.toml"):
        if p.exists():
            return p
    return None


def _registry_config(entry, where: str, source: Path | None) -> RegistryConfig:
    if not isinstance(entry, dict):
        raise HostsConfigError(f"{where}: must be a table")
    unknown = set(entry) - {"prefix", "mirrors", "insecure", "ca"}
    if unknown:
        raise HostsConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    prefix = entry.get("prefix")
    if not isinstance(prefix, str) or not prefix or "://" in prefix:
        raise HostsConfigError(f"{where}: 'prefix' must be a registry name like \"docker.io\" "
                               "or \"docker.io/library\" (no scheme)")
    prefix = prefix.rstrip("/")
    if prefix in ("index.docker.io", "registry-1.docker.io"):
        prefix = DOCKER_HUB
    where = f"{where} (prefix {prefix!r})"
    insecure = _bool(entry.get("insecure", False), where, "insecure")
    ca = _ca(entry.get("ca"), where, source)
    mirrors_raw = entry.get("mirrors", [])
    if not isinstance(mirrors_raw, list):
        raise HostsConfigError(f"{where}: 'mirrors' must be a list")
    mirrors = []
    for m in mirrors_raw:
        if isinstance(m, str):
            mirrors.append(Mirror(_url(m, where)))
        elif isinstance(m, dict):
            bad = set(m) - {"url", "insecure", "ca"}
            if bad or "url" not in m:
                raise HostsConfigError(f"{where}: a mirror table has 'url' and optionally "
                                       "'insecure', 'ca'")
            mirrors.append(Mirror(_url(m["url"], where),
                                  _bool(m["insecure"], where, "insecure")
                                  if "insecure" in m else None,
                                  _ca(m.get("ca"), where, source)))
        else:
            raise HostsConfigError(f"{where}: a mirror is a URL string or a table")
    return RegistryConfig(prefix, tuple(mirrors), insecure, ca)


def _bool(v, where: str, key: str) -> bool:
    if not isinstance(v, bool):
        raise HostsConfigError(f"{where}: '{key}' must be true or false")
    return v


def _ca(v, where: str, source: Path | None) -> Path | None:
    if v is None:
        return None
    if not isinstance(v, str) or not v:
        raise HostsConfigError(f"{where}: 'ca' must be a path to a PEM file")
    p = Path(v)
    if not p.is_absolute() and source is not None:
        p = source.parent / p
    if not p.is_file():
        raise HostsConfigError(f"{where}: CA file {p} does not exist")
    return p


def _url(v, where: str) -> str:
    if not isinstance(v, str) or not v:
        raise HostsConfigError(f"{where}: a mirror URL must be a non-empty string")
    parts = urlsplit(v if "://" in v else f"//{v}")
    if parts.scheme not in ("", "http", "https") or not parts.netloc or parts.query:
        raise HostsConfigError(f"{where}: bad mirror URL {v!r} (http://host[:port] or "
                               "https://host[:port])")
    return v
