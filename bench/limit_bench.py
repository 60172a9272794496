"""Floods at this machine's limit (root, lab namespaces): trafgen (netsniff-ng), a flood
generator writing SYNs into a packet socket's ring, instead of the lab's Python sender.

1. The highest SYN rate the server namespace takes here: trafgen on one core, then on every
   core, for LIMIT seconds each; the rate is what the kernel received (the server namespace's
   Tcp InSegs: the veth drops nothing it does not count).
2. The SYN sampler at that rate, in this process, read once a second as the service's probe
   reads it: its estimate against what the kernel received, spoofed from all over a /16 and
   concentrated from three /24s (trafgen sends them in turn: a third each).
3. `synwatch run` (dry run, probes every second) on the flooded namespace for FLOOD seconds at
   that rate, spoofed then concentrated: its CPU per 10 s window, its RSS over the flood, and
   the incident's verdict once the flood is over.

Every core floods, so the machine is saturated: the kernel's receive path takes what the sender
leaves, and synwatch runs on what is left of that.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.footprint_bench import cpu_seconds, rss_mib
from synwatch.probes.synsample import SynSampler
from tests.support.lab import SPOOF_NET, Lab, lab, lab_port

LIMIT = 5
ACCURACY = 10
FLOOD = int(os.environ.get("SYNWATCH_BENCH_FLOOD", "180"))
CORES = os.cpu_count() or 1
FLOODS = {"spoofed (all over a /16)": (),
          "concentrated (three /24s)": tuple(f"{SPOOF_NET}.{n}.0/24" for n in (5, 6, 7))}
WANT = {"spoofed (all over a /16)": "spoofed", "concentrated (three /24s)": "concentrated"}


def received_rate(the_lab: Lab, port: int, cores: int) -> float:
    before, started = the_lab.segments_in(), time.monotonic()
    flood = the_lab.trafgen_flood(port, LIMIT, cpus=cores)
    _, err = flood.communicate(timeout=LIMIT + 30)
    assert flood.returncode == 124, err  # ended by its timeout: it ran its time
    return (the_lab.segments_in() - before) / (time.monotonic() - started)


def sampler_at_the_limit(the_lab: Lab, port: int, nets: tuple[str, ...]) -> dict[str, float]:
    sampler = SynSampler(the_lab.server_ns).start()
    estimate = samples = lost = 0
    try:
        before = the_lab.segments_in()
        flood = the_lab.trafgen_flood(port, ACCURACY, nets, cpus=CORES)
        while True:
            done = flood.poll() is not None
            if not done:
                time.sleep(1)
            got = sampler.read()
            lost += got.lost
            p = got.port(port)
            if p is not None:
                estimate, samples = estimate + p.syns, samples + p.samples
            if done:
                break
        received = the_lab.segments_in() - before
        one_in = sampler.one_in
    finally:
        sampler.stop()
    return {"received": received, "estimate": estimate, "samples": samples, "lost": lost,
            "one_in": one_in}


@dataclass
class AtTheLimit:
    rate: float  # SYNs a second the kernel received
    cpu: list[float]  # % of a core per 10 s window
    rss_first: float
    rss_low: float  # MiB, from 60 s on
    rss_high: float
    verdicts: list[str]


def service_at_the_limit(tmp: Path, nets: tuple[str, ...]) -> AtTheLimit:
    with lab() as the_lab:
        port = lab_port()
        the_lab.listen(port, backlog=1024)
        config = tmp / f"limit-{len(nets)}.toml"
        config.write_text(f'[storage]\nurl = "sqlite:///{tmp}/limit-{len(nets)}.db"\n'
                          '[sources]\njournald = false\nkmsg = true\n'
                          f'[watch]\nnetns = "{the_lab.server_ns}"\n'
                          '[incident]\nquiet_period = "10s"\n[actions]\ndry_run = true\n')
        proc = subprocess.Popen([sys.executable, "-m", "synwatch", "run", "--config",
                                 str(config)], stderr=subprocess.DEVNULL)
        try:
            time.sleep(10)  # started and settled
            before = the_lab.segments_in()
            flood = the_lab.trafgen_flood(port, FLOOD, nets, cpus=CORES)
            rows, start, cpu0 = [], time.monotonic(), cpu_seconds(proc.pid)
            while flood.poll() is None:
                time.sleep(10)
                now, cpu = time.monotonic(), cpu_seconds(proc.pid)
                rows.append((now - start, 100 * (cpu - cpu0) / 10, rss_mib(proc.pid)))
                cpu0 = cpu
            received = the_lab.segments_in() - before
            incidents: list[dict[str, object]] = []
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:  # closed after its quiet period
                out = subprocess.run([sys.executable, "-m", "synwatch", "incidents", "list",
                                      "--format", "json", "--config", str(config)],
                                     capture_output=True, text=True, check=True).stdout
                incidents = [i for i in json.loads(out) if i["port"] == port]
                if incidents and all(i["status"] == "closed" for i in incidents):
                    break
                time.sleep(1)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    late = [r[2] for r in rows if r[0] >= 60] or [rows[-1][2]]
    return AtTheLimit(received / FLOOD, [r[1] for r in rows], rows[0][2], min(late), max(late),
                      [str(i["verdict"]) for i in incidents])


def main() -> None:
    with lab() as the_lab:
        port = lab_port()
        the_lab.listen(port, backlog=1024)
        rates = {cores: received_rate(the_lab, port, cores) for cores in sorted({1, CORES})}
        print(f"the highest SYN rate the server namespace takes here (trafgen, {LIMIT} s, "
              "SYNs the kernel received):")
        for cores, rate in rates.items():
            print(f"  trafgen on {cores} core{'s' if cores > 1 else ''}: {rate:,.0f} SYN/s")
        print(f"\nthe SYN sampler at the limit ({ACCURACY} s, trafgen on {CORES} cores, read "
              "every second):")
        print(f"{'flood':<28} {'received':>10} {'estimate':>10} {'est/recv':>8} "
              f"{'samples/s':>9} {'dropped':>7} {'1 in N':>6}")
        for name, nets in FLOODS.items():
            got = sampler_at_the_limit(the_lab, port, nets)
            print(f"{name:<28} {got['received']:>10,.0f} {got['estimate']:>10,.0f} "
                  f"{got['estimate'] / got['received']:>8.3f} "
                  f"{got['samples'] / ACCURACY:>9,.0f} {got['lost']:>7,.0f} "
                  f"{got['one_in']:>6,.0f}")
    with tempfile.TemporaryDirectory() as tmp:
        print(f"\nsynwatch run during a {FLOOD} s flood at the limit (trafgen on {CORES} cores, "
              "dry run, probes every second; CPU per 10 s window):")
        print(f"{'flood':<28} {'SYN/s':>9} {'max CPU':>8} {'mean CPU':>8} {'RSS 10 s':>8} "
              f"{'RSS from 60 s':>14}  verdict")
        for name, nets in FLOODS.items():
            run = service_at_the_limit(Path(tmp), nets)
            right = "right" if run.verdicts == [WANT[name]] else "WRONG"
            print(f"{name:<28} {run.rate:>9,.0f} {max(run.cpu):>7.1f}% "
                  f"{sum(run.cpu) / len(run.cpu):>7.1f}% {run.rss_first:>7.1f}M "
                  f"{run.rss_low:>6.1f}-{run.rss_high:.1f}M  {', '.join(run.verdicts)} ({right})")
            print(f"{'':<28} CPU % per 10 s: {' '.join(f'{c:.1f}' for c in run.cpu)}")


if __name__ == "__main__":
    main()
