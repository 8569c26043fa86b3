"""The CRI's messages as the core's specs (hyperrun/specs.py), and the specs
back as the CRI's metadata, mounts and resources in statuses. The only
place that knows both."""
from __future__ import annotations

from hyperrun import annotations, errdefs
from hyperrun.specs import DNS, ContainerSpec, Mount, PodSpec, PortMapping, Resources
from hyperrun.proto import cri_api_pb2 as cri

_PROTOCOLS = {cri.TCP: "tcp", cri.UDP: "udp", cri.SCTP: "sctp"}
_PROPAGATION = {cri.PROPAGATION_PRIVATE: "private", cri.PROPAGATION_HOST_TO_CONTAINER: "rslave",
                cri.PROPAGATION_BIDIRECTIONAL: "rshared"}


def resources(r: cri.LinuxContainerResources) -> Resources:
    return Resources(cpu_period=r.cpu_period, cpu_quota=r.cpu_quota,
                     cpu_shares=max(r.cpu_shares, 0), memory_limit_bytes=r.memory_limit_in_bytes,
                     memory_swap_limit_bytes=r.memory_swap_limit_in_bytes,
                     cpuset_cpus=r.cpuset_cpus, cpuset_mems=r.cpuset_mems, unified=dict(r.unified))


def pod_spec(config: cri.PodSandboxConfig) -> PodSpec:
    meta, linux = config.metadata, config.linux
    limits = linux.resources if linux.HasField("resources") else cri.LinuxContainerResources()
    dns = config.dns_config
    return PodSpec(
        name=meta.name, namespace=meta.namespace, uid=meta.uid, attempt=meta.attempt,
        hostname=config.hostname, log_directory=config.log_directory,
        labels=dict(config.labels), annotations=dict(config.annotations),
        network=config.annotations.get(annotations.NETWORK, ""),
        host_network=linux.security_context.namespace_options.network == cri.NODE,
        ports=tuple(PortMapping(p.host_port, p.container_port, _PROTOCOLS.get(p.protocol, "tcp"),
                                p.host_ip) for p in config.port_mappings),
        dns=DNS(tuple(dns.servers), tuple(dns.searches), tuple(dns.options)),
        sysctls=dict(linux.sysctls),
        cpus=resources(limits).cpus, memory_limit_bytes=limits.memory_limit_in_bytes,
        overhead_memory_bytes=linux.overhead.memory_limit_in_bytes)


def user(sc: cri.LinuxContainerSecurityContext) -> str:
    """The CRI's user as Docker's -u: a name, or uid, and :gid."""
    name = sc.run_as_username or (str(sc.run_as_user.value) if sc.HasField("run_as_user") else "")
    if sc.HasField("run_as_group"):
        if not name:  # as containerd: a group alone would run as root with it
            raise errdefs.Invalid("run_as_group is set without run_as_user or run_as_username")
        return f"{name}:{sc.run_as_group.value}"
    return name


def _profile(sc: cri.LinuxContainerSecurityContext, field: str, path_field: str) -> str:
    """A seccomp or AppArmor profile as the deprecated string form has it:
    "unconfined", "runtime/default" or "localhost/<ref>". Unset is
    unconfined, as the kubelet means it (containerd's reading)."""
    if sc.HasField(field):
        profile = getattr(sc, field)
        if profile.profile_type == cri.SecurityProfile.Localhost:
            if not profile.localhost_ref:
                raise errdefs.Invalid(f"{field} profile: Localhost without a localhost_ref")
            return f"localhost/{profile.localhost_ref}"
        return "unconfined" if profile.profile_type == cri.SecurityProfile.Unconfined \
            else "runtime/default"
    given = getattr(sc, path_field)
    if given in ("", "unconfined"):
        return "unconfined"
    if given in ("runtime/default", "docker/default"):
        return "runtime/default"
    if given.startswith("localhost/"):
        return given
    raise errdefs.Invalid(f"{path_field} {given!r}: expected unconfined, runtime/default "
                          "or localhost/<path>")


_MODES = {cri.POD: "pod", cri.CONTAINER: "container", cri.NODE: "node"}


def _namespace(options: cri.NamespaceOption, kind: str) -> str:
    mode = getattr(options, kind)
    if mode == cri.TARGET:
        if kind != "pid" or not options.target_id:
            raise errdefs.Invalid("namespace mode TARGET: only for pid, with a target_id")
        return f"target:{options.target_id}"
    return _MODES[mode]


def _apparmor(sc: cri.LinuxContainerSecurityContext) -> None:
    """The guest kernel has no AppArmor: no profile is applied, and one of
    the node's (Localhost) is refused rather than silently not enforced."""
    profile = _profile(sc, "apparmor", "apparmor_profile")
    if profile.startswith("localhost/"):
        raise errdefs.Invalid(f"apparmor profile {profile}: the pod's VM kernel has no AppArmor "
                              "(its profiles are the node's); use RuntimeDefault or Unconfined")


def container_spec(config: cri.ContainerConfig) -> ContainerSpec:
    sc = config.linux.security_context
    _apparmor(sc)
    return ContainerSpec(
        name=config.metadata.name, attempt=config.metadata.attempt, image=config.image.image,
        command=tuple(config.command) or None, args=tuple(config.args),
        env=tuple(f"{kv.key}={kv.value}" for kv in config.envs), workdir=config.working_dir,
        user=user(sc), groups=tuple(sc.supplemental_groups),
        tty=config.tty, stdin=config.stdin, stdin_once=config.stdin_once,
        mounts=tuple(Mount(m.host_path, m.container_path, m.readonly,
                           _PROPAGATION.get(m.propagation, "private")) for m in config.mounts),
        log_path=config.log_path, readonly_rootfs=sc.readonly_rootfs, privileged=sc.privileged,
        add_capabilities=tuple(sc.capabilities.add_capabilities),
        drop_capabilities=tuple(sc.capabilities.drop_capabilities),
        pid=_namespace(sc.namespace_options, "pid"), ipc=_namespace(sc.namespace_options, "ipc"),
        no_new_privileges=sc.no_new_privs,
        seccomp=_profile(sc, "seccomp", "seccomp_profile_path"),
        masked_paths=tuple(sc.masked_paths), readonly_paths=tuple(sc.readonly_paths),
        resources=resources(config.linux.resources),
        labels=dict(config.labels), annotations=dict(config.annotations))


# ------------------------------------------------------------ and back

def pod_metadata(spec: PodSpec) -> cri.PodSandboxMetadata:
    return cri.PodSandboxMetadata(name=spec.name, uid=spec.uid, namespace=spec.namespace,
                                  attempt=spec.attempt)


def container_metadata(spec: ContainerSpec) -> cri.ContainerMetadata:
    return cri.ContainerMetadata(name=spec.name, attempt=spec.attempt)


def cri_mounts(spec: ContainerSpec) -> list[cri.Mount]:
    back = {v: k for k, v in _PROPAGATION.items()}
    return [cri.Mount(host_path=m.host_path, container_path=m.container_path,
                      readonly=m.readonly, propagation=back[m.propagation]) for m in spec.mounts]


def cri_resources(r: Resources) -> cri.LinuxContainerResources:
    return cri.LinuxContainerResources(
        cpu_period=r.cpu_period, cpu_quota=r.cpu_quota, cpu_shares=r.cpu_shares,
        memory_limit_in_bytes=r.memory_limit_bytes,
        memory_swap_limit_in_bytes=r.memory_swap_limit_bytes, cpuset_cpus=r.cpuset_cpus,
        cpuset_mems=r.cpuset_mems, unified=r.unified)


def migrate(state) -> int:
    """Records written before the specs (a state.db of an earlier daemon)
    hold the CRI's configs as protobufs: rewritten as specs, once. Returns
    how many."""
    n = 0
    for row in state.sandboxes():
        if not row.config.startswith(b"{"):
            state.set_sandbox_config(row.id, pod_spec(
                cri.PodSandboxConfig.FromString(row.config)).to_json())
            n += 1
    for row in state.containers():
        if not row.config.startswith(b"{"):
            state.update_container(row.id, config=container_spec(
                cri.ContainerConfig.FromString(row.config)).to_json())
            n += 1
    return n
