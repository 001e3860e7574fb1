# Publishes N retained QoS 0 messages (64 B) over raw MQTT 3.1.1 sockets,
# spread over the given ports: topics bench/r{i//1000}/{i%1000}.
import socket, sys, struct
ports = [int(p) for p in sys.argv[1].split(",")]
n = int(sys.argv[2])
def rl(n):
    out = b""
    while True:
        b = n % 128; n //= 128
        out += bytes([b | (0x80 if n else 0)])
        if not n: return out
def connect(port, cid):
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    body = b"\x00\x04MQTT\x04\x02\x00\x3c" + struct.pack(">H", len(cid)) + cid
    s.sendall(b"\x10" + rl(len(body)) + body)
    ack = s.recv(4)
    assert ack[0] == 0x20 and ack[3] == 0, ack
    return s
socks = [connect(p, b"retpub%d" % i) for i, p in enumerate(ports)]
payload = b"x" * 64
bufs = [bytearray() for _ in socks]
for i in range(n):
    t = b"bench/r%d/%d" % (i // 1000, i % 1000)
    body = struct.pack(">H", len(t)) + t + payload
    k = i % len(socks)
    bufs[k] += b"\x31" + rl(len(body)) + body
    if len(bufs[k]) > 1 << 16:
        socks[k].sendall(bufs[k]); bufs[k] = bytearray()
for k, s in enumerate(socks):
    if bufs[k]: s.sendall(bufs[k])
    s.sendall(b"\xe0\x00"); s.close()
