"""The `hyperrun` command line: main (the entry point), client (the
daemon's sessions seen from the CLI), terminal and relay (stdio of a
`run --rootfs` process).

Empty on purpose: every CLI call imports this package first, and what
each command needs is imported only by that command."""
