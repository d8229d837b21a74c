"""Start-up checks on where the server listens, made before any model loads: whether the address
is this machine only (loopback), and whether the port is free."""

from __future__ import annotations

import ipaddress
import socket


def is_loopback(host: str) -> bool:
    """Whether listening on `host` reaches this machine only ("localhost", 127.0.0.0/8, ::1, or a
    name that resolves only to those). "" and "0.0.0.0" mean every interface: not loopback."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def check_port_free(host: str, port: int) -> None:
    """ValueError unless a server could listen on (host, port) now, tried the way uvicorn binds
    (SO_REUSEADDR, the first address the host resolves to). Port 0 (any free port) always is."""
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        raise ValueError(f"cannot listen on {host}: the address does not resolve ({exc.strerror or exc})") from None
    family, kind, proto, _, address = infos[0]
    try:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ValueError(f"cannot listen on {host}:{port}: {reason} (another server may hold the port; "
                         "choose another with --port)") from None
