"""Whether the machine itself stalls: sleep 5 ms in a loop and count how late each wake-up is.
Run it at real-time priority beside a benchmark, so that no process of the machine's can delay
it and only a stall of the whole machine (the hypervisor, the kernel) shows:

    chrt -f 50 .venv/bin/python benchmarks/wake_probe.py --seconds 300

Prints the wake-ups, the worst lateness and each wake-up over --late-ms with its time (unix
seconds, to line up with a benchmark's `--out`), and the CPU's steal and softirq since the
previous probe sample (/proc/stat jiffies)."""

from __future__ import annotations

import argparse
import time


def cpu_jiffies() -> list[int]:
    with open("/proc/stat") as stat:
        return [int(x) for x in stat.readline().split()[1:]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=300.0)
    parser.add_argument("--late-ms", type=float, default=20.0, help="report wake-ups this late")
    args = parser.parse_args()
    end = time.monotonic() + args.seconds
    previous = cpu_jiffies()
    wakes, worst, late = 0, 0.0, []
    while time.monotonic() < end:
        started = time.monotonic()
        time.sleep(0.005)
        lateness = time.monotonic() - started - 0.005
        wakes += 1
        worst = max(worst, lateness)
        if lateness * 1000 > args.late_ms:
            now = cpu_jiffies()
            steal, softirq = now[7] - previous[7], now[6] - previous[6]
            late.append(
                f"{time.time():.2f}: {lateness * 1000:.1f} ms (steal {steal}, softirq {softirq})"
            )
        if wakes % 200 == 0:
            previous = cpu_jiffies()
    print(f"{wakes} wake-ups in {args.seconds:g} s, worst {worst * 1000:.1f} ms late")
    print(f"over {args.late_ms:g} ms: {len(late)}", *late, sep="\n  ")


if __name__ == "__main__":
    main()
