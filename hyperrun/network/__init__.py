"""Sandbox networking on the host: a netns per sandbox, configured by the
standard CNI plugins, with a tap joined to the CNI interface by tc mirred
redirects for QEMU's virtio-net. See docs/NETWORK.md."""
from .cni import CNIError
from .default_config import default_conflist
from .default_config import install as install_default_config
from .sandbox_net import NetworkInfo, PortMapping, SandboxNetworks, cni_available, open_tap

__all__ = ["CNIError", "NetworkInfo", "PortMapping", "SandboxNetworks", "cni_available",
           "default_conflist", "install_default_config", "open_tap"]
