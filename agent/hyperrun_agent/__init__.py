"""The hyperrun guest agent: PID 1 in the sandbox VM.

It mounts the kernel filesystems, reaps orphans, and serves the Agent API
(proto/agent.proto) over ttRPC on a virtio-serial port or vsock. Containers
are run by crun from OCI runtime specs the agent writes.

Every stdlib module imported here must be shipped in the guest image, which
agent/build_image.py computes from these sources; threads rather than
asyncio, because importing asyncio costs ~0.3 s at boot under TCG.
"""

VERSION = "0.1.0"
