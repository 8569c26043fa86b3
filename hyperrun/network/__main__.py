"""`python -m hyperrun.network install-config [CONF_DIR]`: write the default
conflist where no CNI config is (for `make setup`); `check [CONF_DIR]`:
say whether sandboxes can get CNI networks here, and why (not)."""
from __future__ import annotations

import sys
from pathlib import Path

from . import cni, default_config
from .sandbox_net import cni_available


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("install-config", "check"):
        print(__doc__, file=sys.stderr)
        return 2
    conf_dir = Path(argv[1]) if len(argv) > 1 else cni.DEFAULT_CONF_DIR
    if argv[0] == "install-config":
        path = default_config.install(conf_dir)
        print(f"wrote {path}" if path else f"{conf_dir} has a network config already: kept")
        return 0
    ok, reason = cni_available(conf_dir)
    print(("CNI available: " if ok else "CNI not available: ") + reason)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
