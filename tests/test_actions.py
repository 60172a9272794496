"""Actions as pure code: every preset's golden renders, the ban choice and its guards, bantime
increments, notification text, the exec environment, and the responder's dry run and retries."""

from __future__ import annotations

import ipaddress
import queue
import threading
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from synwatch.actions.banchoice import ALWAYS_PROTECTED, Guard, ban_seconds, choose
from synwatch.actions.exec import incident_env
from synwatch.actions.firewall import BanItem, Firewall, mask
from synwatch.actions.message import compose
from synwatch.actions.presets import load_presets, merge_batches, parse_preset
from synwatch.actions.registry import GROUP, Action, Plan, registered
from synwatch.actions.responder import Outcome, Responder
from synwatch.config import BanSettings, parse_config
from synwatch.config.validators import BAN_BACKENDS
from synwatch.errors import ActionFailed, ConfigError
from synwatch.records import ActionRun, Ban, BanTarget, IncidentChange
from synwatch.store import History
from synwatch.system.runner import Command, reason, show

PRESETS = load_presets()
SAMPLES = [(name, i) for name, p in PRESETS.items() for i in range(len(p.samples))]
NOW = datetime(2026, 11, 21, 9, 0, tzinfo=timezone.utc)


@pytest.mark.parametrize(("name", "index"), SAMPLES,
                         ids=[f"{n}-{PRESETS[n].samples[i]['step']}" for n, i in SAMPLES])
def test_every_preset_sample_renders_exactly(name: str, index: int) -> None:
    preset = PRESETS[name]
    sample = preset.samples[index]
    if sample["step"] == "list":
        family = sample["family"]
        got = preset.parse_list(sample["output"], family, 24 if family == 4 else 64)
        assert got == {p: (None if s == -1 else s) for p, s in sample["expect"].items()}
        return
    context = {"mask4": mask(4, 24), "mask6": mask(6, 64), **sample.get("context", {})}
    rendered = preset.render(sample["step"], context, sample.get("items"))
    assert show(rendered) == sample["expect"].strip("\n")


def test_the_shipped_presets_are_the_three_backends_the_bridge_path_and_the_rate_limit(
        ) -> None:
    assert {n: p.action for n, p in PRESETS.items()} == {
        "nftables": "ban", "ufw": "ban", "iptables-ipset": "ban", "nftables-path": "ban",
        "ratelimit-nftables": "ratelimit", "ratelimit-sources-nftables": "ratelimit"}
    assert [n for n, p in PRESETS.items() if p.kernel_timeouts] == [
        "iptables-ipset", "nftables-path", "nftables", "ratelimit-sources-nftables"]
    # the bridge path is chosen by `bridged`, never as a backend of its own
    assert "nftables-path" not in BAN_BACKENDS


def test_a_preset_step_without_a_sample_is_refused(tmp_path: Path) -> None:
    text = ('name = "x"\naction = "ban"\ndescription = "d"\n'
            '[[ban]]\nargv = ["true", "{prefix}"]\n')
    with pytest.raises(ConfigError, match="ban: has no sample"):
        parse_preset(text, "x.toml")


def test_nft_batches_merge_into_one_command_but_argv_commands_do_not() -> None:
    fw = Firewall(PRESETS["nftables"], v4_len=24, v6_len=64)
    rendered = fw.render_ban([BanItem("10.1.2.0/24", 60), BanItem("10.1.3.0/24", 60)])
    assert len(rendered) == 1 and rendered[0].stdin is not None
    assert rendered[0].stdin.count("timeout 60s") == 2
    ipset = Firewall(PRESETS["iptables-ipset"]).render_ban(
        [BanItem("10.1.2.0/24", 60), BanItem("10.1.3.0/24", 60)])
    assert [c.argv[1] for c in ipset] == ["add", "add"]
    checked = [Command(("a",), unless=("b",)), Command(("a",), unless=("b",))]
    assert merge_batches(checked) == checked


def test_masks_and_blocks_of_mixed_length() -> None:
    assert (mask(4, 24), mask(4, 16), mask(6, 64), mask(6, 48)) == (
        "255.255.255.0", "255.255.0.0", "ffff:ffff:ffff:ffff::", "ffff:ffff:ffff::")
    fw = Firewall(PRESETS["nftables"], v4_len=16, v6_len=48)
    assert "flags interval, timeout" in show(fw.render_setup())
    rendered = show(fw.render_ban([BanItem("10.99.32.0/22", 60), BanItem("10.98.7.0/24", 60)]))
    assert "{ 10.99.32.0/22 timeout 60s comment " in rendered
    assert "{ 10.98.7.0/24 timeout 60s comment " in rendered


GUARD = Guard((*ALWAYS_PROTECTED, (ipaddress.ip_network("192.0.2.0/24"), "allowlisted"),
               (ipaddress.ip_network("203.0.113.7/32"), "one of this host's addresses"),
               (ipaddress.ip_network("198.51.100.1/32"), "the default gateway")))


def test_guard_refuses_allowlist_loopback_own_addresses_and_gateway() -> None:
    assert GUARD.refuses("192.0.2.0/24") == "allowlisted (192.0.2.0/24)"
    assert GUARD.refuses("127.0.0.0/24") == "loopback (127.0.0.0/8)"
    assert GUARD.refuses("203.0.113.0/24") == "one of this host's addresses (203.0.113.7/32)"
    assert GUARD.refuses("198.51.100.0/24") == "the default gateway (198.51.100.1/32)"
    assert GUARD.refuses("10.0.0.0/24") is None
    assert GUARD.refuses("::1/128") == "loopback (::1/128)"
    assert GUARD.refuses("2001:db8::/64") is None


def _targets(*blocks: str | tuple[str, tuple[str, ...]]) -> list[BanTarget]:
    """Ban targets as the verdict gives them: a block, or a block and the parts it joins."""
    out = []
    for b in blocks:
        prefix, parts = (b, (b,)) if isinstance(b, str) else b
        out.append(BanTarget(prefix, 100, 0.25, parts, f"{prefix}: test"))
    return out


def test_choose_bans_the_targets_and_says_why_it_refuses_the_others() -> None:
    targets = _targets("10.0.1.0/24", "192.0.2.0/24", "10.0.2.0/24")
    c = choose(targets, settings=BanSettings(), guard=GUARD, seen=set(), banned_here=0,
               active_total=0)
    assert c.ban == ("10.0.1.0/24", "10.0.2.0/24")
    assert c.refused == (("192.0.2.0/24", "allowlisted (192.0.2.0/24)"),)
    again = choose(targets, settings=BanSettings(), guard=GUARD,
                   seen={"10.0.1.0/24", "192.0.2.0/24"}, banned_here=1, active_total=1)
    assert again.ban == ("10.0.2.0/24",) and again.refused == ()


def test_a_block_the_guard_refuses_is_tried_part_by_part() -> None:
    parts = tuple(f"192.0.{n}.0/24" for n in (0, 1, 2, 3))
    c = choose(_targets(("192.0.0.0/22", parts)), settings=BanSettings(), guard=GUARD,
               seen=set(), banned_here=0, active_total=0)
    assert c.ban == ("192.0.0.0/24", "192.0.1.0/24", "192.0.3.0/24")
    assert c.refused == (("192.0.2.0/24", "allowlisted (192.0.2.0/24)"),)
    # inside a block banned before: nothing to add (an interval set refuses overlaps)
    inside = choose(_targets("10.99.33.0/24"), settings=BanSettings(), guard=GUARD, seen=set(),
                    banned_here=1, active_total=1, active=["10.99.32.0/22"])
    assert inside.ban == () and inside.handled == ("10.99.33.0/24",)


def test_choose_respects_both_caps() -> None:
    targets = _targets("10.0.1.0/24", "10.0.2.0/24")
    per_incident = choose(targets, settings=BanSettings(max_per_incident=1), guard=GUARD,
                          seen=set(), banned_here=0, active_total=0)
    assert per_incident.ban == ("10.0.1.0/24",)
    assert per_incident.refused == (("10.0.2.0/24", "cap of 1 bans per incident reached"),)
    total = choose(targets, settings=BanSettings(max_total=10), guard=GUARD, seen=set(),
                   banned_here=0, active_total=10)
    assert total.ban == () and len(total.refused) == 2


def test_repeat_offenders_are_banned_longer_up_to_the_maximum() -> None:
    s = BanSettings(duration=3600, increment=2, max_duration=86400)
    assert [ban_seconds(s, n) for n in range(7)] == [3600, 7200, 14400, 28800, 57600,
                                                     86400, 86400]
    assert ban_seconds(replace(s, increment=1), 5) == 3600
    assert ban_seconds(replace(s, increment=100), 5000) == 86400  # no OverflowError


def _change(**kw: object) -> IncidentChange:
    base = dict(change="updated", serial=1, incident_id=7, host="web1", netns="",
                address="0.0.0.0", port=443, family=4, status="open", verdict="concentrated",
                trigger="log", opened_at=NOW, closed_at=None, first_evidence_at=NOW,
                detected_at=NOW, peak_syn_recv=512,
                top_prefixes=(("10.0.1.0/24", 600, 0.6, 0), ("10.0.2.0/24", 400, 0.4, 0)),
                recommendations=("raise the backlog",), reasons=("2 prefixes carry 100%",),
                state={})
    base.update(kw)
    return IncidentChange(**base)  # type: ignore[arg-type]


def test_notification_text_says_verdict_evidence_actions_and_advice() -> None:
    runs = [ActionRun(incident_id=7, action="ban", target="10.0.1.0/24", status="done",
                      at=NOW, rendered="", detail="banned for 1h"),
            ActionRun(incident_id=7, action="notify", target="opened", status="done", at=NOW,
                      rendered="", detail="")]
    title, body = compose("opened", _change(), runs, NOW + timedelta(seconds=5))
    assert title == "synwatch: SYN flood on web1 0.0.0.0:443: concentrated (incident 7)"
    assert "Verdict: concentrated. 2 prefixes carry 100%." in body
    assert "Top sources: 10.0.1.0/24 (60%), 10.0.2.0/24 (40%)." in body
    assert "- ban 10.0.1.0/24: done (banned for 1h)" in body
    assert "notify" not in body
    assert body.endswith("Recommended:\n- raise the backlog")
    closed = _change(change="closed", status="closed", closed_at=NOW + timedelta(minutes=3))
    title, body = compose("closed", closed, [], NOW)
    assert title.startswith("synwatch: over on web1 0.0.0.0:443")
    assert body.startswith("The incident lasted 3m")


def test_exec_environment_carries_the_incident() -> None:
    env = incident_env("opened", _change(netns="web-ns"))
    assert env["SYNWATCH_CHANGE"] == "opened" and env["SYNWATCH_INCIDENT_ID"] == "7"
    assert env["SYNWATCH_VERDICT"] == "concentrated" and env["SYNWATCH_PORT"] == "443"
    assert env["SYNWATCH_TOP_PREFIXES"] == "10.0.1.0/24 10.0.2.0/24"
    assert env["SYNWATCH_NETNS"] == "web-ns" and env["SYNWATCH_CLOSED_AT"] == ""


def test_builtins_are_registered_as_entry_points() -> None:
    from importlib.metadata import entry_points

    names = {ep.name for ep in entry_points(group=GROUP)}
    assert names == {"syncookies", "synproxy", "ban", "ratelimit", "notify", "exec"}
    assert set(registered()) == names
    assert all(issubclass(cls, Action) for cls in registered().values())


class _FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def now(self) -> datetime:
        return NOW + timedelta(seconds=self.t - 1000)

    def monotonic(self) -> float:
        return self.t


def _responder(tmp_path: Path, extra: str) -> tuple[Responder, History, _FakeClock]:
    """A responder whose actions run (a file that does not say dry_run is a dry run) unless
    ``extra`` has its own [actions]; the plans the tests hand it act on nothing real."""
    live = "" if "[actions]\n" in extra else "[actions]\ndry_run = false\n"
    config = parse_config(f'[storage]\nurl = "sqlite:///{tmp_path}/a.db"\n{live}{extra}',
                          "test")
    store = History.open(config.storage_url)
    assert store.save_incident(_change(incident_id=None)) == 1
    clock = _FakeClock()
    return Responder(config, store, clock), store, clock


def test_dry_run_records_the_render_and_runs_nothing(tmp_path: Path) -> None:
    responder, store, _ = _responder(tmp_path, "[actions]\ndry_run = true\n"
                                               "[actions.syncookies]\nenabled = false\n"
                                               "[actions.ban]\nenabled = false\n")
    ran: list[str] = []
    plan = Plan("notify", "opened", "the text", lambda: ran.append("x") or "sent", 1)
    responder._do(Action(responder.ctx), plan)
    [run] = store.action_runs(1)
    assert (run.status, run.rendered, ran) == ("dry-run", "the text", [])


def test_failed_notifications_are_recorded_and_retried_with_a_doubling_delay(
        tmp_path: Path) -> None:
    responder, store, clock = _responder(
        tmp_path, "[actions.syncookies]\nenabled = false\n[actions.ban]\nenabled = false\n"
                  '[actions.notify]\nenabled = true\nurls = ["json://127.0.0.1:9/x"]\n'
                  'retry = "10s"\nattempts = 3\n')
    plan = Plan("notify", "opened", "", lambda: "sent", 1)
    worker = responder.workers["notify"]
    submitted: queue.Queue[tuple[Plan, int]] = queue.Queue()
    worker.submit = lambda p, a: submitted.put((p, a))  # type: ignore[method-assign]
    for attempt in (1, 2, 3):
        responder.results.put(Outcome(plan, attempt, False, "refused", clock.now()))
        responder.tick()
        if attempt < 3:
            assert submitted.empty()
            clock.t += 10 * 2 ** (attempt - 1)
            responder.tick()
            assert submitted.get_nowait() == (plan, attempt + 1)
    details = [r.detail for r in store.action_runs(1)]
    assert details == ["attempt 1 of 3: refused; retrying in 10 s",
                       "attempt 2 of 3: refused; retrying in 20 s",
                       "attempt 3 of 3: refused"]
    assert responder.retry_at == []
    responder.stop(wait=1)


def test_an_action_failure_is_an_outcome_not_a_crash(tmp_path: Path) -> None:
    responder, store, _ = _responder(tmp_path, "[actions.syncookies]\nenabled = false\n"
                                               "[actions.ban]\nenabled = false\n")

    def fails() -> str:
        raise ActionFailed("exec /x", "exit status 3")

    responder._do(Action(responder.ctx), Plan("exec", "opened", "/x", fails, 1))
    [run] = store.action_runs(1)
    assert (run.status, run.detail) == ("failed", "exit status 3")


_NOTIFY = ('[actions.syncookies]\nenabled = false\n[actions.ban]\nenabled = false\n'
           '[actions.notify]\nenabled = true\nurls = ["json://127.0.0.1:9/x"]\n')


def test_messages_unsent_at_a_stop_are_recorded_for_the_next_start(tmp_path: Path) -> None:
    """A server that hangs holds the worker past the stop's wait: the message in flight and the
    one queued behind it are recorded as not done, to be sent at the next start."""
    responder, store, _ = _responder(tmp_path, _NOTIFY)
    release = threading.Event()
    hangs = Plan("notify", "opened", "T1\nbody 1", lambda: str(release.wait(10)), 1)
    queued = Plan("notify", "closed", "T2\nbody 2", lambda: "sent", 1)
    notify = responder.by_name["notify"]
    responder._do(notify, hangs)
    responder._do(notify, queued)
    responder.stop(wait=0.3)
    release.set()
    runs = store.action_runs(1)
    assert [(r.target, r.status) for r in runs] == [("opened", "failed"), ("closed", "failed")]
    assert all(r.detail == "attempt 1: not done when synwatch stopped; retrying at the next start"
               for r in runs)
    assert all(r.retry_at is not None for r in runs)


def test_a_start_resends_what_was_left_unsent_and_nothing_else(tmp_path: Path) -> None:
    responder, store, clock = _responder(tmp_path, _NOTIFY)
    config = responder.ctx.config  # this node is web1 of a fleet
    responder.ctx.config = replace(config, storage=replace(config.storage, host="web1"))
    store.host = "web1"
    other = store.save_incident(_change(incident_id=None, host="web2"))  # a fleet's other host

    def run(incident: int, target: str, status: str, detail: str, ago: float = 60) -> ActionRun:
        at = clock.now() - timedelta(seconds=ago)
        # the retry is the column, not the prose: "given up" below says "retrying" in words
        retry_at = at if "; retrying" in detail else None
        return ActionRun(incident_id=incident, action="notify", target=target, status=status,
                         at=at, rendered=f"{target} title\n{target} body", detail=detail,
                         retry_at=retry_at, host="web2" if incident == other else "")

    store.add_action_runs([
              run(1, "opened", "failed", "attempt 1 of 5: refused; retrying in 60 s", 120),
              run(1, "opened", "done", "sent to 1 URL"),  # sent later: nothing to do
              run(1, "closed", "failed", "attempt 1: not done when synwatch stopped; "
                                         "retrying at the next start"),
              run(1, "update", "failed", "attempt 5 of 5: refused"),  # given up
              run(1, "probe", "failed", "refused; not retrying"),  # prose is not state
              run(other, "closed", "failed", "attempt 1 of 5: refused; retrying in 60 s"),
              run(1, "update", "failed", "old; retrying in 60 s", ago=2 * 86400)])
    [plan] = responder.by_name["notify"].start()
    assert (plan.target, plan.incident_id, plan.rendered) == ("closed", 1,
                                                              "closed title\nclosed body")
    responder.stop(wait=1)


def test_an_incident_resumed_after_a_restart_is_not_announced_again(tmp_path: Path) -> None:
    responder, store, clock = _responder(tmp_path, _NOTIFY)
    store.add_action_runs([ActionRun(incident_id=1, action="notify", target="opened",
                                     status="done", at=clock.now(), rendered="",
                                     detail="sent to 1 URL")])
    notify = responder.by_name["notify"]
    assert notify.on_change(_change(incident_id=1)) == []  # no second "opened"
    [closed] = notify.on_change(_change(incident_id=1, change="closed", status="closed",
                                        closed_at=NOW))
    assert closed.target == "closed"
    # a new incident is announced as before
    new = store.save_incident(_change(incident_id=None))
    [opened] = notify.on_change(_change(incident_id=new))
    assert opened.target == "opened"
    responder.stop(wait=1)


def test_a_failing_tool_is_reported_by_the_line_that_says_why() -> None:
    assert reason("nft: No such file or directory\nmore\n") == "nft: No such file or directory"
    assert reason("") == "no message"
    traceback = ('Traceback (most recent call last):\n  File "/usr/sbin/ufw", line 130\n'
                 "OSError: [Errno 30] Read-only file system: '/run/ufw.lock'\n")
    assert reason(traceback) == "OSError: [Errno 30] Read-only file system: '/run/ufw.lock'"


def test_synproxy_renders_the_standard_rules_for_one_port() -> None:
    """wiki.nftables.org's SYNPROXY, in synwatch's table, in chains of the port's own (so
    removing it is deleting them), and the input chain before the admin's filter (priority 0)."""
    from synwatch.actions.synproxy import render_off, render_on

    assert show([render_on(8080, 1460, 7)]).splitlines() == [
        "nft -f - <<'EOF'",
        "add table inet synwatch",
        "add chain inet synwatch synproxy_raw_8080 "
        "{ type filter hook prerouting priority raw; policy accept; }",
        "add chain inet synwatch synproxy_in_8080 "
        "{ type filter hook input priority filter - 1; policy accept; }",
        "flush chain inet synwatch synproxy_raw_8080",
        "flush chain inet synwatch synproxy_in_8080",
        "add rule inet synwatch synproxy_raw_8080 tcp dport 8080 "
        "tcp flags & (syn|ack) == syn notrack",
        "add rule inet synwatch synproxy_in_8080 tcp dport 8080 "
        "ct state invalid,untracked synproxy mss 1460 wscale 7 timestamp sack-perm",
        "add rule inet synwatch synproxy_in_8080 tcp dport 8080 ct state invalid drop",
        "EOF"]
    assert show([render_off(8080)]) == """nft -f - <<'EOF'
delete chain inet synwatch synproxy_raw_8080
delete chain inet synwatch synproxy_in_8080
EOF"""


def test_a_ban_comment_cannot_end_its_quotes() -> None:
    """A fleet copy's comment names another node, from a row anyone who can write the table
    wrote: nothing in it may end the quotes of an nft script (or a ufw argument)."""
    item = BanItem("198.51.100.0/24", 60, 'synwatch fleet ban 7 from x" }\nflush ruleset\n"')
    rendered = show(Firewall(load_presets()["nftables"]).render_ban([item]))
    # one line of its own per command, the comment within its quotes
    assert rendered.count('"') == 2 and len(rendered.splitlines()) == 5, rendered
    assert "\nflush ruleset" not in rendered


def test_a_fleet_node_looks_at_the_fleets_changes_at_its_own_random_time(
        tmp_path: Path) -> None:
    """The service's loop turns when the responder says an action is due: a fleet node's look
    at the fleet's changes comes 0.75 to 1.25 s after the last, each wait drawn anew (nodes
    started together drift apart); a node that is not a fleet's, or a retired responder, is
    never due."""
    responder, store, clock = _responder(
        tmp_path, '[actions]\ndry_run = true\n[actions.ban]\nscope = "fleet"\n')
    responder.start()
    waits = []
    for _ in range(20):
        due = responder.next_due()
        waits.append(due - clock.t)
        clock.t = due - 0.1  # not due yet: no look, the same time
        responder.tick()
        assert responder.next_due() == due
        clock.t = due
        responder.tick()
    assert len(set(waits[1:])) == 19 and 0.75 <= min(waits[1:]) <= max(waits) <= 1.25
    responder.retired = True
    assert responder.next_due() == float("inf")
    store.close()
    local, store, _ = _responder(tmp_path / "local", "[actions]\ndry_run = true\n")
    local.start()
    assert local.next_due() == float("inf")
    store.close()


def test_the_namespaces_of_one_process_look_at_the_fleets_changes_at_one_turn(
        tmp_path: Path) -> None:
    """A host watching several namespaces holds a responder for each: they look at the fleet's
    changes at the same turn, with one query for them all, so the loop turns about once a
    second for the fleet however many namespaces it watches."""
    store = History.open(f"sqlite:///{tmp_path}/h.db")
    clock = _FakeClock()
    asked: list[int] = []
    read = store.fleet_changes

    def counted(after: int, limit: int) -> list[tuple[int, Ban]]:
        asked.append(after)
        return read(after, limit)

    store.fleet_changes = counted  # type: ignore[method-assign]
    responders = [Responder(parse_config(
        f'[storage]\nurl = "sqlite:///{tmp_path}/h.db"\n[watch]\nnetns = "ns{n}"\n'
        '[actions]\ndry_run = true\n[actions.ban]\nscope = "fleet"\n', "test"), store, clock)
        for n in range(3)]
    for r in responders:
        r.start()  # each reads where the fleet's changes are, then every ban in force
    for _ in range(3):
        [due] = {r.next_due() for r in responders}
        clock.t = due
        for r in responders:
            r.tick()
    assert asked == [0, 0, 0]  # one query a turn, for all three
    store.close()
