"""A container's seccomp filter as OCI `linux.seccomp` for crun.

Three kinds, as the CRI has them: none (unconfined: what the CRI's unset
profile means), the runtime's default, and a profile the host read from a
file of the node (Docker's format: `defaultAction`, `syscalls` with `names`
and `action`, optionally `architectures`/`archMap`, `defaultErrnoRet`, and
`includes`/`excludes` by capability). A privileged container gets none.

The default is a deny list where Docker's is an allow list: every system
call is allowed but those Docker's documentation lists as blocked by its
default profile (kernel keyrings, modules, kexec, clock setting, swap, raw
I/O ports, mount and namespace calls, ...), each allowed again when the
container holds the capability that makes it safe, as Docker's profile
does. Inside a VM the kernel is the pod's own: the filter narrows what a
container can ask of it, the VM stays the boundary.
"""
from __future__ import annotations

import json
import platform

EPERM = 1

# Denied unless the container has the capability in front (None: always).
_DENIED: dict[str | None, tuple[str, ...]] = {
    None: ("add_key", "keyctl", "request_key", "kexec_load", "kexec_file_load",
           "nfsservctl", "query_module", "get_kernel_syms", "create_module", "uselib",
           "userfaultfd", "ustat", "sysfs", "_sysctl"),
    "CAP_SYS_ADMIN": ("mount", "umount2", "unshare", "setns", "pivot_root", "quotactl",
                      "fanotify_init", "lookup_dcookie", "name_to_handle_at", "fsopen",
                      "fsconfig", "fsmount", "fspick", "move_mount", "open_tree",
                      "swapon", "swapoff"),
    "CAP_BPF": ("bpf",),
    "CAP_PERFMON": ("perf_event_open",),
    "CAP_DAC_READ_SEARCH": ("open_by_handle_at",),
    "CAP_SYS_BOOT": ("reboot",),
    "CAP_SYS_MODULE": ("init_module", "finit_module", "delete_module"),
    "CAP_SYS_PTRACE": ("process_vm_readv", "process_vm_writev", "kcmp"),
    "CAP_SYS_RAWIO": ("iopl", "ioperm"),
    "CAP_SYS_TIME": ("settimeofday", "clock_settime", "clock_adjtime"),
    "CAP_SYS_TTY_CONFIG": ("vhangup",),
    "CAP_SYS_NICE": ("get_mempolicy", "set_mempolicy", "mbind", "move_pages"),
    "CAP_SYS_PACCT": ("acct",),
    "CAP_SYSLOG": ("syslog",),
    "CAP_SYS_CHROOT": ("chroot",),
}

# libseccomp's names for this machine's architectures (the native one and
# the compat ones a 64-bit kernel also runs).
_ARCHES = {"x86_64": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
           "aarch64": ["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"]}


class ProfileError(ValueError):
    pass


def _arches() -> list[str]:
    return _ARCHES.get(platform.machine(), [])


def runtime_default(caps: list[str]) -> dict:
    denied = sorted(name for cap, names in _DENIED.items() if cap is None or cap not in caps
                    for name in names)
    return {"defaultAction": "SCMP_ACT_ALLOW", "architectures": _arches(),
            "syscalls": [{"names": denied, "action": "SCMP_ACT_ERRNO", "errnoRet": EPERM}]}


def _applies(rule: dict, caps: list[str], arch: str) -> bool:
    """Docker's includes/excludes: a rule for some capabilities or
    architectures only (others, kernel versions, are not filtered on)."""
    inc, exc = rule.get("includes") or {}, rule.get("excludes") or {}
    if inc.get("caps") and not all(c in caps for c in inc["caps"]):
        return False
    if inc.get("arches") and arch not in inc["arches"]:
        return False
    if exc.get("caps") and any(c in caps for c in exc["caps"]):
        return False
    if exc.get("arches") and arch in exc["arches"]:
        return False
    return True


def from_profile(text: str, caps: list[str]) -> dict:
    """A profile file's JSON (Docker's format, which OCI's extends) as OCI
    linux.seccomp; a ProfileError that says what is wrong with it."""
    try:
        profile = json.loads(text)
    except ValueError as exc:
        raise ProfileError(f"seccomp profile is not JSON: {exc}") from None
    if not isinstance(profile, dict) or not isinstance(profile.get("defaultAction"), str):
        raise ProfileError("seccomp profile has no defaultAction")
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
    spec: dict = {"defaultAction": profile["defaultAction"]}
    if "defaultErrnoRet" in profile:
        spec["defaultErrnoRet"] = profile["defaultErrnoRet"]
    if profile.get("architectures"):
        spec["architectures"] = list(profile["architectures"])
    elif profile.get("archMap"):
        native = _arches()[:1]
        for entry in profile["archMap"]:
            if entry.get("architecture") in native:
                spec["architectures"] = [entry["architecture"], *entry.get("subArchitectures", [])]
    syscalls = []
    for rule in profile.get("syscalls") or []:
        if not isinstance(rule, dict) or not isinstance(rule.get("action"), str):
            raise ProfileError(f"seccomp profile: a rule without an action: {rule!r}")
        names = rule.get("names") or ([rule["name"]] if rule.get("name") else [])
        if not names or not _applies(rule, caps, arch):
            continue
        out = {"names": list(names), "action": rule["action"]}
        for key in ("errnoRet", "args"):
            if rule.get(key) is not None:
                out[key] = rule[key]
        syscalls.append(out)
    if syscalls:
        spec["syscalls"] = syscalls
    return spec


def linux_seccomp(request, caps: list[str], privileged: bool) -> dict | None:
    """The filter a CreateContainerRequest asks for (its `seccomp`), or
    None for none."""
    if privileged or not request.HasField("seccomp"):
        return None
    if request.seccomp.profile:
        return from_profile(request.seccomp.profile, caps)
    return runtime_default(caps)
