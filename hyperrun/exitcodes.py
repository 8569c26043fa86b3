"""Docker's exit codes for `hyperrun run`: the container's own; 128+N when
killed by signal N; 125 when hyperrun itself failed; 126 when the command
cannot be invoked; 127 when it was not found."""

RUNTIME_ERROR = 125
CANNOT_INVOKE = 126
NOT_FOUND = 127


def for_start_error(message: str) -> int:
    """The code for a container whose command could not be run, from the
    runtime's error message."""
    text = message.lower()
    if "no such file" in text or "not found" in text:
        return NOT_FOUND
    if "permission denied" in text or "exec format" in text:
        return CANNOT_INVOKE
    return RUNTIME_ERROR
