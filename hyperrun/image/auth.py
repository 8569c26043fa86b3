"""Registry credentials and WWW-Authenticate challenges.

Credentials come from the caller (the CRI passes username/password or an
identity token with each pull) or from Docker's client configuration,
$DOCKER_CONFIG/config.json or ~/.docker/config.json:

    {"auths": {"registry.example.com": {"auth": "<base64 user:password>"},
               "other.example.com:5000": {"username": "u", "password": "p"},
               "https://index.docker.io/v1/": {"identitytoken": "..."}},
     "credHelpers": {"gcr.io": "gcloud"},
     "credsStore": "desktop"}

A credential helper (credHelpers / credsStore) is run as Docker runs it
(`docker-credential-NAME get`, the server on stdin, JSON out); one that is
not installed is a clear error, raised only when the registry asks for
credentials.
"""
from __future__ import annotations

import base64
import binascii
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

DOCKER_HUB_KEYS = ("https://index.docker.io/v1/", "index.docker.io", "docker.io",
                   "registry-1.docker.io", "https://registry-1.docker.io")


class CredentialsError(Exception):
    """Credentials exist but cannot be used; the message says why."""


@dataclass(frozen=True)
class Credentials:
    username: str = ""
    password: str = field(default="", repr=False)
    identity_token: str = field(default="", repr=False)   # OAuth2 refresh token
    registry_token: str = field(default="", repr=False)   # a bearer token, sent as is

    def __bool__(self) -> bool:
        return bool(self.username or self.password or self.identity_token or self.registry_token)

    def basic(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()


def docker_config_path() -> Path:
    base = os.environ.get("DOCKER_CONFIG")
    if base:
        return Path(base) / "config.json"
    return Path.home() / ".docker" / "config.json"


def _host_of(key: str) -> str:
    """Docker keys are "host", "host:port", "https://host/v1/" ...: compare hosts."""
    key = key.strip()
    for scheme in ("https://", "http://"):
        if key.startswith(scheme):
            key = key[len(scheme):]
    return key.split("/", 1)[0].lower()


def _is_hub(registry: str) -> bool:
    return registry in ("docker.io", "index.docker.io", "registry-1.docker.io")


def docker_credentials(registry: str, path: Path | None = None) -> Credentials | None:
    """Credentials for registry ("docker.io", "host:port") from Docker's
    config file, or None when it has none (then the pull is anonymous)."""
    path = path or docker_config_path()
    try:
        raw = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise CredentialsError(f"cannot read {path}: {e}") from None
    try:
        config = json.loads(raw) if raw.strip() else {}
    except json.JSONDecodeError as e:
        raise CredentialsError(f"{path}: invalid JSON: {e}") from None
    if not isinstance(config, dict):
        raise CredentialsError(f"{path}: not a JSON object")

    hub = _is_hub(registry)
    wanted = {_host_of(k) for k in DOCKER_HUB_KEYS} if hub else {registry.lower()}
    server = "https://index.docker.io/v1/" if hub else registry

    helpers = config.get("credHelpers") or {}
    if isinstance(helpers, dict):
        for key, helper in helpers.items():
            if _host_of(key) in wanted and helper:
                return _run_helper(str(helper), server, path, "credHelpers")

    entry = None
    auths = config.get("auths") or {}
    if isinstance(auths, dict):
        for key, value in auths.items():
            if _host_of(key) in wanted and isinstance(value, dict):
                entry = value
                break
    inline = _inline(entry, registry, path) if entry else None

    store = config.get("credsStore")
    if store and not inline:
        return _run_helper(str(store), server, path, "credsStore")
    return inline


def _inline(entry: dict, registry: str, path: Path) -> Credentials | None:
    username = entry.get("username") or ""
    password = entry.get("password") or ""
    if entry.get("auth"):
        try:
            decoded = base64.b64decode(entry["auth"], validate=False).decode()
        except (binascii.Error, UnicodeDecodeError, ValueError):
            raise CredentialsError(f"{path}: the 'auth' of {registry} is not base64 of "
                                   "user:password") from None
        username, sep, password = decoded.partition(":")
        if not sep:
            raise CredentialsError(f"{path}: the 'auth' of {registry} is not base64 of "
                                   "user:password")
    creds = Credentials(username, password, entry.get("identitytoken") or "",
                        entry.get("registrytoken") or "")
    return creds or None


def _run_helper(helper: str, server: str, path: Path, where: str) -> Credentials | None:
    program = f"docker-credential-{helper}"
    exe = shutil.which(program)
    if exe is None:
        raise CredentialsError(
            f"credentials for {server} are kept by the credential helper {helper!r} "
            f"({where} in {path}), but {program} is not installed; install it, or put "
            f"the credentials in {path} under \"auths\" (\"auth\": base64 of user:password)")
    try:
        out = subprocess.run([exe, "get"], input=server.encode(), capture_output=True,
                             timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise CredentialsError(f"{program} failed: {e}") from None
    if out.returncode != 0:
        msg = (out.stdout or out.stderr).decode(errors="replace").strip()
        if "credentials not found" in msg.lower():
            return None
        raise CredentialsError(f"{program} get {server} failed: {msg or out.returncode}")
    try:
        data = json.loads(out.stdout)
        username, secret = data.get("Username") or "", data.get("Secret") or ""
    except (json.JSONDecodeError, AttributeError):
        raise CredentialsError(f"{program} get {server}: output is not JSON") from None
    if username == "<token>":
        return Credentials(identity_token=secret)
    return Credentials(username, secret) or None


# WWW-Authenticate: Bearer realm="https://auth.example/token",service="x",scope="repository:a:pull"
_PARAM = re.compile(r'\s*([A-Za-z0-9_.-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^,\s]*)\s*,?')


@dataclass(frozen=True)
class Challenge:
    scheme: str            # "bearer" or "basic" (lowercase)
    params: dict[str, str]

    @property
    def realm(self) -> str:
        return self.params.get("realm", "")


def parse_challenge(header: str | None) -> Challenge | None:
    if not header:
        return None
    scheme, _, rest = header.strip().partition(" ")
    params = {}
    pos = 0
    while pos < len(rest):
        m = _PARAM.match(rest, pos)
        if not m or m.end() == pos:
            break
        value = m.group(2)
        if value.startswith('"'):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        params[m.group(1).lower()] = value
        pos = m.end()
    return Challenge(scheme.lower(), params)
