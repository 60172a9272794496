"""From a flood's first SYN to its ban in the kernel (root, lab namespaces).

`synwatch run` on its defaults but with actions on (probe interval 1 s, SYN sampler on, nftables
backend) watches a lab namespace; a flood of 1,000 SYN/s from one routed /24 starts, while 20
real clients a second connect from another /24 beside it. The figure is the time from the
flood's first SYN (the sender's clock, taken just before it) to the ban element being listed in
the namespace's nftables set (polled every 10 ms), over RUNS fresh labs; and what was banned.

`python bench/ban_bench.py [REPO]` runs the synwatch found in REPO (default: this checkout), so
the same bench measures an older commit checked out elsewhere (`git worktree add`).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.lab import SERVER_IP, SPOOF_NET, Lab, lab

RUNS = 5
FLOOD_NET = f"{SPOOF_NET}.7"
CLIENTS = [f"{SPOOF_NET}.30.{h}" for h in range(1, 21)]

SENDER = textwrap.dedent("""
    import random, socket, sys, time
    sys.path.insert(0, {bench_repo!r})
    from tests.support.lab import syn_packet
    packets = [syn_packet(f"{net}.{{random.randint(1, 254)}}", {dst!r},
                          random.randint(1024, 65535), {port}) for _ in range(8000)]
    raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    print(time.time(), flush=True)
    start = time.monotonic()
    for i, p in enumerate(packets):
        raw.sendto(p, ({dst!r}, 0))
        time.sleep(max(0.0, start + (i + 1) / 1000 - time.monotonic()))
""")


def banned(the_lab: Lab) -> list[str]:
    out = subprocess.run(["ip", "netns", "exec", the_lab.server_ns, "nft", "-j", "list", "set",
                          "inet", "synwatch", "bannet4"], capture_output=True, text=True,
                         check=False)
    if out.returncode:
        return []
    found = []
    for item in json.loads(out.stdout)["nftables"]:
        for e in item.get("set", {}).get("elem", []):
            val = e["elem"]["val"]
            found.append(f"{val['prefix']['addr']}/{val['prefix']['len']}"
                         if isinstance(val, dict) else f"{val}/32")
    return found


def one_run(repo: Path) -> tuple[float, list[str]]:
    with lab() as the_lab, tempfile.TemporaryDirectory() as tmp:
        the_lab.sysctl("net.ipv4.tcp_synack_retries", 1)
        port = 41000
        the_lab.serve(port, backlog=16)
        config = Path(tmp) / "synwatch.toml"
        config.write_text(f'[storage]\nurl = "sqlite:///{tmp}/h.db"\n'
                          '[sources]\njournald = false\nkmsg = true\n'
                          f'[watch]\nnetns = "{the_lab.server_ns}"\n'
                          '[actions]\ndry_run = false\n')
        log = (Path(tmp) / "service.log").open("w")
        service = subprocess.Popen([sys.executable, "-m", "synwatch", "run", "--config",
                                    str(config)], cwd=repo, stderr=log,
                                   env={**os.environ, "PYTHONPATH": str(repo)})
        try:
            deadline = time.monotonic() + 30
            while "synwatch running" not in (Path(tmp) / "service.log").read_text():
                assert time.monotonic() < deadline, "synwatch did not start"
                assert service.poll() is None, "synwatch stopped"
                time.sleep(0.05)
            time.sleep(2)  # a few probes of a quiet namespace first, as on a live server
            clients = the_lab.real_clients(port, CLIENTS, seconds=10)
            sender = subprocess.Popen(
                ["ip", "netns", "exec", the_lab.client_ns, sys.executable, "-c",
                 SENDER.format(bench_repo=str(Path(__file__).resolve().parent.parent),
                               net=FLOOD_NET, dst=SERVER_IP, port=port)],
                stdout=subprocess.PIPE, text=True)
            assert sender.stdout is not None
            first_syn = float(sender.stdout.readline())
            deadline = time.monotonic() + 20
            got: list[str] = []
            while not got and time.monotonic() < deadline:
                got = banned(the_lab)
                if not got:
                    time.sleep(0.01)
            took = time.time() - first_syn if got else float("nan")
            sender.wait(timeout=60)
            clients.wait(timeout=60)
            return took, sorted(set(banned(the_lab)))
        finally:
            service.terminate()
            service.wait(timeout=30)
            log.close()


def main() -> None:
    if os.geteuid() != 0:
        print("ban benchmark: skipped (needs root for namespaces)")
        return
    repo = Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else \
        Path(__file__).resolve().parent.parent
    times, bans = [], []
    for _ in range(RUNS):
        took, what = one_run(repo)
        times.append(took)
        bans.append(what)
    print(f"flood's first SYN -> its ban in nftables ({RUNS} runs, 1,000 SYN/s from "
          f"{FLOOD_NET}.0/24, 20 real clients/s from {SPOOF_NET}.30.0/24 beside it)")
    print(f"  median {statistics.median(times):.2f} s, max {max(times):.2f} s "
          f"(each: {', '.join(f'{t:.2f}' for t in times)})")
    print(f"  banned: {'; '.join(', '.join(b) for b in bans)}")


if __name__ == "__main__":
    main()
