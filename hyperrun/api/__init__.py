"""The daemon's client API: the Kubernetes CRI v1 over gRPC on a unix socket."""
