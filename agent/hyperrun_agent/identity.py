"""A restored VM's own identity: every clone of a template wakes up with
the template's RNG state and clock, so two clones would hand out the same
"random" numbers. The host sends fresh entropy and the time."""
import os
import struct
import time

from .log import log

RNDADDENTROPY = 0x40085203   # _IOW('R', 0x03, int[2])
RNDRESEEDCRNG = 0x5207       # _IO('R', 0x07)


def reseed(entropy: bytes) -> None:
    """Credit the bytes to the input pool and reseed the CRNG from it now
    (a plain write to /dev/urandom would mix them in without a reseed)."""
    import fcntl

    if not entropy:
        return
    data = entropy + b"\0" * (-len(entropy) % 4)
    info = struct.pack("ii", len(entropy) * 8, len(data)) + data
    fd = os.open("/dev/random", os.O_WRONLY)
    try:
        fcntl.ioctl(fd, RNDADDENTROPY, info)
        fcntl.ioctl(fd, RNDRESEEDCRNG)
    finally:
        os.close(fd)


def set_clock(time_ns: int) -> None:
    if time_ns > 0:
        try:
            time.clock_settime_ns(time.CLOCK_REALTIME, time_ns)
        except OSError as exc:
            log("clock_settime", exc)
