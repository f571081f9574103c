"""Per thread of every process on this machine: context switches (wakeups) and CPU seconds over
a window, busiest first. What `cpu_probe.py` (per process) does not say: which thread of a
process wakes, and how often (a timer every 10 ms shows as ~100 switches a second).

    .venv/bin/python benchmarks/thread_wakeups.py [--seconds 20] [--top 40]

Run it beside a stack that is already up (e.g. `benchmarks/serve_host.py --system ours-null`),
on a quiet machine.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

Thread = tuple[str, str]  # (pid, tid)
TICKS = os.sysconf("SC_CLK_TCK")


def sample() -> dict[Thread, tuple[str, str, int, float]]:
    """(pid, tid) -> (process command line, thread name, context switches, CPU seconds)."""
    found: dict[Thread, tuple[str, str, int, float]] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            task = Path(f"/proc/{pid}/task/{tid}")
            try:
                status = (task / "status").read_text()
                name = (task / "comm").read_text().strip()
                fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            switches = sum(
                int(line.split()[1])
                for line in status.splitlines()
                if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches"))
            )
            cpu = (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime
            found[(pid, tid)] = (command, name, switches, cpu)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--top", type=int, default=40)
    args = parser.parse_args()
    before = sample()
    time.sleep(args.seconds)
    after = sample()
    rows = []
    for thread, (command, name, switches, cpu) in after.items():
        if thread in before:
            _, _, switches_before, cpu_before = before[thread]
            rows.append((switches - switches_before, cpu - cpu_before, command, name, thread[0]))
    rows.sort(reverse=True)
    print(f"{args.seconds:.0f} s: switches/s  CPU s  pid  thread  process")
    for switches, cpu, command, name, pid in rows[: args.top]:
        print(f"{switches / args.seconds:8.0f} {cpu:6.2f} {pid:>7} {name[:16]:16} {command[:60]}")


if __name__ == "__main__":
    main()
