"""What the Debian package runs when synwatch is removed (``prerm``), after the service has
stopped: put back every kernel setting synwatch changed and still holds (the service does it
when an incident closes or it stops cleanly; after a crash the value waits in the history).

    python -m synwatch.uninstall
"""

from __future__ import annotations

import logging
import sys

from synwatch.actions.syncookies import SYSCTL
from synwatch.actions.synproxy import LOOSE
from synwatch.config import load_config
from synwatch.errors import SynwatchError
from synwatch.store import Store
from synwatch.sysctl import write_sysctl

log = logging.getLogger("synwatch.uninstall")


def restore_settings(storage_url: str, host: str | None = None) -> int:
    """This node's settings put back (a fleet's history holds every node's); a history that
    does not exist holds none."""
    store = Store.open_existing(storage_url, host=host)
    if store is None:
        return 0
    done = 0
    for netns, name, value in store.saved_settings():
        if name not in (SYSCTL, LOOSE):  # the sysctls synwatch changes
            continue
        try:
            write_sysctl(netns, name, int(value))
        except (OSError, SynwatchError, ValueError) as exc:
            log.warning("cannot put back %s=%s in %s: %s", name, value, netns or "the host", exc)
            continue
        store.forget_setting(netns, name)
        log.info("put back %s=%s in %s", name, value, netns or "the host's namespace")
        done += 1
    store.close()
    return done


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="synwatch: %(message)s")
    try:
        config = load_config(None)
        restore_settings(config.storage_url, config.host)
    except SynwatchError as exc:
        log.warning("%s", exc)  # a removal must not fail on it
    return 0


if __name__ == "__main__":
    sys.exit(main())
