"""The command line's grammar: every command and its options."""
from __future__ import annotations

import argparse
from pathlib import Path


def build() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hyperrun",
                                description="Run OCI containers in lightweight virtual machines.")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a command in a new container, in its own VM",
                         usage="hyperrun run [OPTIONS] IMAGE [CMD...]\n"
                               "       hyperrun run [OPTIONS] --rootfs DIR [--] CMD...")
    run.add_argument("--name", default="", help="the container's name (unique; usable wherever "
                     "an id is)")
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
    run.add_argument("--cap-add", action="append", default=[], metavar="CAP",
                     help="add a Linux capability to Docker's default set (ALL: every one)")
    run.add_argument("--cap-drop", action="append", default=[], metavar="CAP",
                     help="drop a Linux capability (ALL: all of the default set)")
    run.add_argument("--ulimit", action="append", default=[], metavar="NAME=SOFT[:HARD]",
                     help="a resource limit (nofile, nproc, memlock, ...; default nofile "
                          "1048576, Docker's)")
    run.add_argument("--security-opt", action="append", default=[], metavar="OPT",
                     help="seccomp=unconfined|PROFILE.json (default: the runtime's filter), "
                          "no-new-privileges")
    run.add_argument("--restart", default="no", metavar="POLICY",
                     help="with -d: no, always, on-failure[:N] or unless-stopped (the daemon "
                          "makes the exited container again)")
    run.add_argument("--platform", default="linux/amd64", help="os/arch of the image to pull")
    run.add_argument("--pull", default="missing", choices=["missing", "always", "never"])
    run.add_argument("--cpus", type=int, help="CPU limit, and the VM's vCPUs (default: the "
                                              "config's, 1; no limit in the VM)")
    run.add_argument("--memory", type=int, metavar="MIB",
                     help="memory limit in MiB (the VM gets the pod overhead on top; default: "
                          "the config's VM size, 256, and no limit in the VM)")
    run.add_argument("--machine", default=None, choices=["microvm", "q35"],
                     help="the VM's machine type (without a daemon; default: the config's, "
                          "microvm)")
    run.add_argument("--direct", action="store_true",
                     help="the image's program as the VM's init: no agent, no container "
                          "(Lupine-style; output and exit code still come back)")
    run.add_argument("--template", action="store_true",
                     help="without a daemon: restore a saved VM instead of booting (made on "
                          "first use; the default with [sandbox] template = true)")
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
    ins = sub.add_parser("inspect", help="containers as JSON, with their VMs (daemon)")
    ins.add_argument("containers", nargs="+")
    rmc = sub.add_parser("rm", help="remove containers (daemon)")
    rmc.add_argument("-f", "--force", action="store_true", help="kill a running one first")
    rmc.add_argument("containers", nargs="+")

    _compose(sub)

    daemon = sub.add_parser("daemon", help="serve the Kubernetes CRI v1 API on a unix socket")
    daemon.add_argument("--socket", type=Path, help="default /run/hyperrun/hyperrun.sock as root")
    daemon.add_argument("--group", help="group owning the socket (mode 0660): who may use "
                                        "the runtime besides root")
    daemon.add_argument("--network", default="auto", choices=["auto", "cni", "user", "none"],
                        help="how pods get a network (auto: CNI where it works, else user-mode)")
    daemon.add_argument("--cni-conf-dir", type=Path, help="default /etc/cni/net.d")
    daemon.add_argument("--pool-size", type=int, metavar="N",
                        help="spare VMs kept started for pods to take (default: the "
                             "config file's [sandbox] pool_size, else auto: one per 2 GiB "
                             "available, at most 2, from the first pod on)")
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


def _compose(sub) -> None:
    """`hyperrun compose`: a compose file's services, each a detached run
    of the daemon's (hyperrun/cli/compose.py)."""
    c = sub.add_parser("compose", help="run a compose file's services, each in its own VM "
                                       "(daemon)")
    c.add_argument("-f", "--file", help="the compose file (default: compose.yaml or "
                                        "docker-compose.yml here)")
    c.add_argument("-p", "--project-name", help="the project's name (default: the file's "
                                                "name:, else its directory's)")
    csub = c.add_subparsers(dest="compose_command", required=True)
    up = csub.add_parser("up", help="create and start the services (their dependencies first)")
    up.add_argument("-d", "--detach", action="store_true", help="return once they are started")
    up.add_argument("--force-recreate", action="store_true",
                    help="re-create the containers even if their configuration is unchanged")
    up.add_argument("services", nargs="*")
    csub.add_parser("down", help="stop and remove the project's containers (volumes stay)")
    ps = csub.add_parser("ps", help="the project's containers, with their health")
    ps.add_argument("-a", "--all", action="store_true", help="stopped ones too")
    lg = csub.add_parser("logs", help="the services' output, each line after its container")
    lg.add_argument("-f", "--follow", action="store_true")
    lg.add_argument("-n", "--tail", type=_tail, default=None, metavar="N")
    lg.add_argument("services", nargs="*")
    ex = csub.add_parser("exec", help="run a command in a service's container")
    ex.add_argument("-T", "--no-tty", action="store_true", help="no pseudo-terminal")
    ex.add_argument("service")
    ex.add_argument("cmd", nargs=argparse.REMAINDER)


def _tail(text: str) -> int | None:
    """logs --tail: a count of lines, or "all" (Docker's spelling of none)."""
    if text == "all":
        return None
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a number of lines or \"all\", not {text!r}")
    return int(text)
