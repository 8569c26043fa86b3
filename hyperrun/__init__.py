"""hyperrun: OCI images as lightweight virtual machines.

Kept empty on purpose: the guest image ships parts of this package
(the channel framing and generated protobuf code), so importing it must
pull in nothing else.
"""

import os as _os

# hyperrun forks QEMU and tools from processes that use gRPC, never to run
# gRPC in the child. grpcio's fork handlers are not needed there, and
# harmful: run while other threads are in gRPC, they left the child QEMU
# with its QMP socket refusing connections (seen with the embedded host).
_os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")
