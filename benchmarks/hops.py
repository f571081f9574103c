"""Where a streamed chat's first token spends its time, hop by hop, from the packets themselves.

    .venv/bin/python benchmarks/hops.py [--system ours|ours-null] [--seconds 60]

Starts the system (serve_host.py: poolserve on the real SmolLM2 engine, or on the fake engine),
captures loopback TCP with tcpdump (Debian's `tcpdump`, needs root) while one client streams
32-token chats one at a time, then follows each request through the capture by its chat id:
when the client's POST reached the ingress (from HAProxy), when the ingress sent the request to
a worker (the gRPC message carrying its id), and when the first content event left the worker,
the ingress and HAProxy. Prints the median, p90 and max of each, in ms after the client's POST,
beside the first token as the client itself timed it (at real-time priority unless
`--normal-priority`: then its own waits for a core show as the gap between the last two rows),
and how long each serving process ran and waited for a core per request (all its threads,
/proc/<pid>/task/*/schedstat).

Every hop time is the kernel's, so neither client nor server timing code is in them.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import os
import re
import statistics
import struct
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402

from benchmarks.fairness import LIGHT_TOKENS, Tally, one  # noqa: E402
from benchmarks.hosts import MODEL_ID, NULL_MODEL_ID, Host, client_priority, running  # noqa: E402

Flow = tuple[int, int]  # (source port, destination port)
CONTENT = re.compile(rb'chatcmpl-([0-9a-f]{32})".{0,240}?"delta": ?\{"content": ?"[^"]', re.S)
HOPS = (
    "POST reached the ingress",
    "request sent to the worker",
    "first content left the worker",
    "first content left the ingress",
    "first content left HAProxy",
)


def read_pcap(path: Path) -> dict[Flow, list[tuple[float, bytes]]]:
    """TCP payloads per flow, in capture order (a pcap of `tcpdump -i lo`: Ethernet frames)."""
    data = path.read_bytes()
    nano = struct.unpack("<I", data[:4])[0] == 0xA1B23C4D
    flows: dict[Flow, list[tuple[float, bytes]]] = defaultdict(list)
    offset = 24
    while offset + 16 <= len(data):
        seconds, fraction, length, _ = struct.unpack("<IIII", data[offset : offset + 16])
        packet = data[offset + 16 : offset + 16 + length][14:]
        offset += 16 + length
        if len(packet) < 20 or packet[9] != 6:  # IPv4 TCP only
            continue
        total = struct.unpack(">H", packet[2:4])[0]
        segment = packet[(packet[0] & 15) * 4 : total]
        payload = segment[(segment[12] >> 4) * 4 :]
        if payload:
            flow = struct.unpack(">HH", segment[:4])
            flows[flow].append((seconds + fraction / (1e9 if nano else 1e6), payload))
    return flows


class Stream:
    """A flow's bytes joined, with the capture time of any byte offset."""

    def __init__(self, segments: list[tuple[float, bytes]]) -> None:
        self.segments = segments
        self.data = b"".join(payload for _, payload in segments)
        self.ends: list[int] = []
        end = 0
        for _, payload in segments:
            end += len(payload)
            self.ends.append(end)

    def time_at(self, offset: int) -> float:
        return self.segments[bisect.bisect_right(self.ends, offset)][0]


def hop_times(flows: dict[Flow, list[tuple[float, bytes]]], proxy_port: int) -> list[list[float]]:
    """For each request seen on every hop: the times of HOPS, in ms after the client's POST."""
    first: dict[str, dict[Flow, float]] = defaultdict(dict)
    for flow, segments in flows.items():
        stream = Stream(segments)
        for match in CONTENT.finditer(stream.data):
            first[match.group(1).decode()].setdefault(flow, stream.time_at(match.end() - 1))
    posts = {
        flow: [at for at, payload in segments if payload.startswith(b"POST ")]
        for flow, segments in flows.items()
    }

    def post_before(flow: Flow, before: float) -> float | None:
        earlier = [at for at in posts.get((flow[1], flow[0]), []) if at < before]
        return earlier[-1] if earlier else None

    # the ingress: the port HAProxy's connections carry POSTs to
    ingress_ports = {dst for (src, dst), times in posts.items() if times and dst != proxy_port}
    rows = []
    for request_id, seen in first.items():
        by_role: dict[str, Flow] = {}
        for flow in seen:
            role = (
                "proxy"
                if flow[0] == proxy_port
                else "ingress"
                if flow[0] in ingress_ports
                else "worker"
            )
            by_role.setdefault(role, flow)
        if len(by_role) < 3:
            continue
        proxy, ingress, worker = by_role["proxy"], by_role["ingress"], by_role["worker"]
        posted = post_before(proxy, seen[proxy])
        reached = post_before(ingress, seen[ingress])
        outbound = Stream(flows[(worker[1], worker[0])])  # ingress -> worker
        at = outbound.data.find(request_id.encode())
        if posted is None or reached is None or at < 0:
            continue
        times = (reached, outbound.time_at(at), seen[worker], seen[ingress], seen[proxy])
        rows.append([(t - posted) * 1000 for t in times])
    return rows


async def light_client(url: str, model: str, seconds: float) -> Tally:
    """One chat at a time for `seconds` (after 3 warm-up chats, also in the capture)."""
    async with aiohttp.ClientSession() as session:
        for _ in range(3):
            await one(session, url, "default", LIGHT_TOKENS, Tally(), model=model)
        tally = Tally((time.monotonic(), time.monotonic() + seconds))
        while time.monotonic() < tally.window[1]:
            await one(session, url, "default", LIGHT_TOKENS, tally, model=model)
        return tally


def serving_processes(host: Host) -> dict[str, int]:
    """The processes on the request's path: HAProxy, the Ingress, the Generator, the engine's
    EngineCore."""
    roles = host.replica_pids()
    found = {
        role: roles[role] for role in ("Ingress", "Generator-cpu", "EngineCore") if role in roles
    }
    for pid in host.pids():
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/comm").read_text().strip() == "haproxy":
                found["haproxy"] = pid
    return found


def cpu_times(pid: int) -> tuple[float, float]:
    """(seconds run, seconds waited on a run queue) of every thread of `pid` so far."""
    ran = waited = 0.0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError, ValueError):
            run_ns, wait_ns, _ = (int(x) for x in (task / "schedstat").read_text().split())
            ran, waited = ran + run_ns / 1e9, waited + wait_ns / 1e9
    return ran, waited


def column(values: list[float]) -> str:
    values = sorted(values)
    p90 = values[int(0.9 * (len(values) - 1))]
    return f"{statistics.median(values):.2f} | {p90:.2f} | {values[-1]:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--system", choices=["ours", "ours-null"], default="ours")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--log-dir", default="/tmp/poolserve-hops")
    parser.add_argument(
        "--normal-priority", action="store_true", help="the client at normal priority"
    )
    args = parser.parse_args()
    log_dir = Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    capture = log_dir / "lo.pcap"
    with running(args.system, log_dir) as host:
        port = int(host.base_url.rsplit(":", 1)[1])
        tcpdump = subprocess.Popen(
            ["tcpdump", "-i", "lo", "-s", "0", "-U", "-w", str(capture), "tcp"],
            stderr=subprocess.DEVNULL,
        )
        time.sleep(1)  # listening
        if tcpdump.poll() is not None:
            raise SystemExit(f"tcpdump exited ({tcpdump.returncode}): it needs root on lo")
        processes = serving_processes(host)
        try:
            client = client_priority(not args.normal_priority)
            model = NULL_MODEL_ID if args.system == "ours-null" else MODEL_ID
            before = {role: cpu_times(pid) for role, pid in processes.items()}
            tally = asyncio.run(light_client(host.base_url, model, args.seconds))
            after = {role: cpu_times(pid) for role, pid in processes.items()}
        finally:
            tcpdump.terminate()
            tcpdump.wait()
            client_priority(False)
    rows = hop_times(read_pcap(capture), port)
    load = os.getloadavg()
    print(
        f"\n{args.system}: {len(rows)} of {len(tally.ttfts) + 3} requests (3 warm-up) followed on "
        f"every hop; client at {client}\n"
    )
    print("| hop | ms after the client's POST: p50 | p90 | max |\n|---|---|---|---|")
    for index, name in enumerate(HOPS):
        print(f"| {name} | {column([row[index] for row in rows])} |")
    timed = column([ttft * 1000 for ttft in tally.ttfts])
    print(f"| first content read by the client (its own clock) | {timed} |")
    print("\n| process | ran, ms per request | waited for a core, ms per request |\n|---|---|---|")
    requests = len(tally.ttfts) + 3  # the warm-up ran between the samples too
    for role in processes:
        (ran_0, waited_0), (ran_1, waited_1) = before[role], after[role]
        ran, waited = 1000 * (ran_1 - ran_0) / requests, 1000 * (waited_1 - waited_0) / requests
        print(f"| {role} | {ran:.1f} | {waited:.1f} |")
    print(f"\nload average after the run: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
