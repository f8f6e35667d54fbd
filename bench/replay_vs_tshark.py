"""Replay speed and memory against tshark, side by side in one run.

    .venv/bin/python bench/replay_vs_tshark.py [--runs 5] [--check]

Writes the synthetic capture of bench/make_capture.py (215k packets, 5,000
flows, most packets bulk transfer; TLS, HTTP, SSH, DNS and Stratum flows),
then runs, interleaved and alternating which goes first, N times each:

- egress:          egress replay CAP --purpose bench/purpose.toml --db <fresh SQLite>
- egress no-store: the same with --no-store (judging only)
- egress no-ledger: the first with EGRESS_LEDGER=off (the store without its ledger; for
                   measuring the ledger's cost only)
- tshark:          tshark -r CAP -Y 'tls.handshake.type==1 or ssh.protocol or dns or
                   http.request' -T fields -e SNI -e SSH banner -e DNS name -e HTTP Host

Each run is one process (its writer child included), timed by wall clock and
measured by the kernel's peak RSS (wait4). Reports the median packets per
second with its spread, the peak RSS, the ratios, and checks that egress
counts as many TCP conversations as `tshark -z conv,tcp` and that the ledger
costs at most 20% of the replay's speed (run by run, egress against egress
no-ledger). The ledger's key is a file in the temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from make_capture import write_capture  # noqa: E402

TSHARK_FILTER = "tls.handshake.type==1 or ssh.protocol or dns or http.request"
TSHARK_FIELDS = ["tls.handshake.extensions_server_name", "ssh.protocol", "dns.qry.name",
                 "http.host"]


def run(argv: list[str], env: dict | None = None) -> tuple[float, int, int]:
    """Wall seconds, peak RSS in KiB (the process and its waited-for children), exit status."""
    start = time.perf_counter()
    with open(os.devnull, "wb") as null:
        proc = subprocess.Popen(argv, stdout=null, stderr=null,
                                env=None if env is None else {**os.environ, **env})
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return time.perf_counter() - start, usage.ru_maxrss, proc.returncode


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5, help="runs of each command (at least 3)")
    ap.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    ap.add_argument("--json", dest="json_out", help="also write the figures to this file")
    args = ap.parse_args(argv)
    if args.runs < 3:
        ap.error("--runs must be at least 3")
    tshark = shutil.which("tshark")
    if tshark is None:
        print("bench: tshark is not installed (apt-get install tshark)", file=sys.stderr)
        return 1
    egress = str(Path(sys.executable).with_name("egress"))
    if not Path(egress).exists():
        print(f"bench: no egress beside {sys.executable}; run it with the venv's python",
              file=sys.stderr)
        return 1

    with tempfile.TemporaryDirectory(prefix="egress-bench-") as tmp:
        cap = os.path.join(tmp, "bench.pcap")
        made = write_capture(cap)
        packets = made["packets"]
        purpose = str(HERE / "purpose.toml")
        commands = {
            "egress": lambda i: [egress, "replay", cap, "--purpose", purpose,
                                 "--db", os.path.join(tmp, f"run{i}.db")],
            "egress --no-store": lambda i: [egress, "replay", cap, "--purpose", purpose,
                                            "--no-store"],
            "egress no-ledger": lambda i: [egress, "replay", cap, "--purpose", purpose,
                                           "--db", os.path.join(tmp, f"off{i}.db")],
            "tshark": lambda i: [tshark, "-r", cap, "-Y", TSHARK_FILTER, "-T", "fields",
                                 *[x for f in TSHARK_FIELDS for x in ("-e", f)]],
        }
        envs = {name: {"EGRESS_LEDGER_KEY": os.path.join(tmp, "ledger.key")}
                for name in commands if name.startswith("egress")}
        envs["egress no-ledger"]["EGRESS_LEDGER"] = "off"
        results: dict[str, list[tuple[float, int]]] = {name: [] for name in commands}
        order = list(commands)
        for i in range(args.runs):
            for name in (order if i % 2 == 0 else order[::-1]):
                wall, rss, status = run(commands[name](i), envs.get(name))
                if status not in (0, 10):     # 10: egress found violations, as it should here
                    print(f"bench: {name} exited {status}", file=sys.stderr)
                    return 1
                results[name].append((wall, rss))

        conv = subprocess.run([tshark, "-r", cap, "-q", "-z", "conv,tcp"], capture_output=True,
                              text=True, check=True).stdout
        tshark_tcp = sum(1 for line in conv.splitlines() if "<->" in line)
        audit = subprocess.run([egress, "audit", "--db", os.path.join(tmp, "run0.db"), "--json",
                                "--no-events"], capture_output=True, text=True)
        egress_tcp = sum(1 for line in audit.stdout.splitlines()
                         if json.loads(line)["proto"] == "tcp")

    figures = {}
    print(f"capture: {packets:,} packets, {made['flows']:,} flows ({made['tcp_flows']:,} TCP); "
          f"{args.runs} interleaved runs each; {os.cpu_count()} CPUs")
    print(f"{'command':<18} {'median pkt/s':>13} {'min-max pkt/s':>21} {'median s':>9} "
          f"{'peak RSS MiB':>13}")
    for name, runs in results.items():
        walls = sorted(w for w, _ in runs)
        med = statistics.median(walls)
        rss = max(r for _, r in runs) / 1024
        figures[name] = {"median_pps": packets / med, "min_pps": packets / walls[-1],
                         "max_pps": packets / walls[0], "median_s": med, "peak_rss_mib": rss}
        print(f"{name:<18} {packets / med:>13,.0f} {packets / walls[-1]:>10,.0f}-"
              f"{packets / walls[0]:<10,.0f} {med:>9.2f} {rss:>13.0f}")
    # Ratios run by run (each pair ran back to back), so a drift in the machine's speed
    # over the whole benchmark does not tilt them; the median and the spread are quoted.
    ratios, spreads = {}, {}
    for name in ("egress", "egress --no-store", "egress no-ledger"):
        pairs = sorted(t / e for (e, _), (t, _) in zip(results[name], results["tshark"]))
        ratios[name], spreads[name] = statistics.median(pairs), (pairs[0], pairs[-1])
        print(f"ratio {name} / tshark packets per second: median {ratios[name]:.2f}x "
              f"(runs {pairs[0]:.2f}x-{pairs[-1]:.2f}x)")
    pairs = sorted(off / on for (on, _), (off, _) in zip(results["egress"],
                                                         results["egress no-ledger"]))
    ratios["ledger"], spreads["ledger"] = statistics.median(pairs), (pairs[0], pairs[-1])
    print(f"ratio egress / egress no-ledger packets per second: median {ratios['ledger']:.2f}x "
          f"(runs {pairs[0]:.2f}x-{pairs[-1]:.2f}x)")
    checks = {
        "egress >= 2x tshark packets/s (median of the run-by-run ratios)": ratios["egress"] >= 2.0,
        "egress peak RSS < 500 MB": figures["egress"]["peak_rss_mib"] * 1.048576 < 500,
        "the ledger costs <= 20% of replay speed (median run-by-run ratio >= 0.80)":
            ratios["ledger"] >= 0.80,
        f"TCP conversations: egress {egress_tcp}, tshark {tshark_tcp}": egress_tcp == tshark_tcp,
    }
    for text, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {text}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"packets": packets, "figures": figures,
                                                   "ratios": ratios, "ratio_spread": spreads,
                                                   "checks": checks}, indent=1))
    return 1 if args.check and not all(checks.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
