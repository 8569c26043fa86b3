"""Image references, parsed and normalized as Docker does.

    busybox                       docker.io/library/busybox:latest
    user/app:1                    docker.io/user/app:1
    localhost:5000/x              localhost:5000/x:latest
    127.0.0.1:5000/a/b:t          127.0.0.1:5000/a/b:t
    registry.k8s.io/pause:3.9     registry.k8s.io/pause:3.9
    x@sha256:<hex>                docker.io/library/x@sha256:<hex>
    x:tag@sha256:<hex>            docker.io/library/x:tag@sha256:<hex> (the digest wins)

The grammar is the one of github.com/distribution/reference: the first
path component is a registry when it holds a "." or a ":" or is
"localhost"; otherwise the name is on Docker Hub,
where a single component gets "library/" in front.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from hyperrun import errdefs

DOCKER_HUB = "docker.io"
_HUB_ALIASES = {"docker.io", "index.docker.io", "registry-1.docker.io"}
DEFAULT_TAG = "latest"
NAME_MAX = 255

_ALNUM = r"[a-z0-9]+"
_SEPARATOR = r"(?:[._]|__|[-]+)"
_PATH_COMPONENT = re.compile(rf"^{_ALNUM}(?:{_SEPARATOR}{_ALNUM})*$")
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = re.compile(
    rf"^(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[0-9a-fA-F:.%]+\])(?::[0-9]+)?$")
_TAG = re.compile(r"^[\w][\w.-]{0,127}$", re.ASCII)
_DIGEST = re.compile(r"^[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]+$")
_SHA256 = re.compile(r"^sha256:[0-9a-f]{64}$")


class InvalidReference(ValueError, errdefs.Invalid):
    """An image reference that cannot be parsed; the message says why."""


@dataclass(frozen=True)
class Reference:
    registry: str            # "docker.io", "127.0.0.1:5000", "registry.k8s.io"
    repository: str          # "library/busybox"
    tag: str | None = None   # None only when pulled by digest alone
    digest: str | None = None

    @classmethod
    def parse(cls, text: str) -> "Reference":
        return parse(text)

    @property
    def name(self) -> str:
        """registry/repository, without tag or digest."""
        return f"{self.registry}/{self.repository}"

    @property
    def key(self) -> str:
        """The image name as the metadata DB records it: registry/repo:tag,
        or registry/repo@digest for a reference with a digest and no tag."""
        if self.tag is not None:
            return f"{self.name}:{self.tag}"
        return f"{self.name}@{self.digest}"

    @property
    def target(self) -> str:
        """What the registry is asked for: the digest if there is one, else the tag."""
        return self.digest or self.tag or DEFAULT_TAG

    @property
    def familiar(self) -> str:
        """The short form Docker shows: "busybox:latest", "user/app:1"."""
        name = self.name
        if self.registry == DOCKER_HUB:
            short = self.repository.removeprefix("library/")
            if "/" in short:  # as Docker: "library/a/b" kept whole, "a/b" is another image
                short = self.repository
            if _split_registry(short) == (DOCKER_HUB, short):  # else "a.b/c" names registry a.b
                name = short
        if self.tag is not None:
            name += f":{self.tag}"
        if self.digest is not None:
            name += f"@{self.digest}"
        return name

    def with_digest(self, digest: str) -> "Reference":
        return Reference(self.registry, self.repository, self.tag, digest)

    def __str__(self) -> str:
        s = self.name
        if self.tag is not None:
            s += f":{self.tag}"
        if self.digest is not None:
            s += f"@{self.digest}"
        return s


def parse(text: str) -> Reference:
    """Parse and normalize an image reference; InvalidReference says what is wrong."""
    if not isinstance(text, str) or not text:
        raise InvalidReference("invalid reference: empty")
    if text != text.strip() or any(c.isspace() for c in text):
        raise InvalidReference(f"invalid reference {text!r}: contains whitespace")

    rest, digest = text, None
    if "@" in rest:
        rest, _, digest = rest.partition("@")
        _check_digest(text, digest)
    # A tag is what follows the last ":" if no "/" comes after it (else the
    # ":" belongs to a registry port).
    tag = None
    colon = rest.rfind(":")
    if colon > rest.rfind("/"):
        rest, tag = rest[:colon], rest[colon + 1:]
        if not _TAG.match(tag):
            raise InvalidReference(
                f"invalid reference {text!r}: bad tag {tag!r} (letters, digits, '_', '.', '-'; "
                "at most 128, not starting with '.' or '-')")
    if not rest:
        raise InvalidReference(f"invalid reference {text!r}: no repository name")

    registry, repository = _split_registry(rest)
    if not _DOMAIN.match(registry):
        raise InvalidReference(f"invalid reference {text!r}: bad registry name {registry!r}")
    if registry in _HUB_ALIASES:
        registry = DOCKER_HUB
        if "/" not in repository:
            repository = f"library/{repository}"
    for component in repository.split("/"):
        if not _PATH_COMPONENT.match(component):
            if component.lower() != component and _PATH_COMPONENT.match(component.lower()):
                raise InvalidReference(
                    f"invalid reference {text!r}: repository name must be lowercase")
            raise InvalidReference(
                f"invalid reference {text!r}: bad repository name component {component!r} "
                "(lowercase letters and digits, separated by '.', '_', '__' or '-')")
    if len(registry) + 1 + len(repository) > NAME_MAX:
        raise InvalidReference(f"invalid reference {text!r}: name longer than {NAME_MAX}")
    if tag is None and digest is None:
        tag = DEFAULT_TAG
    return Reference(registry, repository, tag, digest)


def _split_registry(name: str) -> tuple[str, str]:
    # Docker also takes a first component with capitals for a registry
    # ("User/app" would mean host "User"); here it stays a Docker Hub
    # namespace, so the error says "must be lowercase" instead.
    first, sep, remainder = name.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        return first, remainder
    return DOCKER_HUB, name


def _check_digest(text: str, digest: str) -> None:
    if not _DIGEST.match(digest):
        raise InvalidReference(f"invalid reference {text!r}: bad digest {digest!r}")
    algorithm = digest.partition(":")[0]
    if algorithm != "sha256":
        raise InvalidReference(
            f"invalid reference {text!r}: unsupported digest algorithm {algorithm!r} "
            "(only sha256)")
    if not _SHA256.match(digest):
        raise InvalidReference(
            f"invalid reference {text!r}: bad digest {digest!r} (sha256: and 64 lowercase hex)")
