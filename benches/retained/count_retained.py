# Subscribes to FILTER on 127.0.0.1:PORT (raw MQTT 3.1.1, QoS 0) and counts
# the PUBLISHes (retained ones) that come within 3 s of quiet:
#   python3 count_retained.py PORT FILTER
import socket, struct, sys, time
port, flt = int(sys.argv[1]), sys.argv[2].encode()
s = socket.create_connection(("127.0.0.1", port))
body = b"\x00\x04MQTT\x04\x02\x00\x3c" + struct.pack(">H", 6) + b"retsub"
s.sendall(b"\x10" + bytes([len(body)]) + body); s.recv(4)
body = struct.pack(">H", 1) + struct.pack(">H", len(flt)) + flt + b"\x00"
s.sendall(b"\x82" + bytes([len(body)]) + body)
s.settimeout(3); data = b""
try:
    while True:
        chunk = s.recv(1 << 16)
        if not chunk: break
        data += chunk
except socket.timeout: pass
i, n, topics = 0, 0, set()
while i < len(data):
    h = data[i]; i += 1; mul, ln = 1, 0
    while True:
        b = data[i]; i += 1; ln += (b & 127) * mul; mul *= 128
        if b < 128: break
    if h >> 4 == 3:
        tl = struct.unpack(">H", data[i:i+2])[0]; topics.add(data[i+2:i+2+tl]); n += 1
    i += ln
print("publishes", n, "distinct", len(topics))
