"""hops.py's capture reading, on a pcap written here: each hop's time comes from the right flow
and the right byte (an event split across two segments counts when its content arrives)."""

from __future__ import annotations

import struct
from pathlib import Path

from benchmarks.hops import hop_times, read_pcap

PROXY, INGRESS, WORKER = 9000, 30000, 34000
REQUEST = "0123456789abcdef0123456789abcdef"
ROLE = b'data: {"id":"chatcmpl-%s","choices":[{"delta":{"role":"assistant","content":""}}]}\n\n'
TOKEN = b'data: {"id": "chatcmpl-%s", "choices": [{"delta": {"content": "Once"}}]}\n\n'


def packet(source: int, target: int, payload: bytes) -> bytes:
    tcp = struct.pack(">HHIIBBHHH", source, target, 0, 0, 5 << 4, 0x18, 65535, 0, 0)
    ip = struct.pack(
        ">BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp) + len(payload), 0, 0, 64, 6, 0,
        bytes([127, 0, 0, 1]), bytes([127, 0, 0, 1]),
    )  # fmt: skip
    return b"\0" * 12 + b"\x08\x00" + ip + tcp + payload  # Ethernet: two MACs, IPv4


def test_each_hop_is_read_from_its_own_flow(tmp_path: Path) -> None:
    role, token = ROLE % REQUEST.encode(), TOKEN % REQUEST.encode()
    half = len(token) // 2
    packets = [
        (10.000, 50000, PROXY, b"POST /v1/chat/completions HTTP/1.1\r\n\r\n{}"),
        (10.001, 50001, INGRESS, b"POST /v1/chat/completions HTTP/1.1\r\n\r\n{}"),
        (10.004, 50002, WORKER, b"\0\0grpc" + REQUEST.encode() + b"\0"),
        (10.050, WORKER, 50002, role),  # the role event is no content
        (10.080, WORKER, 50002, token[:half]),
        (10.090, WORKER, 50002, token[half:]),  # the content arrives here
        (10.092, INGRESS, 50001, b"HTTP/1.1 200 OK\r\n\r\n" + role + token),
        (10.093, PROXY, 50000, b"HTTP/1.1 200 OK\r\n\r\n" + role + token),
        # a request seen only at HAProxy (e.g. answered before a worker, or cut): not followed
        (11.000, 50000, PROXY, b"POST /v1/chat/completions HTTP/1.1\r\n\r\n{}"),
        (11.010, PROXY, 50000, TOKEN % (b"f" * 32)),
    ]
    capture = tmp_path / "lo.pcap"
    with capture.open("wb") as out:
        out.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
        for at, source, target, payload in packets:
            frame = packet(source, target, payload)
            seconds = int(at)
            micros = round((at - seconds) * 1e6)
            out.write(struct.pack("<IIII", seconds, micros, len(frame), len(frame)) + frame)
    [row] = hop_times(read_pcap(capture), PROXY)
    assert [round(ms) for ms in row] == [1, 4, 90, 92, 93]
