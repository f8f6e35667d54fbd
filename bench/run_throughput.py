"""Bulk TCP throughput through a task under `egress run --mode enforce`, against the same
path without egress: target, the median ratio (with / without) at least 0.95.

Everything happens inside the lab (tests/lab/lab.py): a task-host namespace whose uplink
leads to a fake internet, where `iperf3 -s` listens on 203.0.113.50 (bulk.lab in the lab's
dnsmasq). Nothing is linked into the root namespace, nothing is forwarded or NATed there.

- without egress: a plain task namespace made here, joined to the lab host by a veth
  (10.214.0.1/30 and .2), IPv4 forwarding on that veth and the uplink only (sysctls of the
  lab host namespace), one masquerade rule in an nft table of the lab host namespace;
  `iperf3 -c 203.0.113.50 -t S -J` runs in it.
- with egress: `egress run --mode enforce --no-store` in the lab host namespace, purpose
  "bulk.lab, tcp 5201", running `iperf3 -c bulk.lab -t S -J` (name resolved by egress's
  resolver, rules, NFLOG of first packets, conntrack, the sandbox: the whole live path).

Runs are interleaved (without, with, without, with, ...) because run-to-run noise (~3%,
/work/shared/KERNEL.md) is as large as what is measured; each pair gives a ratio, and the
result is the median ratio with its min-max. The received rate (end.sum_received) counts.

    sudo .venv/bin/python bench/run_throughput.py [--runs 5] [--seconds 5] [--json out.json]

Exit 0 when the benchmark ran (whether or not the target is met; failed runs are listed),
1 when it could not run (set-up failed, or no pair completed).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.lab.lab import Lab, LabError  # noqa: E402

EGRESS = str(REPO / ".venv" / "bin" / "egress")
SERVER, NAME, PORT = "203.0.113.50", "bulk.lab", 5201
BASE_HOST, BASE_TASK, BASE_NET = "10.214.0.1", "10.214.0.2", "10.214.0.0/30"
TARGET = 0.95
STATE = Path("/run/egress/runs")
"""egress run's state directory (egress.enforce.tasknet.STATE)."""

PURPOSE = f'''version = 1
purpose = "bulk transfer benchmark"
task = "bench"

[[allow]]
host = "{NAME}"
ports = [{PORT}]
transport = "tcp"
'''


class Interrupted(BaseException):
    """SIGTERM or SIGHUP: unwind like Ctrl-C, so everything made is removed."""


def _raise(signum, _frame):
    raise Interrupted(signal.Signals(signum).name)


def sh(*cmd, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    done = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise LabError(f"{' '.join(map(str, cmd))}: {done.stderr.strip()}")
    return done


def finish(proc: subprocess.Popen, timeout: float) -> tuple[str, str, bool]:
    """Wait for a process we started (its own session); on timeout or interruption ask it
    to stop (SIGTERM: egress forwards it to the task, then removes its namespace and
    rules), then SIGKILL its session. Returns stdout, stderr, timed out."""
    try:
        out, err = proc.communicate(timeout=timeout)
        return out, err, False
    except BaseException as e:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        if isinstance(e, subprocess.TimeoutExpired):
            return out, err, True
        raise


class Bench:
    def __init__(self, lab: Lab, seconds: int):
        self.lab, self.seconds = lab, seconds
        self.base_ns, self.base_if = f"eb{lab.id}t", f"eb{lab.id}v"
        self.nft_table = f"ebench{lab.id}"
        self.server: subprocess.Popen | None = None
        self.purpose = lab.dir / "purpose.toml"     # lab.dir: root's, mode 0700
        self.egress_used = False
        self.host_netns_id = os.stat(f"/run/netns/{lab.host_ns}").st_ino

    # ------------------------------------------------------------------ set-up

    def start_server(self) -> None:
        if self.server is not None:
            self.lab.stop(self.server)
        self.server = self.lab.spawn("net", "iperf3", "-s", "-B", SERVER,
                                     log=f"iperf3-server-{time.monotonic_ns()}.log")
        self.lab.wait_port(SERVER, PORT)

    def build(self) -> None:
        lab = self.lab
        lab.add_server_address(SERVER)
        lab.start_dns({NAME: SERVER})
        self.start_server()
        self.purpose.write_text(PURPOSE)
        os.chmod(self.purpose, 0o600)
        # The plain task namespace, "without egress": a veth from the lab host into it.
        sh("ip", "netns", "add", self.base_ns)
        sh("ip", "-n", lab.host_ns, "link", "add", self.base_if, "type", "veth",
           "peer", "name", "eth0", "netns", self.base_ns)
        sh("ip", "-n", lab.host_ns, "addr", "add", f"{BASE_HOST}/30", "dev", self.base_if)
        sh("ip", "-n", lab.host_ns, "link", "set", self.base_if, "up")
        for cmd in (("link", "set", "lo", "up"),
                    ("addr", "add", f"{BASE_TASK}/30", "dev", "eth0"),
                    ("link", "set", "eth0", "up"),
                    ("route", "add", "default", "via", BASE_HOST)):
            sh("ip", "-n", self.base_ns, *cmd)
        sh("ip", "netns", "exec", self.base_ns, "sysctl", "-qw", "net.ipv4.tcp_fastopen=0")
        for dev in (self.base_if, lab.host_if):          # the lab host's two interfaces only
            lab.host("sysctl", "-qw", f"net.ipv4.conf.{dev}.forwarding=1")
        rules = (f"table ip {self.nft_table} {{\n"
                 "  chain postrouting {\n"
                 "    type nat hook postrouting priority srcnat; policy accept;\n"
                 f'    ip saddr {BASE_NET} oifname "{lab.host_if}" masquerade\n'
                 "  }\n}\n")
        rules_file = lab.dir / "baseline.nft"
        rules_file.write_text(rules)
        lab.host("nft", "-f", rules_file)

    def close(self) -> list[str]:
        """What this bench made outside the Lab's own bookkeeping; the Lab removes the rest
        (its namespaces, with the nft table and sysctls of the lab host inside them)."""
        problems = []
        if self.egress_used:
            # A run of ours killed before it cleaned up: only runs of the lab host namespace
            # (unique to this bench) whose auditor is dead are touched.
            done = sh("ip", "netns", "exec", self.lab.host_ns, EGRESS, "cleanup",
                      check=False, timeout=60)
            if done.returncode != 0:
                problems.append(f"egress cleanup: {done.stderr.strip() or done.stdout.strip()}")
        if Path(f"/run/netns/{self.base_ns}").exists():
            done = sh("ip", "netns", "del", self.base_ns, check=False)
            if done.returncode != 0:
                problems.append(f"ip netns del {self.base_ns}: {done.stderr.strip()}")
        return problems

    # ------------------------------------------------------------------ runs

    def _run(self, cmd: list[str], record: dict) -> tuple[str, str, int | None, bool]:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            if record["side"] == "with":
                self._watch_task(proc, record)
            out, err, timed_out = finish(proc, timeout=self.seconds + 60)
        finally:
            if record.get("task_netns"):
                self._remove_leftover(record)
        return out, err, proc.returncode, timed_out

    def _remove_leftover(self, record: dict) -> None:
        """egress leaves its task's resolv.conf in its state directory: remove this run's
        (named by its state file) once the run is over and its namespace gone."""
        netns = record["task_netns"]
        leftover = STATE / f"{netns}.resolv.conf"
        if leftover.exists() and not Path(f"/run/netns/{netns}").exists() \
                and not (STATE / f"{netns}.json").exists():
            leftover.unlink()
            record["removed_leftover"] = str(leftover)

    def _watch_task(self, proc: subprocess.Popen, record: dict) -> None:
        """The task namespace of this egress run: the state file that names the lab host
        namespace (unique to this bench). Read while the command starts (before iperf3
        writes anything, so the pipes cannot fill)."""
        deadline = time.monotonic() + 30
        while proc.poll() is None and time.monotonic() < deadline:
            for path in STATE.glob("*.json") if STATE.exists() else []:
                with contextlib.suppress(OSError, ValueError):
                    state = json.loads(path.read_text())
                    if state.get("host_netns") == self.host_netns_id:
                        record["task_netns"] = state["netns"]
                        return
            time.sleep(0.05)

    def once(self, side: str) -> dict:
        if self.server is None or self.server.poll() is not None:
            self.start_server()
        iperf = ["iperf3", "-J", "-t", str(self.seconds), "--connect-timeout", "5000"]
        if side == "without":
            cmd = ["ip", "netns", "exec", self.base_ns, *iperf, "-c", SERVER]
        else:
            self.egress_used = True
            cmd = ["ip", "netns", "exec", self.lab.host_ns, EGRESS, "run", "--task", "bench",
                   "--purpose", str(self.purpose), "--mode", "enforce", "--no-store",
                   "--", *iperf, "-c", NAME]
        record: dict = {"side": side, "attempts": 0}
        for _ in range(2):      # a second attempt only when the server was still busy
            record["attempts"] += 1
            started = time.monotonic()
            out, err, status, timed_out = self._run(cmd, record)
            record.update(wall_s=round(time.monotonic() - started, 2), status=status)
            record.pop("error", None)
            try:
                result = json.loads(out)
            except ValueError:
                result = {}
            if timed_out:
                record["error"] = f"timed out after {self.seconds + 60}s"
            elif "error" in result:
                record["error"] = f"iperf3: {result['error']}"
            elif status != 0 or not result:
                record["error"] = f"exit {status}: " + " ".join((err or out).split())[-400:]
            if "busy" in record.get("error", ""):
                time.sleep(1)
                continue
            break
        if "error" not in record:
            try:
                end = result["end"]
                record["gbps"] = end["sum_received"]["bits_per_second"] / 1e9
                record["sent_gbps"] = end["sum_sent"]["bits_per_second"] / 1e9
                record["retransmits"] = end["sum_sent"].get("retransmits")
            except (KeyError, TypeError) as e:
                record["error"] = f"iperf3 JSON without {e}"
        if side == "with" and err.strip():
            record["egress_summary"] = err.strip()[-2000:]
        return record


def median_pairs(pairs: list[tuple[dict, dict]]) -> dict:
    ratios = [w["gbps"] / b["gbps"] for b, w in pairs]
    return {
        "pairs": len(pairs),
        "median_ratio": statistics.median(ratios),
        "min_ratio": min(ratios), "max_ratio": max(ratios),
        "median_without_gbps": statistics.median(b["gbps"] for b, _ in pairs),
        "median_with_gbps": statistics.median(w["gbps"] for _, w in pairs),
        "ratios": ratios,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5, help="runs of each side (default 5)")
    ap.add_argument("--seconds", type=int, default=5, help="iperf3 -t of each run (default 5)")
    ap.add_argument("--json", type=Path, help="write the runs and the summary here")
    args = ap.parse_args()
    if args.runs < 1 or args.seconds < 1:
        ap.error("--runs and --seconds must be at least 1")
    if os.geteuid() != 0:
        print("run_throughput: needs root (network namespaces)", file=sys.stderr)
        return 1
    missing = [t for t in ("ip", "nft", "iperf3", "dnsmasq") if shutil.which(t) is None]
    if missing or not Path(EGRESS).exists():
        print(f"run_throughput: missing {', '.join(missing) or EGRESS}", file=sys.stderr)
        return 1
    if args.runs < 5:
        print(f"note: {args.runs} runs each; ratios need at least 5 (noise ~3%)")

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise)
    began = time.monotonic()
    runs: list[dict] = []
    problems: list[str] = []
    workdir = Path(tempfile.mkdtemp(prefix="egress-bench-"))     # 0700, root's
    try:
        with Lab(workdir) as lab:
            bench = Bench(lab, args.seconds)
            try:
                bench.build()
                print(f"lab {lab.id}: {args.runs} x {args.seconds}s each side, interleaved\n")
                print(f"{'run':>3}  {'side':<8} {'Gbit/s':>7} {'retr':>6} {'wall s':>7}  note")
                for i in range(args.runs):
                    for side in ("without", "with"):
                        record = bench.once(side)
                        record["pair"] = i + 1
                        runs.append(record)
                        gbps = f"{record['gbps']:7.2f}" if "gbps" in record else f"{'-':>7}"
                        retr = record.get("retransmits")
                        note = record.get("error", "")
                        if record["attempts"] > 1:
                            note = (note + "; " if note else "") + "server busy, retried once"
                        print(f"{i + 1:>3}  {side:<8} {gbps} "
                              f"{retr if retr is not None else '-':>6} "
                              f"{record['wall_s']:7.1f}  {note}", flush=True)
                        time.sleep(0.5)
            finally:
                problems += bench.close()
    except (LabError, OSError, subprocess.SubprocessError) as e:
        print(f"run_throughput: the benchmark failed: {e}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, Interrupted):
        print("\nrun_throughput: interrupted; everything made was removed", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    elapsed = time.monotonic() - began

    failed = [r for r in runs if "error" in r]
    by_pair: dict[int, dict] = {}
    for r in runs:
        by_pair.setdefault(r["pair"], {})[r["side"]] = r
    pairs = [(p["without"], p["with"]) for p in by_pair.values()
             if "gbps" in p.get("without", {}) and "gbps" in p.get("with", {})]
    summary = median_pairs(pairs) if pairs else None
    print()
    for r in failed:
        print(f"FAILED run {r['pair']} ({r['side']}): {r['error']}")
    for p in problems:
        print(f"cleanup problem: {p}")
    if summary is None:
        print("no complete pair: no ratio")
    else:
        met = summary["median_ratio"] >= TARGET
        print(f"pairs used:       {summary['pairs']} of {args.runs}"
              + (f" ({args.runs - summary['pairs']} with a failed run)" if failed else ""))
        print(f"without egress:   median {summary['median_without_gbps']:.2f} Gbit/s")
        print(f"with egress:      median {summary['median_with_gbps']:.2f} Gbit/s")
        print(f"ratio with/without: median {summary['median_ratio']:.3f} "
              f"(min {summary['min_ratio']:.3f}, max {summary['max_ratio']:.3f})")
        print(f"target median ratio >= {TARGET}: {'MET' if met else 'NOT MET'}")
    print(f"took {elapsed:.0f}s")
    if args.json:
        args.json.write_text(json.dumps({
            "runs_each": args.runs, "seconds": args.seconds, "target": TARGET,
            "kernel": platform.release(), "cpus": os.cpu_count(),
            "loadavg_after": os.getloadavg(), "elapsed_s": round(elapsed, 1),
            "summary": summary and {**summary, "target_met": summary["median_ratio"] >= TARGET},
            "failed": len(failed), "cleanup_problems": problems, "runs": runs,
        }, indent=2) + "\n")
    return 0 if summary is not None else 1


if __name__ == "__main__":
    sys.exit(main())
