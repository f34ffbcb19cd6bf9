"""A test backend: TCP and UDP echo on one port, IPv4 and IPv6, switchable from outside.

Runs inside a backend's network namespace. A unix control socket takes one word per
connection: `accept` (listen), `refuse` (close the TCP listener, so SYNs get RST),
`udp-close` (close the UDP socket, so datagrams draw ICMP port unreachable), `udp-silent`
(read datagrams, answer none), `udp-serve` (answer again) or `quit`; it answers `ok`.
Blackholing is done outside, on the client's neighbour table.
TCP connections are answered with the backend's name first, then echo, so a test can tell
which backend IPVS chose; UDP datagrams are answered with `<name> <payload>`.
"""
from __future__ import annotations

import argparse
import os
import selectors
import socket


def tcp_listener(port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", port))
    s.listen(4096)
    s.setblocking(False)
    return s


def udp_socket(port: int) -> socket.socket:
    udp = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    udp.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    udp.bind(("::", port))
    return udp


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", required=True)
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--control", required=True)
    args = parser.parse_args()
    name = args.name.encode()

    sel = selectors.DefaultSelector()
    udp = udp_socket(args.port)
    sel.register(udp, selectors.EVENT_READ, "udp")
    udp_silent = False
    if os.path.exists(args.control):
        os.unlink(args.control)
    control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    control.bind(args.control)
    control.listen(8)
    sel.register(control, selectors.EVENT_READ, "control")
    listener = tcp_listener(args.port)
    sel.register(listener, selectors.EVENT_READ, "listen")

    while True:
        for key, _ in sel.select():
            sock, kind = key.fileobj, key.data
            if kind == "udp":
                try:
                    data, peer = sock.recvfrom(65535)
                    if not udp_silent:
                        sock.sendto(name + b" " + data, peer)
                except OSError:  # an ICMP error queued on the socket; keep serving
                    continue
            elif kind == "listen":
                try:
                    conn, _ = sock.accept()
                except OSError:  # nothing pending, or the client already gave up (ECONNABORTED)
                    continue
                conn.setblocking(False)
                try:
                    conn.send(name + b"\n")
                except OSError:
                    conn.close()
                    continue
                sel.register(conn, selectors.EVENT_READ, "conn")
            elif kind == "conn":
                try:
                    data = sock.recv(65535)
                except OSError:
                    data = b""
                if data:
                    try:
                        sock.send(data)
                    except OSError:
                        data = b""
                if not data:
                    sel.unregister(sock)
                    sock.close()
            else:
                conn, _ = sock.accept()
                word = conn.recv(64).strip().decode()
                if word == "refuse" and listener is not None:
                    sel.unregister(listener)
                    listener.close()
                    listener = None
                elif word == "accept" and listener is None:
                    listener = tcp_listener(args.port)
                    sel.register(listener, selectors.EVENT_READ, "listen")
                elif word == "udp-close" and udp is not None:
                    sel.unregister(udp)
                    udp.close()
                    udp = None
                elif word in ("udp-serve", "udp-silent"):
                    udp_silent = word == "udp-silent"
                    if udp is None:
                        udp = udp_socket(args.port)
                        sel.register(udp, selectors.EVENT_READ, "udp")
                conn.sendall(b"ok\n")
                conn.close()
                if word == "quit":
                    return


if __name__ == "__main__":
    main()
