"""Host <-> guest channel: ttRPC framing over virtio-serial or vsock.

Kept import-light: the guest agent ships `frame` from this package.
"""
