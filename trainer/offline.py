"""The offline environment: HF offline variables, the socket guard, and `trainer doctor`.

The guard patches socket connect and name resolution so that any non-loopback connection
raises NetworkBlocked naming the caller, before a single packet leaves the machine. An
allow-list adds exact hosts (GRPO allows the host of server.url, e.g. the compose service
`server`): the name may be resolved, and only the addresses it resolved to may be
connected to.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import traceback

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
               "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", ""}


class NetworkBlocked(ConnectionError):
    """A connection to a non-loopback address while run.offline is true."""


def set_offline_env() -> None:
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)


def is_loopback(host) -> bool:
    if isinstance(host, bytes):
        host = host.decode()
    host = str(host).strip("[]")
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def _caller() -> str:
    """The innermost frame outside the socket and HTTP plumbing: the code that asked."""
    plumbing = ("/http/", "/urllib3/", "/requests/", "/httpx/", "/httpcore/", "/asyncio/", "/anyio/")
    for frame in reversed(traceback.extract_stack()[:-1]):
        name = os.path.basename(frame.filename)
        if frame.filename == __file__ or name in ("socket.py", "ssl.py") or any(p in frame.filename for p in plumbing):
            continue
        return f"{frame.filename}:{frame.lineno} in {frame.name}"
    return "unknown caller"


def _blocked(host, port) -> NetworkBlocked:
    return NetworkBlocked(f"network access to {host}:{port} blocked by Airlock's offline guard (run.offline=true), "
                          f"called from {_caller()}; everything must load from local folders")


_original = {}
# hosts the guard lets through besides loopback: names as written in a URL, and the
# addresses those names resolved to (a compose service name -> its container address)
_allowed_names: set[str] = set()
_allowed_addrs: set[str] = set()


def _norm(host) -> str:
    if isinstance(host, bytes):
        host = host.decode()
    return str(host).strip("[]").split("%")[0].lower()


def allow_hosts(hosts) -> None:
    """Let connections to these hosts (names or IP literals) through the guard, and to the
    addresses the names resolve to. Everything else stays blocked."""
    for host in hosts:
        host = _norm(host)
        if not host:
            continue
        try:
            _allowed_addrs.add(str(ipaddress.ip_address(host)))
        except ValueError:
            _allowed_names.add(host)


def host_allowed(host) -> bool:
    """True for loopback, an allowed name, or an address an allowed name resolved to."""
    if is_loopback(host):
        return True
    host = _norm(host)
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        return host in _allowed_names
    return host in _allowed_addrs


def check_address(family, address) -> None:
    """Raise NetworkBlocked unless an AF_INET/AF_INET6 `address` may be connected to."""
    if family in (socket.AF_INET, socket.AF_INET6) and not host_allowed(address[0]):
        raise _blocked(address[0], address[1])


def install_guard(allow=()) -> None:
    """Idempotent (a second call only adds to the allow-list). Loopback and Unix sockets
    stay allowed (the GRPO server in tests); `allow` names more hosts, e.g. the compose
    service of the generation server."""
    allow_hosts(allow)
    if _original:
        return
    _original["connect"] = socket.socket.connect
    _original["connect_ex"] = socket.socket.connect_ex
    _original["getaddrinfo"] = socket.getaddrinfo

    def connect(self, address):
        check_address(self.family, address)
        return _original["connect"](self, address)

    def connect_ex(self, address):
        check_address(self.family, address)
        return _original["connect_ex"](self, address)

    def getaddrinfo(host, port, *args, **kwargs):
        if host is None or is_loopback(host):
            return _original["getaddrinfo"](host, port, *args, **kwargs)
        if not host_allowed(host):
            raise _blocked(host, port)
        infos = _original["getaddrinfo"](host, port, *args, **kwargs)
        if _norm(host) in _allowed_names:  # its addresses may be connected to from now on
            _allowed_addrs.update(str(ipaddress.ip_address(_norm(info[4][0]))) for info in infos)
        return infos

    def sendto(self, data, *args):  # sendto(data, address) or sendto(data, flags, address): UDP
        check_address(self.family, args[-1])
        return _original["sendto"](self, data, *args)

    def sendmsg(self, buffers, *args):  # the address, when given, is the 4th argument
        if len(args) >= 3 and args[2] is not None:
            check_address(self.family, args[2])
        return _original["sendmsg"](self, buffers, *args)

    def resolver(name):  # gethostbyname & co ask DNS directly, without getaddrinfo
        def guarded(host, *args):
            target = host[0] if isinstance(host, tuple) else host
            if not is_loopback(target) and not host_allowed(target):
                raise _blocked(target, host[1] if isinstance(host, tuple) else "-")
            return _original[name](host, *args)
        return guarded

    for name in ("sendto", "sendmsg"):
        _original[name] = getattr(socket.socket, name)
    for name in ("gethostbyname", "gethostbyname_ex", "gethostbyaddr", "getnameinfo"):
        _original[name] = getattr(socket, name)
        setattr(socket, name, resolver(name))
    socket.socket.connect = connect
    socket.socket.connect_ex = connect_ex
    socket.socket.sendto = sendto
    socket.socket.sendmsg = sendmsg
    socket.getaddrinfo = getaddrinfo


def remove_guard() -> None:
    _allowed_names.clear()
    _allowed_addrs.clear()
    if not _original:
        return
    for name in ("connect", "connect_ex", "sendto", "sendmsg"):
        setattr(socket.socket, name, _original.pop(name))
    for name in ("getaddrinfo", "gethostbyname", "gethostbyname_ex", "gethostbyaddr", "getnameinfo"):
        setattr(socket, name, _original.pop(name))


def guard_active() -> bool:
    return bool(_original)


def go_offline(allow_hosts=()) -> None:
    """Offline environment variables plus the socket guard; `allow_hosts` (e.g. the host of
    server.url) may be reached besides loopback."""
    set_offline_env()
    install_guard(allow=allow_hosts)
