"""The pod/task core: pods (a sandbox VM, its network, its containers) and
their containers' tasks, made from the project's own specs (hyperrun/specs.py). It
knows nothing of the CRI or the CLI, which are its callers."""
