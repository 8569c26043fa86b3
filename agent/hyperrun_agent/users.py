"""Resolve a user spec ("name", "uid", "name:group", "uid:gid") against a
container's own /etc/passwd and /etc/group, as Docker does."""
import os


class UserError(ValueError):
    pass


def _read_db(path: str) -> list[list[str]]:
    try:
        with open(path, errors="replace") as f:
            return [line.rstrip("\n").split(":") for line in f
                    if line.strip() and not line.startswith("#")]
    except FileNotFoundError:
        return []


def resolve(rootfs: str, spec: str) -> tuple[int, int, list[int], str]:
    """Returns (uid, gid, additional gids, home) for spec in rootfs."""
    spec = spec or "0"
    user, _, group = spec.partition(":")
    passwd = _read_db(os.path.join(rootfs, "etc/passwd"))
    groups = _read_db(os.path.join(rootfs, "etc/group"))

    entry = next((e for e in passwd if len(e) >= 4 and (e[0] == user or e[2] == user)), None)
    if entry is not None:
        uid, gid, name = int(entry[2]), int(entry[3]), entry[0]
        home = entry[5] if len(entry) > 5 and entry[5] else "/"
    elif user.isdigit():
        uid, gid, name, home = int(user), 0, "", "/"
    else:
        raise UserError(f"unable to find user {user}: no matching entries in passwd file")

    if group:
        gentry = next((g for g in groups if len(g) >= 3 and (g[0] == group or g[2] == group)), None)
        if gentry is not None:
            gid = int(gentry[2])
        elif group.isdigit():
            gid = int(group)
        else:
            raise UserError(f"unable to find group {group}: no matching entries in group file")

    extra: list[int] = []
    if name:
        for g in groups:
            if len(g) >= 4 and name in g[3].split(",") and g[2].isdigit():
                gid_extra = int(g[2])
                if gid_extra != gid and gid_extra not in extra:
                    extra.append(gid_extra)
    return uid, gid, extra, home
