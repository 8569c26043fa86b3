"""hyperrun's own CRI annotations: what a client (the CLI) asks of the
daemon that the CRI has no field for. In a module of their own so that the
CLI can set them without importing the daemon's code (0.2 s)."""

# The platform to pull (`hyperrun pull --platform`); in the CRI the
# kubelet's node decides. On an ImageSpec.
PLATFORM = "io.hyperrun.platform"

# The pod's network kind (`hyperrun run --network`; sandbox/podnet.py). On a
# PodSandboxConfig.
NETWORK = "io.hyperrun.network"
