"""gap_probe.py VIP SECONDS START_FILE: a UDP probe to VIP:7777 every 10 ms for SECONDS.

Creates START_FILE after the 50th probe (the caller fails the master then) and prints the
longest silence between two answers in ms, -1 if fewer than two came (bench/vrrp.sh).
"""
import socket, sys, time
vip, seconds, start_file = sys.argv[1], float(sys.argv[2]), sys.argv[3]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.setblocking(False)
start = time.monotonic(); nxt = start; replies = []; seq = 0
while time.monotonic() - start < seconds:
    now = time.monotonic()
    if now >= nxt:
        try: s.sendto(b"p", (vip, 7777))
        except OSError: pass
        nxt += 0.01; seq += 1
        if seq == 50: open(start_file, "w").close()
    try:
        s.recvfrom(64); replies.append(time.monotonic())
    except BlockingIOError:
        time.sleep(0.0005)
gaps = [b - a for a, b in zip(replies, replies[1:])]
print(round(max(gaps) * 1000) if gaps else -1)
