"""QMP client: qemu.qmp's, tolerant of events that precede the greeting.

QEMU can emit an event (VSERPORT_CHANGE when the guest opens the agent's
virtio-serial port) before the greeting of a monitor that is being
connected while the host is slow; qemu.qmp then fails the session. The
events are skipped until the greeting arrives, as Kata's govmm does.
Imported only where QMP is used: qemu.qmp loads asyncio.
"""
from __future__ import annotations

import logging

from qemu.qmp import QMPClient as _Base
from qemu.qmp.error import ProtocolError
from qemu.qmp.models import Greeting
from qemu.qmp.qmp_client import GreetingError

# qemu.qmp logs every negotiation; the VM's errors are reported by vm.qemu.
logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)

MAX_EARLY_EVENTS = 64


class QMPClient(_Base):
    async def _get_greeting(self) -> Greeting:
        for _ in range(MAX_EARLY_EVENTS):
            msg = await self._recv()
            if "event" in msg and "QMP" not in msg:
                continue
            try:
                return Greeting(msg)
            except (ProtocolError, KeyError, TypeError) as err:
                raise GreetingError("Did not understand Greeting", err) from err
        raise GreetingError("no greeting after many events", ProtocolError("events only"))
