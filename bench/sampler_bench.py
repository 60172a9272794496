"""The SYN sampler's cost at 10k, 50k and the lab's maximum SYN/s (root, lab namespaces), side by
side with what an admin would run to see a flood's sources: tcpdump capturing the SYNs.

A spoofed flood (sources all over SPOOF_NET/16, routed back through the client namespace as on
the internet) runs for SECONDS at each rate. The sampler runs alone in a process of its own,
reading its counts every second like the service does; its CPU time (user + system, from
/proc) over the flood is the figure, with its RSS at the first and the last second (memory
must stay flat) and how well its estimate matches the SYNs sent. tcpdump runs the same way
with the equivalent filter, writing to /dev/null.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.lab import CLIENT_IP, Lab, flood_rate, lab

SECONDS = 10
RATES = (10_000, 50_000, 0)  # 0: as fast as the lab goes
CLIENTS = 500  # real connections a second beside the last flood: their ACKs are sampled too
TICKS = os.sysconf("SC_CLK_TCK")
REPO = Path(__file__).resolve().parent.parent

SAMPLER = textwrap.dedent("""
    import json, sys, time
    sys.path.insert(0, {repo!r})
    from synwatch.probes.synsample import SynSampler
    sampler = SynSampler({netns!r}).start()
    print("ready", flush=True)
    for line in sys.stdin:  # one read a second, as the service's probe does
        s = sampler.read()
        port = s.port({port})
        print(json.dumps({{"one_in": s.one_in, "lost": s.lost,
                          "samples": port.samples if port else 0,
                          "syns": port.syns if port else 0,
                          "acks": sum(n for _, n in port.completed) if port else 0}}),
              flush=True)
""")


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _sampler_run(the_lab: Lab, port: int, rate: int, clients: int = 0) -> dict[str, float]:
    code = SAMPLER.format(repo=str(REPO), netns=the_lab.server_ns, port=port)
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdin is not None
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    cpu0 = _cpu(proc.pid)
    rss: list[float] = []
    reads: list[dict[str, int]] = []
    sender = the_lab.timed_flood(port, SECONDS, rate)
    if clients:
        the_lab.real_clients(port, [CLIENT_IP], SECONDS, per_second=clients)
    while sender.poll() is None:
        time.sleep(1)
        proc.stdin.write("\n")
        proc.stdin.flush()
        reads.append(json.loads(proc.stdout.readline()))
        rss.append(_rss_mib(proc.pid))
    sent, took = flood_rate(sender, SECONDS + 60)
    time.sleep(1)
    proc.stdin.write("\n")
    proc.stdin.flush()
    reads.append(json.loads(proc.stdout.readline()))
    cpu = _cpu(proc.pid) - cpu0
    proc.stdin.close()
    proc.wait(timeout=10)
    return {"rate": sent / took, "cpu": cpu / took * 100, "rss0": rss[0], "rss1": rss[-1],
            "samples": sum(r["samples"] for r in reads) / took,
            "estimate": sum(r["syns"] for r in reads) / max(1, sent),
            "acks": sum(r.get("acks", 0) for r in reads) / took,
            "one_in": reads[-2]["one_in"] if len(reads) > 1 else reads[-1]["one_in"],
            "lost": sum(r["lost"] for r in reads)}


def _tcpdump_run(the_lab: Lab, port: int, rate: int) -> dict[str, float]:
    proc = subprocess.Popen(["ip", "netns", "exec", the_lab.server_ns, "tcpdump", "-i", "any",
                             "-nn", "-q", "-s", "96", "-w", "/dev/null",
                             "tcp[tcpflags] & (tcp-syn|tcp-ack) == tcp-syn"],
                            stderr=subprocess.PIPE, text=True)
    time.sleep(1)  # listening
    cpu0 = _cpu(proc.pid)
    sent, took = flood_rate(the_lab.timed_flood(port, SECONDS, rate), SECONDS + 60)
    cpu = _cpu(proc.pid) - cpu0
    proc.terminate()
    _, err = proc.communicate(timeout=10)
    if proc.returncode not in (0, -15):
        raise SystemExit(f"tcpdump: {err}")
    return {"rate": sent / took, "cpu": cpu / took * 100}


def main() -> None:
    if os.geteuid() != 0:
        print("sampler benchmark: skipped (needs root for namespaces)")
        return
    print(f"SYN sampler vs tcpdump, {SECONDS} s of spoofed SYNs at each rate "
          f"({os.cpu_count()} cores)")
    print(f"{'target SYN/s':>16}{'sent SYN/s':>12}{'sampler CPU':>13}{'samples/s':>11}"
          f"{'1 in N':>8}{'estimate':>10}{'ACKs/s seen':>12}{'RSS first-last':>17}"
          f"{'tcpdump CPU':>13}")
    for rate, clients in [*((r, 0) for r in RATES), (0, CLIENTS)]:
        with lab() as the_lab:
            port = 40000
            the_lab.serve(port, backlog=64)
            s = _sampler_run(the_lab, port, rate, clients)
            t = (_tcpdump_run(the_lab, port, rate) if shutil.which("tcpdump") and not clients
                 else {"cpu": float("nan")})
        label = (f"{rate:,}" if rate else "max") + (f" +{clients} conn/s" if clients else "")
        print(f"{label:>16}{s['rate']:>12,.0f}{s['cpu']:>12.1f}%{s['samples']:>11,.0f}"
              f"{s['one_in']:>8.0f}{s['estimate']:>10.2f}{s['acks']:>12,.0f}"
              f"{s['rss0']:>8.1f}-{s['rss1']:.1f} MiB{t['cpu']:>12.1f}%")


if __name__ == "__main__":
    main()
