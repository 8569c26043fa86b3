"""Agent log lines on the console (the host keeps them in console.log)."""
import sys
import time


def log(*parts: object) -> None:
    line = " ".join(str(p) for p in parts)
    try:
        sys.stderr.write(f"hyperrun-agent[{time.monotonic():.3f}]: {line}\n")
        sys.stderr.flush()
    except OSError:
        pass
