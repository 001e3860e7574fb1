#!/usr/bin/env python3
"""One MQTT 3.1.1 client that subscribes to many distinct filters and stays
connected (used by benches/cluster.sh for the route-table memory figures).

    subscribe_many.py HOST:PORT CLIENT_ID FIRST COUNT [--batch 500] [--hold-file F]

Subscribes to filters FIRST .. FIRST+COUNT-1, each
`bench/<i % 1000>/dev/<i>/status` (exact filters; with the default shard
depth 2 a filter's shard is `bench/<i % 1000>`: 1,000 shards in all),
SUBSCRIBE packets of --batch filters, QoS 0, waiting for every SUBACK.
Prints `subscribed N` when done, then keeps the connection open until
HOLD_FILE disappears (or stdin closes when no --hold-file is given), so the
broker keeps the subscriptions. Bounded: gives up after 300 s.
Standard library only.
"""
import argparse
import os
import socket
import sys
import time


def varint(n):
    out = bytearray()
    while True:
        b = n % 128
        n //= 128
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def utf8(s):
    b = s.encode()
    return len(b).to_bytes(2, "big") + b


def read_packet(sock, buf):
    """Returns (first byte, body) of the next packet; buf is a bytearray carry-over."""
    while True:
        if len(buf) >= 2:
            mult, length, i = 1, 0, 1
            while i < len(buf):
                b = buf[i]
                length += (b & 0x7F) * mult
                mult *= 128
                i += 1
                if not b & 0x80:
                    if len(buf) >= i + length:
                        first, body = buf[0], bytes(buf[i:i + length])
                        del buf[:i + length]
                        return first, body
                    break
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("broker closed the connection")
        buf.extend(chunk)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("addr")
    ap.add_argument("client_id")
    ap.add_argument("first", type=int)
    ap.add_argument("count", type=int)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--hold-file")
    a = ap.parse_args()
    deadline = time.time() + 300
    host, port = a.addr.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=60)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    # CONNECT: MQTT 3.1.1, clean session, keep-alive 0.
    var = utf8("MQTT") + bytes([4, 0x02, 0, 0])
    body = var + utf8(a.client_id)
    sock.sendall(bytes([0x10]) + varint(len(body)) + body)
    buf = bytearray()
    first, body = read_packet(sock, buf)
    if first >> 4 != 2 or body[1] != 0:
        sys.exit(f"CONNACK refused: {body!r}")
    done, pid = 0, 0
    ids = list(range(a.first, a.first + a.count))
    while done < len(ids):
        if time.time() > deadline:
            sys.exit(f"timed out after {done} filters")
        chunk = ids[done:done + a.batch]
        pid = pid % 65535 + 1
        payload = b"".join(utf8(f"bench/{i % 1000}/dev/{i}/status") + b"\x00" for i in chunk)
        body = pid.to_bytes(2, "big") + payload
        sock.sendall(bytes([0x82]) + varint(len(body)) + body)
        while True:
            first, body = read_packet(sock, buf)
            if first >> 4 == 9 and int.from_bytes(body[:2], "big") == pid:
                if any(c >= 0x80 for c in body[2:]):
                    sys.exit("SUBACK with a failure code")
                break
        done += len(chunk)
    print(f"subscribed {done}", flush=True)
    sock.settimeout(1)
    while time.time() < deadline + 3600:
        if a.hold_file:
            if not os.path.exists(a.hold_file):
                break
            time.sleep(0.5)
        else:
            if not sys.stdin.read(1):
                break
    sock.sendall(bytes([0xE0, 0]))  # DISCONNECT
    sock.close()


if __name__ == "__main__":
    main()
