"""The `hyperrun` command line: main (the entry point), parser (the
commands' options), commands (what each does), client (the daemon's
sessions seen from the CLI), terminal, and relay (a `run --rootfs`
process's stdio and signals).

Empty on purpose: every CLI call imports this package first, and what
each command needs is imported only by that command."""
