"""udp_echo.py NAME: answer every UDP datagram on port 7777 with NAME (bench/vrrp.sh)."""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 7777))
while True:
    data, peer = s.recvfrom(2048)
    s.sendto(sys.argv[1].encode(), peer)
