"""Kinds of failure, in the manner of containerd's errdefs: every error the
project raises on purpose is one of these kinds (its class derives from
one), so that a caller acts on the kind and never matches text. The CRI
turns a kind into a gRPC status code (api/errors.py), the CLI server into
its message; anything that is not an `Error` is a bug.

A leaf: every layer may import it, and it imports nothing.
"""


class Error(Exception):
    """A failure the project names (its str() is for the user)."""


class NotFound(Error):
    """What was named does not exist (gRPC NOT_FOUND)."""


class Invalid(Error):
    """The request itself is wrong: fix it and ask again (INVALID_ARGUMENT)."""


class Conflict(Error):
    """The thing is not in a state that allows it (FAILED_PRECONDITION)."""


class Exhausted(Error):
    """A limit was reached (RESOURCE_EXHAUSTED)."""


class Unavailable(Error):
    """What the request needs is gone or down: a VM, a channel, a network
    plugin (UNAVAILABLE)."""


class Unknown(Error):
    """A named failure of no kind above: a pull, an image store (UNKNOWN)."""
