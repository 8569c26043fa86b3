"""Errors the agent returns to the host, with their gRPC status codes."""
from hyperrun.channel import frame


class AgentError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def not_found(what: str) -> AgentError:
    return AgentError(frame.NOT_FOUND, f"{what} not found")


def invalid(message: str) -> AgentError:
    return AgentError(frame.INVALID_ARGUMENT, message)


def failed(message: str) -> AgentError:
    return AgentError(frame.FAILED_PRECONDITION, message)
