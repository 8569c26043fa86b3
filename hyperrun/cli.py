"""The `hyperrun` command line."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hyperrun",
                                description="Run OCI containers in lightweight virtual machines.")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a command in a new container, in its own VM")
    run.add_argument("--rootfs", type=Path, required=True,
                     help="directory to use as the container's root filesystem")
    run.add_argument("-i", "--interactive", action="store_true", help="keep stdin open")
    run.add_argument("-t", "--tty", action="store_true", help="allocate a pseudo-terminal")
    run.add_argument("-e", "--env", action="append", default=[], metavar="KEY=VALUE")
    run.add_argument("-w", "--workdir", default="", help="working directory in the container")
    run.add_argument("-u", "--user", default="", help="user[:group] (name or id)")
    run.add_argument("--hostname", default="")
    run.add_argument("--read-only", action="store_true", help="mount the rootfs read-only")
    run.add_argument("--cpus", type=int, default=1, help="vCPUs of the VM")
    run.add_argument("--memory", type=int, default=256, metavar="MIB", help="VM memory in MiB")
    run.add_argument("--machine", default="microvm", choices=["microvm", "q35"])
    run.add_argument("cmd", nargs=argparse.REMAINDER, help="command and arguments")

    sub.add_parser("check", help="show what this host can do and whether hyperrun can run")
    sub.add_parser("version", help="print the version")
    return p


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.command == "run":
        sys.exit(_run(args))
    if args.command == "check":
        from hyperrun import check
        sys.exit(check.main())
    if args.command == "version":
        from importlib.metadata import version
        print(f"hyperrun {version('hyperrun')}")


def _run(args: argparse.Namespace) -> int:
    from hyperrun.run import RunSpec, execute
    from hyperrun.sandbox.config import SandboxConfig

    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        print("hyperrun run: no command given", file=sys.stderr)
        return 125
    for item in args.env:
        if "=" not in item:
            print(f"hyperrun run: -e {item!r}: expected KEY=VALUE", file=sys.stderr)
            return 125
    spec = RunSpec(args=cmd, rootfs=args.rootfs, env=args.env, workdir=args.workdir,
                   user=args.user, stdin=args.interactive, terminal=args.tty,
                   hostname=args.hostname, readonly=args.read_only,
                   sandbox=SandboxConfig(vcpus=args.cpus, memory_mib=args.memory,
                                         machine=args.machine))
    try:
        return execute(spec)
    except KeyboardInterrupt:  # before the container ran; the VM is gone with us
        return 130


if __name__ == "__main__":
    main()
