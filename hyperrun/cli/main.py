"""The `hyperrun` command line."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hyperrun",
                                description="Run OCI containers in lightweight virtual machines.")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a command in a new container, in its own VM",
                         usage="hyperrun run [OPTIONS] IMAGE [CMD...]\n"
                               "       hyperrun run [OPTIONS] --rootfs DIR [--] CMD...")
    run.add_argument("--rootfs", type=Path,
                     help="host directory to use as the root filesystem instead of an image")
    run.add_argument("--rm", action="store_true",
                     help="remove the container when it exits (always so without a daemon)")
    run.add_argument("-d", "--detach", action="store_true",
                     help="run in the daemon's pod VM and print the container id")
    run.add_argument("-p", "--publish", action="append", default=[],
                     metavar="[HOSTIP:]HOSTPORT:PORT[/PROTO]", help="publish a container port")
    run.add_argument("--network", default="auto", choices=["auto", "cni", "user", "none"],
                     help="the pod's network (auto: CNI where it works, else user-mode)")
    run.add_argument("-v", "--volume", action="append", default=[], metavar="HOST:CONTAINER[:ro]",
                     help="bind a host directory or file into the container")
    run.add_argument("-i", "--interactive", action="store_true", help="keep stdin open")
    run.add_argument("-t", "--tty", action="store_true", help="allocate a pseudo-terminal")
    run.add_argument("-e", "--env", action="append", default=[], metavar="KEY=VALUE")
    run.add_argument("-w", "--workdir", default="", help="working directory in the container")
    run.add_argument("-u", "--user", default="", help="user[:group] (name or id)")
    run.add_argument("--entrypoint", default=None, help="override the image's entrypoint")
    run.add_argument("--hostname", default="")
    run.add_argument("--read-only", action="store_true", help="mount the rootfs read-only")
    run.add_argument("--platform", default="linux/amd64", help="os/arch of the image to pull")
    run.add_argument("--pull", default="missing", choices=["missing", "always", "never"])
    run.add_argument("--cpus", type=int, help="CPU limit, and the VM's vCPUs (default: the "
                                              "config's, 1; no limit in the VM)")
    run.add_argument("--memory", type=int, metavar="MIB",
                     help="memory limit in MiB (the VM gets the pod overhead on top; default: "
                          "the config's VM size, 256, and no limit in the VM)")
    run.add_argument("--machine", default="microvm", choices=["microvm", "q35"])
    run.add_argument("--direct", action="store_true",
                     help="the image's program as the VM's init: no agent, no container "
                          "(Lupine-style; output and exit code still come back)")
    run.add_argument("--template", action="store_true",
                     help="with --rootfs: restore a saved VM instead of booting (made on first "
                          "use; the default with [sandbox] template = true)")
    run.add_argument("cmd", nargs=argparse.REMAINDER, help="image, command and arguments")

    pull = sub.add_parser("pull", help="pull an image from a registry")
    pull.add_argument("image")
    pull.add_argument("--platform", default="linux/amd64")
    pull.add_argument("-q", "--quiet", action="store_true")

    sub.add_parser("images", help="list images")

    rmi = sub.add_parser("rmi", help="remove images")
    rmi.add_argument("images", nargs="+")

    load = sub.add_parser("load", help="load images from a docker save archive or OCI layout")
    load.add_argument("-i", "--input", required=True, type=Path)

    sub.add_parser("pods", help="list the daemon's pod sandboxes")
    ps = sub.add_parser("ps", help="list the daemon's containers")
    ps.add_argument("-a", "--all", action="store_true", help="exited ones too")
    sub.add_parser("stats", help="running containers' CPU and memory, and their VMs' host "
                                 "memory (PSS)")
    ex = sub.add_parser("exec", help="run a command in a running container (daemon)")
    ex.add_argument("-i", "--interactive", action="store_true", help="keep stdin open")
    ex.add_argument("-t", "--tty", action="store_true", help="allocate a pseudo-terminal")
    ex.add_argument("container")
    ex.add_argument("cmd", nargs=argparse.REMAINDER)
    lg = sub.add_parser("logs", help="a container's output (daemon)")
    lg.add_argument("-f", "--follow", action="store_true")
    lg.add_argument("-n", "--tail", type=_tail, default=None, metavar="N",
                    help="only the last N lines (\"all\": every line, the default)")
    lg.add_argument("-t", "--timestamps", action="store_true",
                    help="each line with the time it was written")
    lg.add_argument("container")
    st = sub.add_parser("stop", help="stop containers (daemon)")
    st.add_argument("-t", "--time", type=int, default=10, help="seconds before SIGKILL")
    st.add_argument("containers", nargs="+")
    rmc = sub.add_parser("rm", help="remove containers (daemon)")
    rmc.add_argument("containers", nargs="+")

    daemon = sub.add_parser("daemon", help="serve the Kubernetes CRI v1 API on a unix socket")
    daemon.add_argument("--socket", type=Path, help="default /run/hyperrun/hyperrun.sock as root")
    daemon.add_argument("--group", help="group owning the socket (mode 0660): who may use "
                                        "the runtime besides root")
    daemon.add_argument("--network", default="auto", choices=["auto", "cni", "user", "none"],
                        help="how pods get a network (auto: CNI where it works, else user-mode)")
    daemon.add_argument("--cni-conf-dir", type=Path, help="default /etc/cni/net.d")
    daemon.add_argument("--pool-size", type=int, metavar="N",
                        help="spare VMs kept started for pods to take (default: the "
                             "config file's [sandbox] pool_size, else 0)")
    daemon.add_argument("--cni-bin-dir", help="plugin directories, ':'-separated "
                                              "(default /opt/cni/bin:/usr/lib/cni)")

    sub.add_parser("check", help="show what this host can do and whether hyperrun can run")
    # Its options are hyperrun/bench.py's (`hyperrun bench --help`): main()
    # hands it the words after "bench" as they are.
    sub.add_parser("bench", add_help=False,
                   help="measure hyperrun against runc and the QEMU floor (what `make bench` "
                        "runs; from a source checkout)")
    sub.add_parser("version", help="print the version")
    for sp in (run, pull, sub.choices["images"], rmi, load, daemon):
        sp.add_argument("--root", type=Path, help="data root (images, metadata)")
    return p


def main(argv: list[str] | None = None) -> None:
    import os

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        sys.exit(_bench(argv[1:]))
    args = _parser().parse_args(argv)
    if getattr(args, "root", None):
        os.environ["HYPERRUN_ROOT"] = str(args.root)
    handler = {"run": _run, "pull": _pull, "images": _images, "rmi": _rmi, "load": _load,
               "daemon": _daemon, "check": _check, "version": _version, "pods": _client,
               "ps": _client, "stats": _client, "exec": _client, "logs": _client, "stop": _client,
               "rm": _client}[args.command]
    try:
        code = handler(args)
    except KeyboardInterrupt:
        # Ctrl-C ends the CLI quietly; what the daemon was doing for it goes
        # on (an exec's process, a pull), as under Docker.
        code = 130
    sys.exit(code)


def _client(args: argparse.Namespace) -> int:
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
        return client.rm(args.containers)
    except client.NoDaemon as exc:
        return _fail(str(exc))


def _tail(text: str) -> int | None:
    """logs --tail: a count of lines, or "all" (Docker's spelling of none)."""
    if text == "all":
        return None
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a number of lines or \"all\", not {text!r}")
    return int(text)


def _fail(message: str) -> int:
    print(f"hyperrun: {message}", file=sys.stderr)
    return 1


def _run(args: argparse.Namespace) -> int:
    """IMAGE runs go through the CRI services (the daemon's, or the same in
    this process); --rootfs DIR, which no image describes, boots a VM for
    that directory directly (hyperrun/run.py)."""
    rest = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if args.rootfs is None:
        if not rest:
            print("hyperrun run: give an IMAGE, or --rootfs DIR", file=sys.stderr)
            return 125
        image, rest = rest[0], rest[1:]
        rest = rest[1:] if rest[:1] == ["--"] else rest
        if args.direct:
            from hyperrun import direct
            return direct.run(image, rest, None if args.entrypoint is None else [args.entrypoint],
                              args.env, args.workdir, args.user, args.pull, args.platform,
                              _vm_size(args))
        from hyperrun.cli import client
        return client.run(client.RunOptions(
            image=image, args=rest, entrypoint=None if args.entrypoint is None else [args.entrypoint],
            env=args.env, workdir=args.workdir, user=args.user, stdin=args.interactive,
            tty=args.tty, hostname=args.hostname, readonly=args.read_only, volumes=args.volume,
            platform=args.platform, pull=args.pull, cpus=args.cpus, memory_mib=args.memory,
            remove=args.rm, detach=args.detach, ports=args.publish, network=args.network))
    if args.detach or args.volume or args.publish:
        return _fail("-d, -p and -v need an IMAGE (--rootfs DIR runs that directory directly)")
    from hyperrun.run import RunSpec, execute
    from hyperrun.sandbox.config import SandboxConfig

    for item in args.env:
        if "=" not in item:
            print(f"hyperrun run: -e {item!r}: expected KEY=VALUE", file=sys.stderr)
            return 125
    spec = RunSpec(args=rest, rootfs=args.rootfs, env=args.env, workdir=args.workdir,
                   entrypoint=None if args.entrypoint is None else [args.entrypoint],
                   user=args.user, stdin=args.interactive, terminal=args.tty,
                   hostname=args.hostname, readonly=args.read_only,
                   template=args.template or _config_template(),
                   sandbox=SandboxConfig(machine=args.machine, **_vm_size(args)))
    try:
        return execute(spec)
    except KeyboardInterrupt:  # before the container ran; the VM is gone with us
        return 130


def _vm_size(args: argparse.Namespace) -> dict:
    """--cpus/--memory as SandboxConfig keywords, where given."""
    return {k: v for k, v in (("vcpus", args.cpus), ("memory_mib", args.memory)) if v is not None}


def _config_template() -> bool:
    from hyperrun import config
    try:
        return config.load().template
    except config.ConfigError:
        return False


def _images_service():
    from hyperrun.image.service import ImageService
    return ImageService()


def _pull(args: argparse.Namespace) -> int:
    import asyncio

    from hyperrun.cli import client

    if (sock := client.daemon_session()) is not None:
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


def _images(args: argparse.Namespace) -> int:
    """The daemon's images (its store may be another), else this store's."""
    from hyperrun.cli import client

    if (sock := client.daemon_session()) is not None:
        rows = client.images(sock)
    else:
        service = _images_service()
        try:
            rows = service.listing()
        finally:
            service.close()
    return client.table([("REPOSITORY", "TAG", "DIGEST", "IMAGE ID", "SIZE"), *rows])


def _rmi(args: argparse.Namespace) -> int:
    from hyperrun.cli import client
    from hyperrun.image.service import ImageError

    if (sock := client.daemon_session()) is not None:
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


def _load(args: argparse.Namespace) -> int:
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


def _daemon(args: argparse.Namespace) -> int:
    from hyperrun.api.server import NetworkOptions, main
    return main(args.socket, NetworkOptions(
        args.network, args.cni_conf_dir,
        args.cni_bin_dir.split(":") if args.cni_bin_dir else None), args.group, args.pool_size)


def _bench(argv: list[str]) -> int:
    # The bench builds its images with the tests' helpers: from the source
    # checkout this hyperrun runs from (an editable install), wherever the
    # command is started.
    checkout = str(Path(__file__).resolve().parents[2])
    if checkout not in sys.path and (Path(checkout) / "tests").is_dir():
        sys.path.append(checkout)
    try:
        import importlib

        from hyperrun import bench
        importlib.import_module("tests.registry")  # the bench builds its images with it
    except ImportError as exc:
        return _fail(f"bench: run it from a hyperrun source checkout ({exc})")
    bench.main(argv, prog="hyperrun bench")
    return 0


def _check(args: argparse.Namespace) -> int:
    from hyperrun import check
    return check.main()


def _version(args: argparse.Namespace) -> int:
    from importlib.metadata import version
    print(f"hyperrun {version('hyperrun')}")
    return 0


if __name__ == "__main__":
    main()
