"""Pulling images from registries (the OCI distribution spec), over httpx.

    result = await pull("busybox", ContentStore(root))

resolves the reference (mirrors first, then the registry; see hosts.py),
fetches and verifies the manifest (and the index it came from, picking the
platform), then the config and the layers into the content store: layers in
parallel, with retries and resume (HTTP Range from what an earlier attempt
left in the store's ingest file). Every manifest and blob is checked
against its digest. Nothing is published in the store until every layer
is downloaded and verified: then the layers, the config, the manifest and
the index are committed, so a failed pull leaves blobs/ as it was (and its
verified layers in ingest/, for a retry to commit without downloading).
See docs/IMAGES.md.

Errors are PullError subclasses with a one-line message naming the
reference; network and HTTP problems never surface as raw tracebacks.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import fcntl
import hashlib
import json
import os
import random
import socket
import ssl
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, TypeVar

import httpx

from hyperrun import errdefs
from hyperrun.image.auth import (Challenge, Credentials, CredentialsError, docker_config_path,
                                 docker_credentials, parse_challenge)
from hyperrun.image.hosts import Endpoint, Hosts, HostsConfigError, default_ssl_context
from hyperrun.image.metadata import ImageRecord, Layer
from hyperrun.image.progress import NullProgress, PullProgress, RichProgress
from hyperrun.image.reference import DOCKER_HUB, InvalidReference, Reference, parse
from hyperrun.image.store import ContentStore, DigestError, StoreError, check_digest, fsync_path

USER_AGENT = "hyperrun/0.1"

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFEST_TYPES = (OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST)
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
ACCEPT = ", ".join(MANIFEST_TYPES)
SCHEMA1_TYPES = ("application/vnd.docker.distribution.manifest.v1+json",
                 "application/vnd.docker.distribution.manifest.v1+prettyjws")
# Content-Type values that say nothing (some registries send them): the
# manifest's own mediaType field, or its shape, decides.
GENERIC_TYPES = ("", "application/json", "application/octet-stream", "text/plain")

CONFIG_TYPES = ("application/vnd.oci.image.config.v1+json",
                "application/vnd.docker.container.image.v1+json")
LAYER_TYPES = (
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
)
MANIFEST_MAX = 4 << 20     # as containerd
CONFIG_MAX = 16 << 20
PARALLEL = 3
RETRIES = 4
TIMEOUT = httpx.Timeout(60.0, connect=15.0)


# ---------------------------------------------------------------- errors

class PullError(errdefs.Unknown):
    """A pull failed; str() is one line naming the reference and the cause."""


class BadReference(PullError):
    pass


class ConfigError(PullError):
    """registries.toml or the credentials cannot be used."""


class RegistryUnreachable(PullError):
    """Connection refused, reset, timed out, DNS, TLS."""


class TLSVerifyError(RegistryUnreachable):
    pass


class UnauthorizedError(PullError):
    pass


class NotFoundError(PullError):
    pass


class RegistryError(PullError):
    """Any other HTTP error status."""


class ManifestError(PullError):
    """A manifest or config that is malformed or not a container image."""


class UnsupportedMediaType(ManifestError):
    pass


class PlatformNotFound(PullError):
    pass


class DigestMismatch(PullError):
    pass


class TruncatedBlob(PullError):
    pass


class _Transient(Exception):
    """Worth another attempt (after a pause): wraps the error to raise if not."""

    def __init__(self, error: PullError, delay: float | None = None) -> None:
        super().__init__(str(error))
        self.error = error
        self.delay = delay


# ---------------------------------------------------------------- results, platforms

@dataclass
class PullResult:
    image: ImageRecord           # platform manifest, config, layers, index in extra_blobs
    repo_digest: str             # what the reference resolved to: the index's, else the manifest's
    config: dict[str, Any]       # the parsed image config
    reference: Reference         # normalized, as asked for
    source: str = ""             # the server that answered (a mirror or the registry)
    downloaded: int = 0          # bytes fetched for blobs in this pull
    skipped: list[str] = field(default_factory=list)   # blobs already in the store


_ARCH_ALIASES = {"x86_64": "amd64", "x86-64": "amd64", "aarch64": "arm64", "i386": "386",
                 "i686": "386", "x86": "386", "armhf": "arm", "armel": "arm"}


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str = ""

    @classmethod
    def parse(cls, text: str) -> "Platform":
        parts = text.strip().lower().split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise BadReference(f"invalid platform {text!r}: expected os/arch[/variant], "
                               "e.g. linux/amd64 or linux/arm64/v8")
        return cls.of(parts[0], parts[1], parts[2] if len(parts) == 3 else "")

    @classmethod
    def of(cls, os_: str, arch: str, variant: str = "") -> "Platform":
        os_, arch, variant = os_ or "", arch or "", variant or ""
        for v in (os_, arch, variant):
            if not isinstance(v, str):  # from a registry's JSON: a typed error, not AttributeError
                raise ManifestError(f"platform field {type(v).__name__} is not a string")
            if "/" in v:  # written as os/arch/variant: a field with a / reads back as another
                raise ManifestError(f"platform field {v[:80]!r} has a '/'")
        os_, arch, variant = os_.lower(), arch.lower(), variant.lower()
        if arch in ("armhf",) and not variant:
            variant = "v7"
        if arch in ("armel",) and not variant:
            variant = "v6"
        arch = _ARCH_ALIASES.get(arch, arch)
        if arch == "arm64" and variant == "v8":
            variant = ""     # arm64 and arm64/v8 are the same platform
        return cls(os_, arch, variant)

    def matches(self, other: "Platform") -> bool:
        """self is what was asked for; a request without variant takes any."""
        if (self.os, self.architecture) != (other.os, other.architecture):
            return False
        return not self.variant or self.variant == other.variant

    def __str__(self) -> str:
        return f"{self.os}/{self.architecture}" + (f"/{self.variant}" if self.variant else "")


# ---------------------------------------------------------------- progress

def _progress_for(progress) -> PullProgress:
    if progress is None:
        return RichProgress() if sys.stderr.isatty() else NullProgress()
    if progress is False:
        return NullProgress()
    if progress is True:
        return RichProgress()
    return progress


# ---------------------------------------------------------------- one server

class _Endpoint:
    """One endpoint (a mirror or the registry): its HTTP client, the scheme
    that worked, and its auth state (challenge, bearer tokens per scope)."""

    def __init__(self, endpoint: Endpoint, ref: Reference,
                 credentials: Callable[[], Credentials | None], creds_where: str) -> None:
        self.endpoint = endpoint
        self.ref = ref
        self.scheme = endpoint.schemes[0] if len(endpoint.schemes) == 1 else None
        self._scheme_lock = asyncio.Lock()
        try:
            ctx = endpoint.ssl_context()
        except HostsConfigError as e:
            raise ConfigError(str(e)) from None
        self.client = httpx.AsyncClient(
            verify=ctx, timeout=TIMEOUT, follow_redirects=True,
            headers={"User-Agent": USER_AGENT},
            limits=httpx.Limits(max_connections=16, max_keepalive_connections=16))
        self._other_client: httpx.AsyncClient | None = None
        self._credentials_fn = credentials
        self._creds_where = creds_where
        self._creds: Credentials | None = None
        self._creds_loaded = False
        self._challenge: Challenge | None = None
        self._tokens: dict[str, tuple[str, float]] = {}
        self._token_lock = asyncio.Lock()

    @property
    def name(self) -> str:
        return str(self.endpoint.host) + self.endpoint.path

    async def aclose(self) -> None:
        await self.client.aclose()
        if self._other_client is not None:
            await self._other_client.aclose()

    # -- credentials and tokens

    async def credentials(self) -> Credentials | None:
        if not self._creds_loaded:
            try:
                self._creds = await asyncio.to_thread(self._credentials_fn)
            except CredentialsError as e:
                raise ConfigError(f"{self.ref}: {e}") from None
            self._creds_loaded = True
        return self._creds

    async def _auth_header(self, scope: str) -> dict[str, str]:
        ch = self._challenge
        if ch is None:
            return {}
        creds = await self.credentials()
        if ch.scheme == "basic":
            return {"Authorization": creds.basic()} if creds and creds.username else {}
        if creds and creds.registry_token:
            return {"Authorization": f"Bearer {creds.registry_token}"}
        async with self._token_lock:
            token = self._tokens.get(scope)
            if token is None or token[1] < time.monotonic():
                token = await self._fetch_token(ch, scope)
                self._tokens[scope] = token
        return {"Authorization": f"Bearer {token[0]}"}

    async def _fetch_token(self, ch: Challenge, scope: str) -> tuple[str, float]:
        realm = ch.realm
        if not realm.startswith(("http://", "https://")):
            raise UnauthorizedError(f"{self.ref}: unauthorized: {self.name} asks for a bearer "
                                    f"token without a usable realm ({realm!r})")
        creds = await self.credentials()
        params = {k: v for k, v in (("service", ch.params.get("service")), ("scope", scope)) if v}
        client = self._client_for(realm)
        try:
            if creds and creds.identity_token:
                resp = await client.post(realm, data={
                    **params, "grant_type": "refresh_token", "client_id": "hyperrun",
                    "refresh_token": creds.identity_token})
            else:
                headers = {"Authorization": creds.basic()} if creds and creds.username else {}
                resp = await client.get(realm, params=params, headers=headers)
        except httpx.HTTPError as e:
            raise RegistryUnreachable(f"{self.ref}: cannot get a token from {realm}: "
                                      f"{_describe(e)}") from None
        if resp.status_code in (401, 403):
            raise UnauthorizedError(
                f"{self.ref}: unauthorized: the token server {realm} refused "
                + ("the credentials" if creds else "an anonymous token")
                + f" ({self._creds_where})")
        if resp.status_code != 200:
            raise RegistryError(f"{self.ref}: token server {realm} answered HTTP "
                                f"{resp.status_code}{_error_detail(resp)}")
        try:
            data = resp.json()
            token = data.get("token") or data.get("access_token")
            expires = float(data.get("expires_in") or 60)
        except (ValueError, AttributeError, TypeError):
            token = None
        if not token or not isinstance(token, str):
            raise RegistryError(f"{self.ref}: token server {realm} sent no token")
        # Renew a little early; a 401 renews anyway.
        return token, time.monotonic() + max(expires - 10, 5)

    def _client_for(self, url: str) -> httpx.AsyncClient:
        host = httpx.URL(url).netloc.decode()
        if host == self.endpoint.host:
            return self.client
        if self._other_client is None:
            self._other_client = httpx.AsyncClient(
                timeout=TIMEOUT, follow_redirects=True, headers={"User-Agent": USER_AGENT},
                verify=default_ssl_context())
        return self._other_client

    # -- requests

    async def send(self, method: str, path: str, headers: dict[str, str],
                   scope: str) -> httpx.Response:
        """A streamed response (the caller closes it). 401 is answered once
        (challenge, credentials, token) and then raised; transport errors
        are raised as _Transient, TLS verification failures as TLSVerifyError."""
        resp = await self._send_auth(method, path, headers, scope)
        if resp.status_code != 401:
            return resp
        ch = parse_challenge(resp.headers.get("www-authenticate"))
        await resp.aclose()
        if ch is None or ch.scheme not in ("basic", "bearer"):
            raise UnauthorizedError(f"{self.ref}: unauthorized: {self.name} asks for "
                                    f"authentication it does not describe")
        creds = await self.credentials()
        if ch.scheme == "basic" and not (creds and creds.username):
            raise self._unauthorized(creds)
        self._challenge = ch
        if ch.scheme == "bearer" and not (creds and creds.registry_token):
            async with self._token_lock:
                wanted = ch.params.get("scope") or scope
                token = await self._fetch_token(ch, wanted)
                self._tokens[scope] = self._tokens[wanted] = token
        resp = await self._send_auth(method, path, headers, scope)
        if resp.status_code == 401:
            await resp.aclose()
            raise self._unauthorized(creds)
        return resp

    def _unauthorized(self, creds: Credentials | None) -> UnauthorizedError:
        if creds:
            return UnauthorizedError(f"{self.ref}: unauthorized: {self.name} refused the "
                                     f"credentials ({self._creds_where})")
        return UnauthorizedError(f"{self.ref}: unauthorized: {self.name} requires "
                                 f"authentication and no credentials were found "
                                 f"({self._creds_where})")

    async def _send_auth(self, method, path, headers, scope) -> httpx.Response:
        hdrs = {**headers, **await self._auth_header(scope)}
        if self.scheme is not None:
            return await self._send_raw(self.scheme, method, path, hdrs)
        async with self._scheme_lock:
            if self.scheme is not None:
                return await self._send_raw(self.scheme, method, path, hdrs)
            # Loopback or insecure: HTTPS first, plain HTTP when it does not speak TLS.
            for i, scheme in enumerate(self.endpoint.schemes):
                try:
                    resp = await self._send_raw(scheme, method, path, hdrs)
                except _Transient:
                    if i == len(self.endpoint.schemes) - 1:
                        raise
                    continue
                self.scheme = scheme
                return resp
        raise AssertionError("unreachable")

    async def _send_raw(self, scheme, method, path, headers) -> httpx.Response:
        url = self.endpoint.url(scheme, path)
        try:
            req = self.client.build_request(method, url, headers=headers)
            return await self.client.send(req, stream=True)
        except httpx.HTTPError as e:
            if _cert_error(e):
                raise TLSVerifyError(
                    f"{self.ref}: TLS certificate of {self.endpoint.host} not trusted "
                    f"({_cert_error(e)}); give its CA with ca = \"...\" in the registries "
                    "file, or insecure = true") from None
            raise _Transient(RegistryUnreachable(
                f"{self.ref}: cannot reach {self.endpoint.host}: {_describe(e)}")) from None


def _cert_error(e: BaseException) -> str | None:
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, ssl.SSLCertVerificationError):
            return e.verify_message or str(e)
        if "CERTIFICATE_VERIFY_FAILED" in str(e):
            return "certificate verify failed"
        e = e.__cause__ or e.__context__
    return None


def _describe(e: BaseException) -> str:
    """A short cause: the OS error underneath if there is one ("Connection
    refused"), else the exception's own text."""
    seen, cause = set(), e
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, OSError) and not isinstance(cause, ssl.SSLError):
            if isinstance(cause, socket.gaierror):
                return f"name resolution failed ({cause.strerror})"
            if cause.errno and cause.errno > 0:
                return os.strerror(cause.errno)
            if cause.strerror:
                return cause.strerror
        cause = cause.__cause__ or cause.__context__
    text = str(e).strip()
    name = type(e).__name__
    return f"{name}: {text}" if text else name


def _error_detail(resp: httpx.Response) -> str:
    """': <message>' from a registry's JSON error body, if it has one."""
    try:
        errors = json.loads(resp.content).get("errors") or []
        e = errors[0]
        msg = e.get("message") or e.get("code") or ""
        return f": {msg}" if msg else ""
    except Exception:
        return ""


# ---------------------------------------------------------------- one pull

T = TypeVar("T")


class _Puller:
    def __init__(self, ref: Reference, endpoints: list[Endpoint], auth: Credentials | None,
                 retries: int, parallel: int, progress: PullProgress) -> None:
        self.ref = ref
        self.retries = retries
        self.parallel = asyncio.Semaphore(max(1, parallel))
        self.progress = progress
        self.scope = f"repository:{ref.repository}:pull"
        self.downloaded = 0
        self.skipped: list[str] = []
        self._restarted: set[str] = set()
        self.sessions: list[_Endpoint] = []
        config_path = docker_config_path()
        for ep in endpoints:
            if not ep.mirror and auth is not None:
                fn, where = (lambda a=auth: a or None), "credentials given with the pull"
            else:
                key = ref.registry if not ep.mirror and ref.registry == DOCKER_HUB else ep.host
                fn = (lambda k=key: docker_credentials(k, config_path))
                where = f"looked for {key} in {config_path}"
            self.sessions.append(_Endpoint(ep, ref, fn, where))

    async def aclose(self) -> None:
        for s in self.sessions:
            await s.aclose()

    # -- retries and endpoint fallback

    async def _retrying(self, op: Callable[[], Awaitable[T]]) -> T:
        delay = 0.5
        for attempt in range(self.retries + 1):
            try:
                return await op()
            except _Transient as t:
                if attempt == self.retries:
                    raise t.error from None
                pause = t.delay if t.delay is not None else delay * (1 + random.random() / 4)
                await asyncio.sleep(min(pause, 30))
                delay = min(delay * 2, 8)
        raise AssertionError("unreachable")

    async def _each_session(self, prefer: _Endpoint | None,
                            op: Callable[[_Endpoint], Awaitable[T]]) -> T:
        """Try op on each server in turn (prefer first, then mirrors in order,
        then the registry); errors that another server may not have fall through."""
        order = self.sessions if prefer is None else [prefer] + [
            s for s in self.sessions if s is not prefer]
        failed: list[str] = []
        for i, s in enumerate(order):
            try:
                return await self._retrying(lambda: op(s))
            except (NotFoundError, UnauthorizedError, RegistryUnreachable, RegistryError,
                    ConfigError) as e:
                if isinstance(e, TLSVerifyError) and not s.endpoint.mirror:
                    raise
                if i == len(order) - 1:
                    if failed:
                        raise type(e)(f"{e} (also tried: {'; '.join(failed)})") from None
                    raise
                failed.append(f"{s.name}: {str(e).split(': ', 1)[-1]}")
        raise AssertionError("unreachable")

    # -- manifests

    async def fetch_manifest(self, target: str, expected: str | None, size: int | None = None,
                             prefer: _Endpoint | None = None):
        async def op(s: _Endpoint):
            return s, *await self._get_manifest(s, target, expected, size)
        return await self._each_session(prefer, op)

    async def _get_manifest(self, s: _Endpoint, target: str, expected: str | None,
                            size: int | None) -> tuple[bytes, str, str, dict]:
        path = f"/v2/{self.ref.repository}/manifests/{target}"
        resp = await s.send("GET", path, {"Accept": ACCEPT}, self.scope)
        try:
            await self._check_status(resp, s, f"manifest {target}")
            body = await _read_limited(resp, MANIFEST_MAX, f"{self.ref}: manifest {target}")
        except httpx.HTTPError as e:
            raise _Transient(RegistryUnreachable(
                f"{self.ref}: reading the manifest from {s.name}: {_describe(e)}")) from None
        finally:
            await resp.aclose()
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        if expected is not None and digest != expected:
            raise DigestMismatch(f"{self.ref}: manifest from {s.name} does not match its digest "
                                 f"(expected {expected}, got {digest})")
        if size is not None and len(body) != size:
            raise DigestMismatch(f"{self.ref}: manifest {target} is {len(body)} bytes, its "
                                 f"descriptor says {size}")
        header = resp.headers.get("docker-content-digest")
        if expected is None and header and header.strip() != digest:
            raise DigestMismatch(f"{self.ref}: manifest from {s.name} does not match the digest "
                                 f"the registry announced (Docker-Content-Digest {header.strip()},"
                                 f" got {digest})")
        media_type, doc = self._media_type(resp.headers.get("content-type", ""), body)
        return body, media_type, digest, doc

    def _media_type(self, content_type: str, body: bytes) -> tuple[str, dict]:
        ct = content_type.split(";")[0].strip().lower()
        if ct in SCHEMA1_TYPES:
            raise UnsupportedMediaType(f"{self.ref}: Docker schema 1 manifests are not "
                                       "supported (re-push the image with a current client)")
        try:
            doc = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            doc = None
        if not isinstance(doc, dict):
            if ct not in MANIFEST_TYPES and ct not in GENERIC_TYPES:
                raise UnsupportedMediaType(f"{self.ref}: unsupported manifest media type {ct!r}")
            raise ManifestError(f"{self.ref}: the manifest is not a JSON object")
        field_type = doc.get("mediaType")
        if doc.get("schemaVersion") == 1:
            raise UnsupportedMediaType(f"{self.ref}: Docker schema 1 manifests are not "
                                       "supported (re-push the image with a current client)")
        if ct not in MANIFEST_TYPES and ct not in GENERIC_TYPES:
            raise UnsupportedMediaType(
                f"{self.ref}: unsupported manifest media type {ct!r} (Content-Type); "
                "expected an OCI or Docker schema 2 image manifest or index")
        if field_type is not None and field_type not in MANIFEST_TYPES:
            raise UnsupportedMediaType(
                f"{self.ref}: unsupported manifest media type {field_type!r}; "
                "expected an OCI or Docker schema 2 image manifest or index")
        if field_type and ct in MANIFEST_TYPES and field_type != ct:
            raise UnsupportedMediaType(f"{self.ref}: manifest says mediaType {field_type!r} "
                                       f"but was served as {ct!r}")
        media_type = field_type or (ct if ct in MANIFEST_TYPES else "")
        if not media_type:
            if isinstance(doc.get("manifests"), list):
                media_type = OCI_INDEX
            elif isinstance(doc.get("layers"), list) and isinstance(doc.get("config"), dict):
                media_type = OCI_MANIFEST
            else:
                raise UnsupportedMediaType(f"{self.ref}: the manifest has no media type and is "
                                           "neither an image manifest nor an index")
        if doc.get("schemaVersion") not in (2, None):
            raise ManifestError(f"{self.ref}: unsupported schemaVersion "
                                f"{doc.get('schemaVersion')!r}")
        return media_type, doc

    async def _check_status(self, resp: httpx.Response, s: _Endpoint, what: str) -> None:
        code = resp.status_code
        if 200 <= code < 300:
            return
        await resp.aread()
        detail = _error_detail(resp)
        if code == 404:
            raise NotFoundError(f"{self.ref}: not found: {what} at {s.name}{detail}")
        if code == 403:
            raise UnauthorizedError(f"{self.ref}: unauthorized: access to {what} denied by "
                                    f"{s.name}{detail}")
        if code == 401:
            raise UnauthorizedError(f"{self.ref}: unauthorized: {s.name}{detail}")
        error = RegistryError(f"{self.ref}: {s.name} answered HTTP {code} for {what}{detail}")
        if code == 429 or code >= 500:
            retry_after = resp.headers.get("retry-after", "")
            raise _Transient(error, float(retry_after) if retry_after.isdigit() else None)
        raise error

    def select(self, index: dict, want: Platform) -> dict:
        entries = index.get("manifests")
        if not isinstance(entries, list):
            raise ManifestError(f"{self.ref}: the index has no 'manifests' list")
        available, candidates = [], []
        for entry in entries:
            if not isinstance(entry, dict) or not isinstance(entry.get("platform"), dict):
                continue
            if entry.get("mediaType") not in MANIFEST_TYPES + (None,):
                continue
            p = entry["platform"]
            plat = Platform.of(p.get("os", ""), p.get("architecture", ""), p.get("variant", ""))
            if plat.os == "unknown":     # attestations and other non-images
                continue
            available.append(str(plat))
            if want.matches(plat):
                candidates.append((plat, entry))
        if not candidates:
            listed = ", ".join(dict.fromkeys(available)) or "none"
            raise PlatformNotFound(f"{self.ref}: no image for platform {want} "
                                   f"(available: {listed})")
        if not want.variant and want.architecture == "arm":
            # Without a variant, prefer the newest ARM (v7, then v6, ...).
            candidates.sort(key=lambda c: c[0].variant, reverse=True)
        plat, entry = candidates[0]
        return {**entry, "_platform": str(plat)}

    # -- blobs

    async def fetch_small(self, desc: dict, what: str, limit: int,
                          prefer: _Endpoint | None) -> bytes:
        digest, size = desc["digest"], desc["size"]
        if size > limit:
            raise ManifestError(f"{self.ref}: {what} is {size} bytes (limit {limit})")

        async def op(s: _Endpoint) -> bytes:
            resp = await s.send("GET", f"/v2/{self.ref.repository}/blobs/{digest}",
                                {"Accept-Encoding": "identity"}, self.scope)
            try:
                await self._check_status(resp, s, f"{what} {digest}")
                body = await _read_limited(resp, size, f"{self.ref}: {what} {digest}",
                                           error=DigestMismatch)
            except httpx.HTTPError as e:
                raise _Transient(RegistryUnreachable(
                    f"{self.ref}: reading {what} from {s.name}: {_describe(e)}")) from None
            finally:
                await resp.aclose()
            if len(body) < size:
                raise TruncatedBlob(f"{self.ref}: {what} {digest} is truncated: got "
                                    f"{len(body)} of {size} bytes")
            got = "sha256:" + hashlib.sha256(body).hexdigest()
            if got != digest:
                raise DigestMismatch(f"{self.ref}: {what} {digest} does not match its digest "
                                     f"(got {got})")
            return body

        return await self._each_session(prefer, op)

    async def fetch_blob(self, store: ContentStore, layer: Layer,
                         prefer: _Endpoint | None) -> "_Staged":
        """Download one layer into its ingest file and verify it; the
        returned _Staged is committed by the caller once every layer is in."""
        async with self.parallel:
            staged = await self._each_session(
                prefer, lambda s: self._blob_attempt(store, layer, s))
        self.progress.finish(layer.digest)
        return staged

    async def _blob_attempt(self, store: ContentStore, layer: Layer, s: _Endpoint) -> "_Staged":
        staged = _Staged(store.ingest(layer.digest, layer.size))
        await asyncio.to_thread(staged.open)
        try:
            await self._download(staged, layer, s)
            return staged
        except BaseException:
            staged.close()
            raise

    async def _download(self, st: "_Staged", layer: Layer, s: _Endpoint) -> None:
        digest, size = layer.digest, layer.size
        ing = st.ing
        start = ing.offset
        if start < size:
            headers = {"Accept-Encoding": "identity"}
            if start:
                headers["Range"] = f"bytes={start}-"
            resp = await s.send("GET", f"/v2/{self.ref.repository}/blobs/{digest}", headers,
                                self.scope)
            try:
                if resp.status_code == 416 and start:
                    st.restart()     # our partial file is not a prefix the server knows
                    raise _Transient(TruncatedBlob(
                        f"{self.ref}: layer {digest}: {s.name} cannot resume at byte {start}"))
                await self._check_status(resp, s, f"layer {digest}")
                if resp.status_code == 206:
                    first = _content_range_start(resp.headers.get("content-range", ""))
                    if first != start:
                        st.restart()
                        raise _Transient(RegistryError(
                            f"{self.ref}: layer {digest}: {s.name} sent an unexpected range"))
                elif start:
                    st.restart()     # the server ignored Range: start over
                self.progress.start(digest, size, ing.offset)
                pipe = _Pipe(st)
                try:
                    try:
                        async for chunk in resp.aiter_raw():
                            await pipe.write(chunk)
                            self.downloaded += len(chunk)
                            self.progress.advance(digest, len(chunk))
                    finally:
                        await pipe.flush()
                except httpx.HTTPError as e:
                    raise _Transient(RegistryUnreachable(
                        f"{self.ref}: layer {digest}: connection to {s.name} lost after "
                        f"{ing.offset} of {size} bytes ({_describe(e)})")) from None
                except DigestError:
                    raise DigestMismatch(f"{self.ref}: layer {digest} from {s.name} is larger "
                                         f"than its descriptor says ({size} bytes)") from None
            finally:
                await resp.aclose()
            if ing.offset < size:
                got = ing.offset
                st.restart()
                raise TruncatedBlob(f"{self.ref}: layer {digest} from {s.name} is truncated: "
                                    f"got {got} of {size} bytes")
        got = st.digest()
        if got == digest:
            # Flush it to disk now, while other layers still download; the
            # commit's own fsync is then quick.
            await asyncio.to_thread(fsync_path, ing.path)
        else:
            st.discard()
            error = DigestMismatch(f"{self.ref}: layer {digest} from {s.name} does not match "
                                   f"its digest (got {got})")
            if start and digest not in self._restarted:
                # What an earlier attempt left may be what was wrong: once more
                # from the start (the partial file is gone).
                self._restarted.add(digest)
                raise _Transient(error, 0)
            raise error

    # -- the whole pull

    async def run(self, store: ContentStore, want: Platform) -> PullResult:
        ref = self.ref
        session: _Endpoint | None
        if ref.digest and store.has(ref.digest):
            session, body, digest = None, store.read(ref.digest), ref.digest
            media_type, doc = self._media_type("", body)
        else:
            session, body, media_type, digest, doc = await self.fetch_manifest(ref.target,
                                                                               ref.digest)
        repo_digest = digest
        indexes: list[tuple[str, bytes]] = []
        platform = ""
        while media_type in INDEX_TYPES:
            if len(indexes) >= 2:
                raise ManifestError(f"{ref}: indexes nested too deep")
            indexes.append((digest, body))
            entry = self.select(doc, want)
            child, size = _descriptor(entry, ref, "index entry")
            platform = entry["_platform"]
            if store.has(child) and store.size(child) == size:
                # By digest and already here (verified when it was stored).
                body = store.read(child)
                media_type, doc = self._media_type(entry.get("mediaType") or "", body)
                digest = child
            else:
                session, body, media_type, digest, doc = await self.fetch_manifest(
                    child, child, size, prefer=session)

        config_desc, layers = self._parse_manifest(doc)
        if store.has(config_desc["digest"]):
            config_bytes = store.read(config_desc["digest"])
        else:
            config_bytes = await self.fetch_small(config_desc, "config", CONFIG_MAX, session)
        try:
            config = json.loads(config_bytes)
        except (ValueError, UnicodeDecodeError):
            config = None
        if not isinstance(config, dict):
            raise ManifestError(f"{ref}: the image config is not a JSON object")
        have = Platform.of(config.get("os", ""), config.get("architecture", ""),
                           config.get("variant", ""))
        if not platform:
            if have.os and have.architecture and not want.matches(have):
                raise PlatformNotFound(f"{ref}: the image is for {have}, not {want}")
            platform = str(have) if have.os and have.architecture else str(want)
        rootfs = config.get("rootfs") or {}
        if not isinstance(rootfs, dict):  # registry data: a typed error, not AttributeError
            raise ManifestError(f"{ref}: the image config's rootfs is not an object")
        diff_ids = rootfs.get("diff_ids")
        if isinstance(diff_ids, list) and len(diff_ids) != len(layers):
            raise ManifestError(f"{ref}: the config lists {len(diff_ids)} layers, the manifest "
                                f"{len(layers)}")

        unique = list({l.digest: l for l in layers}.values())
        missing = [l for l in unique if not store.has(l.digest)]
        locks: list[_BlobLock] = []
        try:
            # One puller per blob across processes; taken in digest order, so
            # two pulls that share layers cannot wait for each other.
            for layer in sorted(missing, key=lambda l: l.digest):
                locks.append(await _BlobLock(store, layer.digest).acquire())
            todo = [l for l in missing if not store.has(l.digest)]
            for layer in unique:
                if layer not in todo:
                    self.skipped.append(layer.digest)
                    self.progress.finish(layer.digest, skipped=True)
            tasks = [asyncio.create_task(self.fetch_blob(store, l, session)) for l in todo]
            try:
                staged = await asyncio.gather(*tasks)
            except BaseException:
                for t in tasks:
                    t.cancel()
                for r in await asyncio.gather(*tasks, return_exceptions=True):
                    if isinstance(r, _Staged):
                        r.close()      # complete and verified: a later pull commits it
                raise
            # Every layer is in and verified: publish them, then the config,
            # the manifest and the index(es).
            try:
                for st in staged:
                    st.commit()
                store.put(config_bytes, config_desc["digest"])
                store.put(body, digest)
                for d, b in indexes:
                    store.put(b, d)
            except StoreError as e:
                raise PullError(f"{ref}: storing: {e}") from None
            finally:
                for st in staged:
                    st.close()
        finally:
            for lock in locks:
                lock.release()
        image = ImageRecord(digest=digest, media_type=media_type,
                            config_digest=config_desc["digest"], layers=layers,
                            platform=platform, extra_blobs=[d for d, _ in indexes])
        return PullResult(image, repo_digest, config, ref, session.name if session else "store",
                          self.downloaded, self.skipped)

    def _parse_manifest(self, doc: dict) -> tuple[dict, list[Layer]]:
        ref = self.ref
        config = doc.get("config")
        if not isinstance(config, dict):
            raise ManifestError(f"{ref}: the manifest has no config")
        cdigest, csize = _descriptor(config, ref, "config")
        ctype = config.get("mediaType", "")
        if ctype not in CONFIG_TYPES:
            raise UnsupportedMediaType(f"{ref}: not a container image: config media type "
                                       f"{ctype!r} (an OCI artifact?)")
        raw_layers = doc.get("layers")
        if not isinstance(raw_layers, list):
            raise ManifestError(f"{ref}: the manifest has no layers list")
        layers = []
        for entry in raw_layers:
            if not isinstance(entry, dict):
                raise ManifestError(f"{ref}: a layer descriptor is not an object")
            ldigest, lsize = _descriptor(entry, ref, "layer")
            ltype = entry.get("mediaType", "")
            if ltype not in LAYER_TYPES:
                raise UnsupportedMediaType(f"{ref}: unsupported layer media type {ltype!r} "
                                           f"({ldigest})")
            layers.append(Layer(ldigest, ltype, lsize))
        return {"digest": cdigest, "size": csize, "mediaType": ctype}, layers


def _descriptor(desc: dict, ref: Reference, what: str) -> tuple[str, int]:
    digest, size = desc.get("digest"), desc.get("size")
    try:
        check_digest(digest)
    except StoreError:
        raise ManifestError(f"{ref}: {what} has an unsupported or malformed digest "
                            f"{digest!r}") from None
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ManifestError(f"{ref}: {what} {digest} has no valid size")
    return digest, size


def _content_range_start(value: str) -> int | None:
    # "bytes 100-199/200"
    try:
        unit, _, rest = value.strip().partition(" ")
        return int(rest.split("-", 1)[0]) if unit == "bytes" else None
    except ValueError:
        return None


async def _read_limited(resp: httpx.Response, limit: int, what: str,
                        error: type[PullError] = ManifestError) -> bytes:
    chunks, total = [], 0
    async for chunk in resp.aiter_raw():
        total += len(chunk)
        if total > limit:
            raise error(f"{what} is larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


_WRITERS = concurrent.futures.ThreadPoolExecutor(max_workers=4,
                                                 thread_name_prefix="hyperrun-pull")


class _Pipe:
    """Writing and hashing a layer in a worker thread, one batch in flight,
    so the event loop keeps reading the network meanwhile (hashlib and file
    writes release the GIL)."""

    BATCH = 1 << 20

    def __init__(self, st: "_Staged") -> None:
        self.st = st
        self.chunks: list[bytes] = []
        self.size = 0
        self.pending: concurrent.futures.Future | None = None

    async def write(self, chunk: bytes) -> None:
        self.chunks.append(chunk)
        self.size += len(chunk)
        if self.size >= self.BATCH:
            await self._wait()
            self._submit()

    async def flush(self) -> None:
        await self._wait()
        self._submit()
        await self._wait()

    def _submit(self) -> None:
        if self.chunks:
            chunks, self.chunks, self.size = self.chunks, [], 0
            self.pending = _WRITERS.submit(self._write_all, chunks)

    def _write_all(self, chunks: list[bytes]) -> None:
        self.st.write(b"".join(chunks))

    async def _wait(self) -> None:
        f, self.pending = self.pending, None
        if f is None:
            return
        try:
            await asyncio.wrap_future(f)
        except asyncio.CancelledError:
            concurrent.futures.wait([f])    # never close the file under a running write
            raise


class _Staged:
    """A blob in its ingest file, hashed as it is written (so it is verified
    before any blob of the image is published)."""

    def __init__(self, ing) -> None:
        self.ing = ing
        self.hash = hashlib.sha256()
        self._open = False

    def open(self) -> None:
        self.ing.__enter__()
        self._open = True
        if self.ing.offset:
            left = self.ing.offset
            with open(self.ing.path, "rb") as f:
                while left and (chunk := f.read(min(left, 1 << 20))):
                    self.hash.update(chunk)
                    left -= len(chunk)

    def restart(self) -> None:
        self.ing.restart()
        self.hash = hashlib.sha256()

    def write(self, data: bytes) -> None:
        self.ing.write(data)
        self.hash.update(data)

    def digest(self) -> str:
        return "sha256:" + self.hash.hexdigest()

    def discard(self) -> None:
        """Drop content that does not match (the store deletes it)."""
        try:
            self.ing.commit()
        except DigestError:
            pass
        self.close()

    def commit(self) -> None:
        self.ing.commit()

    def close(self) -> None:
        if self._open:
            self._open = False
            self.ing.__exit__(None, None, None)


class _BlobLock:
    """One downloader per blob across processes: flock on ingest/<digest>.lock.
    The lock file is removed only once the blob is committed (a waiter then
    holds the old inode and finds the blob present)."""

    def __init__(self, store: ContentStore, digest: str) -> None:
        self.path = store.root / "ingest" / (digest.replace(":", "-") + ".lock")
        self.store = store
        self.digest = digest
        self.fd = -1

    async def acquire(self) -> "_BlobLock":
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except BlockingIOError:
                await asyncio.sleep(0.1)
            except BaseException:
                os.close(self.fd)
                self.fd = -1
                raise

    def release(self) -> None:
        if self.fd < 0:
            return
        try:
            if self.store.has(self.digest):
                self.path.unlink(missing_ok=True)
        finally:
            os.close(self.fd)
            self.fd = -1


# ---------------------------------------------------------------- entry point

async def pull(ref: Reference | str, store: ContentStore, *, platform: str = "linux/amd64",
               hosts: Hosts | None = None, auth: Credentials | None = None,
               progress: PullProgress | bool | None = None, retries: int = RETRIES,
               parallel: int = PARALLEL) -> PullResult:
    """Pull ref into store and return what the image service records.

    platform: os/arch[/variant] picked from an index (and checked against a
    single manifest's config). hosts: mirrors and TLS settings (default:
    Hosts.load()). auth: credentials for the registry itself (default: the
    Docker config file; mirrors always use the file). progress: None = a
    rich display when stderr is a terminal, False = none, or an object with
    start/advance/finish/close. retries: further attempts per server after
    a transient error (connection lost, 5xx, 429), with backoff, resuming."""
    try:
        if not isinstance(ref, Reference):
            ref = parse(ref)
    except InvalidReference as e:
        raise BadReference(str(e)) from None
    want = Platform.parse(platform)
    try:
        endpoints = (hosts if hosts is not None else Hosts.load()).endpoints(ref)
    except HostsConfigError as e:
        raise ConfigError(str(e)) from None
    shown = _progress_for(progress)
    puller = _Puller(ref, endpoints, auth, retries, parallel, shown)
    try:
        return await puller.run(store, want)
    finally:
        shown.close()
        await puller.aclose()


def pull_sync(ref: Reference | str, store: ContentStore, **kwargs) -> PullResult:
    """pull() for callers without an event loop (the CLI)."""
    return asyncio.run(pull(ref, store, **kwargs))
