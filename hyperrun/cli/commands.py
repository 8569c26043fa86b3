"""The commands: each takes its parsed arguments and returns the exit code."""
from __future__ import annotations

import argparse
import os
import sys

from hyperrun import exitcodes


def by_daemon(args: argparse.Namespace) -> int:
    """pods, ps, stats, exec, logs, stop, rm and inspect: what only a daemon
    does."""
    from hyperrun.cli import client

    try:
        if args.command == "pods":
            return client.pods()
        if args.command == "ps":
            return client.ps(args.all)
        if args.command == "stats":
            return client.stats()
        if args.command == "exec":
            cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
            return client.exec_(args.container, cmd, args.interactive, args.tty)
        if args.command == "logs":
            return client.logs(args.container, args.follow, args.tail, args.timestamps)
        if args.command == "stop":
            return client.stop(args.containers, args.time)
        if args.command == "inspect":
            return client.inspect(args.containers)
        return client.rm(args.containers, args.force)
    except client.NoDaemon as exc:
        return _fail(str(exc))


def compose(args: argparse.Namespace) -> int:
    from hyperrun.cli import compose
    return compose.main(args)


def _fail(message: str, code: int = 1) -> int:
    print(f"hyperrun: {message}", file=sys.stderr)
    return code


def run(args: argparse.Namespace) -> int:
    """`run IMAGE`, `run --rootfs DIR` and `run --direct IMAGE` are one
    request to the core (the daemon's, or the same services in this
    process): the container's root one of two kinds (an image, a host
    directory), the VM's init one of two (the agent, or the program)."""
    rest = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    entrypoint = None if args.entrypoint is None else [args.entrypoint]
    image, rootfs = "", ""
    if args.rootfs is None:
        if not rest:
            print("hyperrun run: give an IMAGE, or --rootfs DIR", file=sys.stderr)
            return 125
        image, rest = rest[0], rest[1:]
        rest = rest[1:] if rest[:1] == ["--"] else rest
    else:
        if args.direct:
            return _fail("--direct runs an image's program as the VM's init: give an IMAGE, "
                         "not --rootfs", exitcodes.RUNTIME_ERROR)
        if not rest and entrypoint is None:
            return _fail("--rootfs DIR needs a command: no image describes one",
                         exitcodes.RUNTIME_ERROR)
        if not args.rootfs.is_dir():
            return _fail(f"rootfs {args.rootfs} is not a directory", exitcodes.RUNTIME_ERROR)
        rootfs = str(args.rootfs.resolve())
    from hyperrun.cli import client
    return client.run(client.RunOptions(
        image=image, rootfs=rootfs, name=args.name, direct=args.direct, args=rest, entrypoint=entrypoint,
        env=args.env, workdir=args.workdir, user=args.user, stdin=args.interactive,
        tty=args.tty, hostname=args.hostname, readonly=args.read_only, volumes=args.volume,
        cap_add=args.cap_add, cap_drop=args.cap_drop,
        security_opt=[_security_opt(o) for o in args.security_opt], ulimits=args.ulimit,
        platform=args.platform, pull=args.pull, cpus=args.cpus, memory_mib=args.memory,
        remove=args.rm, detach=args.detach, ports=args.publish, network=args.network,
        restart=args.restart),
        template=args.template or None, machine=args.machine)


def _security_opt(option: str) -> str:
    """A seccomp profile is named by its absolute path: the daemon reads it."""
    key, eq, value = option.partition("=")
    if key == "seccomp" and eq and value not in ("unconfined", "default", "runtime/default"):
        return f"seccomp={os.path.abspath(value)}"
    return option


def _images_service():
    from hyperrun.image.service import ImageService
    return ImageService()


def pull(args: argparse.Namespace) -> int:
    import asyncio

    from hyperrun.cli import client

    if (sock := client.daemon_socket()) is not None:
        return client.pull(sock, args.image, args.platform, args.quiet)

    from hyperrun.image.distribution import PullError
    from hyperrun.image.reference import InvalidReference
    from hyperrun.image.service import ImageError

    service = _images_service()
    try:
        image = asyncio.run(service.pull(args.image, platform=args.platform,
                                         progress=not args.quiet and sys.stderr.isatty()))
    except (PullError, InvalidReference, ImageError) as exc:
        return _fail(str(exc))
    finally:
        service.close()
    print(f"Digest: {image.digest}" if not args.quiet else image.digest)
    return 0


def images(args: argparse.Namespace) -> int:
    """The daemon's images (its store may be another), else this store's."""
    from hyperrun.cli import client

    if (sock := client.daemon_socket()) is not None:
        rows = client.images(sock)
    else:
        service = _images_service()
        try:
            rows = service.listing()
        finally:
            service.close()
    return client.table([("REPOSITORY", "TAG", "DIGEST", "IMAGE ID", "SIZE", "COMPRESSED"),
                         *rows])


def rmi(args: argparse.Namespace) -> int:
    from hyperrun.cli import client
    from hyperrun.image.service import ImageError

    if (sock := client.daemon_socket()) is not None:
        return client.rmi(sock, args.images)
    service = _images_service()
    status = 0
    for name in args.images:
        try:
            for line in service.remove(name):
                print(line)
        except ImageError as exc:
            status = _fail(str(exc))
    service.close()
    return status


def load(args: argparse.Namespace) -> int:
    from hyperrun.image.archive import load
    from hyperrun.image.service import ImageError

    service = _images_service()
    try:
        for line in load(service, args.input):
            print(line)
    except ImageError as exc:
        return _fail(str(exc))
    finally:
        service.close()
    return 0


def daemon(args: argparse.Namespace) -> int:
    from hyperrun.api.server import NetworkOptions, main
    return main(args.socket, NetworkOptions(
        args.network, args.cni_conf_dir,
        args.cni_bin_dir.split(":") if args.cni_bin_dir else None), args.group, args.pool_size)


def bench(argv: list[str]) -> int:
    from hyperrun import bench

    bench.main(argv, prog="hyperrun bench")
    return 0


def check(args: argparse.Namespace) -> int:
    from hyperrun import check
    return check.main()


def version(args: argparse.Namespace) -> int:
    from importlib.metadata import version
    print(f"hyperrun {version('hyperrun')}")
    return 0
