"""The `hyperrun` command line's entry point: parse, run the command, exit
with its code."""
from __future__ import annotations

import os
import sys

from hyperrun.cli import commands, parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        sys.exit(commands.bench(argv[1:]))
    args = parser.build().parse_args(argv)
    if getattr(args, "root", None):
        os.environ["HYPERRUN_ROOT"] = str(args.root)
    handler = {"run": commands.run, "pull": commands.pull, "images": commands.images,
               "rmi": commands.rmi, "load": commands.load, "daemon": commands.daemon,
               "check": commands.check, "compose": commands.compose, "version": commands.version,
               **dict.fromkeys(("pods", "ps", "stats", "exec", "logs", "stop", "rm", "inspect"),
                               commands.by_daemon)}[args.command]
    try:
        code = handler(args)
    except KeyboardInterrupt:
        # Ctrl-C ends the CLI quietly; what the daemon was doing for it goes
        # on (an exec's process, a pull), as under Docker.
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
