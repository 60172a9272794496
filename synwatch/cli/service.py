"""`synwatch run`, `replay`, `try` and `check-config`: the service, what it would have done with
a recording, what it makes of three floods on this kernel, and whether a configuration and this
machine can run it."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from typing import Any

from synwatch.cli.common import add_config, add_format, command, load
from synwatch.errors import ConfigError


def cmd_run(args: argparse.Namespace) -> int:
    from synwatch.daemon.preflight import check_secrets  # noqa: PLC0415
    from synwatch.daemon.service import Service  # noqa: PLC0415

    config = load(args)
    for check in check_secrets(config):  # once, at the start
        logging.getLogger("synwatch").warning("%s: %s", check.subject, check.text)
    return Service(config, args.config, record=args.record).run()


def cmd_replay(args: argparse.Namespace) -> int:
    from synwatch.cli.render import dumps, print_incident_rows  # noqa: PLC0415
    from synwatch.cli.views import change_view  # noqa: PLC0415
    from synwatch.detect.replay import recorded_settings, replay  # noqa: PLC0415

    # the settings the recording was made with, unless a configuration is named
    recorded = None if args.config else recorded_settings(args.recording)
    if recorded is not None:
        thresholds, quiet = recorded
    else:
        config = load(args)
        thresholds, quiet = config.thresholds, config.quiet_period
    rows = [change_view(c) for c in replay(args.recording, thresholds, quiet)]
    if args.format == "json":
        print(dumps(rows))
        return 0
    print_incident_rows(rows, sys.stdout)
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    from synwatch.daemon.preflight import preflight  # noqa: PLC0415

    config = load(args)  # a malformed file stops here, with one line naming the key
    checks = preflight(config)
    for check in checks:
        print(check.line())
    failed = [c for c in checks if c.outcome == "fail"]
    if failed:
        first = failed[0]
        raise ConfigError(config.path, first.subject, first.text
                          + (f" (and {len(failed) - 1} more above)" if len(failed) > 1 else ""))
    print(f"{config.path}: OK")
    return 0


def cmd_try(args: argparse.Namespace) -> int:
    from synwatch.cli.render import dumps, print_judged, print_trial_end  # noqa: PLC0415
    from synwatch.cli.trial import FLOODS, QUIET, Stopped, Trial, can_try  # noqa: PLC0415
    from synwatch.cli.views import judged_view  # noqa: PLC0415

    can_try()
    config = load(args)
    trial = Trial(config)
    judged = []
    if args.format == "table":
        print(f"synwatch try: {len(FLOODS)} short floods on this kernel, judged by `synwatch run` "
              f"with {config.path} in a dry run, watching only a throwaway network namespace; "
              f"a throwaway history, incidents closed after {QUIET:.0f} s of quiet", flush=True)
    try:
        for one in trial.floods():
            judged.append(one)
            if args.format == "table":
                print_judged(len(judged), one, sys.stdout)
                sys.stdout.flush()
    except Stopped:  # SIGTERM or SIGHUP: cleaned up, as a shell reports a signal's end
        return 128 + signal.SIGTERM
    finally:
        trial.clean_up()
    if args.format == "json":
        print(dumps({"floods": [judged_view(j) for j in judged]}))
    else:
        print_trial_end(judged, sys.stdout)
    return 0 if all(j.as_expected for j in judged) else 1


def register(sub: Any) -> None:
    p = command(sub, "run", cmd_run, "run the service in the foreground")
    p.add_argument("--record", metavar="FILE",
                   help="append every probe and kernel event to FILE (JSON lines) for replay")
    add_config(p)
    p = command(sub, "replay", cmd_replay,
                "the incidents a recording (run --record) leads to, with the settings it was "
                "recorded with (or those of --config); records nothing")
    p.add_argument("recording", metavar="FILE")
    add_format(p)
    add_config(p)
    p = command(sub, "try", cmd_try,
                "as root: three short floods in throwaway network namespaces, judged with this "
                "configuration in a dry run; the host and its history are left as they are")
    add_format(p)
    add_config(p)
    p = command(sub, "check-config", cmd_check_config,
                "check a configuration file, then this machine against it")
    add_config(p)
