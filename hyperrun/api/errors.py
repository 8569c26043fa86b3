"""What a failure says to a client, in one place: its message (the CRI's
error details, a CLI request's error) and the CRI's status code for its
kind (hyperrun/errdefs.py). grpc is loaded only to build a status code: a
run without a daemon (the CLI server alone) never loads it."""
from __future__ import annotations

import functools

from hyperrun import errdefs
from hyperrun.channel.ttrpc import TtrpcError

# Most specific first: an image not found is an image error too.
_KINDS = [
    (errdefs.NotFound, "NOT_FOUND"),
    (errdefs.Invalid, "INVALID_ARGUMENT"),
    (errdefs.Conflict, "FAILED_PRECONDITION"),
    (errdefs.Exhausted, "RESOURCE_EXHAUSTED"),
    (TimeoutError, "DEADLINE_EXCEEDED"),
    (errdefs.Unavailable, "UNAVAILABLE"),
    (errdefs.Unknown, "UNKNOWN"),
    (TtrpcError, "UNKNOWN"),
]
KNOWN = tuple(kind for kind, _ in _KINDS)


def message(exc: BaseException) -> str | None:
    """A known failure's message; None for anything else (a bug)."""
    if isinstance(exc, TtrpcError):
        return f"guest agent: {exc.remote_message}"
    return str(exc) if isinstance(exc, KNOWN) else None


def describe(exc: BaseException):
    """A known failure's gRPC status code and message (what a CRI client
    sees as the error's details); None for anything else."""
    import grpc

    text = message(exc)
    if text is None:
        return None
    return next(getattr(grpc.StatusCode, code) for kind, code in _KINDS
                if isinstance(exc, kind)), text


def rpc(method):
    """Run an RPC handler; turn known failures into their status codes."""
    @functools.wraps(method)
    async def wrapper(self, request, context):
        try:
            return await method(self, request, context)
        except KNOWN as exc:
            await context.abort(*describe(exc))
    return wrapper
