"""Docker's exit codes for `hyperrun run`: the container's own; 128+N when
killed by signal N; 125 when hyperrun itself failed; 126 when the command
cannot be invoked; 127 when it was not found."""

RUNTIME_ERROR = 125
CANNOT_INVOKE = 126
NOT_FOUND = 127


def for_start_error(exc: BaseException) -> int:
    """The code for a container whose command could not be run: the kind
    of the agent's error (it says whether the program is missing or cannot
    be run), else a runtime error."""
    from hyperrun.channel import frame
    from hyperrun.channel.ttrpc import TtrpcError

    if isinstance(exc, TtrpcError):
        return {frame.NOT_FOUND: NOT_FOUND, frame.PERMISSION_DENIED: CANNOT_INVOKE}.get(
            exc.code, RUNTIME_ERROR)
    return RUNTIME_ERROR
