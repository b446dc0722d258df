"""The socket guard is active in every test, blocks non-loopback connections with a clear
error naming the caller before any packet leaves, and leaves loopback working."""

from __future__ import annotations

import socket
import threading

import pytest

from trainer import offline


def test_guard_is_active_in_tests():
    assert offline.guard_active()


def test_connection_to_the_hub_is_blocked_by_name():
    with pytest.raises(offline.NetworkBlocked, match="huggingface.co:443.*offline guard.*test_offline.py"):
        socket.create_connection(("huggingface.co", 443), timeout=1)


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("127.8.9.1", True), ("::1", True),
                                            ("localhost", True), ("10.0.0.1", False), ("8.8.8.8", False),
                                            ("example.com", False), ("[::1]", True)])
def test_address_classification(host, loopback):
    assert offline.is_loopback(host) is loopback


def test_loopback_still_works():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    accepted = []
    thread = threading.Thread(target=lambda: accepted.append(server.accept()))
    thread.start()
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        pass
    thread.join(5)
    server.close()
    assert accepted


@pytest.fixture
def clean_allow_list(monkeypatch):
    """The allow-list is process state: give each test an empty one and restore it after."""
    monkeypatch.setattr(offline, "_allowed_names", set())
    monkeypatch.setattr(offline, "_allowed_addrs", set())


def test_allow_list_lets_exactly_the_named_host_through(clean_allow_list, monkeypatch):
    """`go_offline(allow_hosts=["server"])` (what GRPO does for server.url) allows that name,
    the addresses it resolves to, and nothing else. The resolver below stands in for the
    compose DNS; no packet is sent anywhere: connects are only checked, never made."""
    resolved = []

    def compose_dns(host, port, *args, **kwargs):
        resolved.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("172.20.0.5", port))]

    monkeypatch.setitem(offline._original, "getaddrinfo", compose_dns)
    offline.go_offline(allow_hosts=["Server"])
    assert offline.host_allowed("server") and not offline.host_allowed("server2")
    assert not offline.host_allowed("172.20.0.5")  # not before the name resolved to it
    with pytest.raises(offline.NetworkBlocked, match="example.com:443"):
        socket.getaddrinfo("example.com", 443)
    assert resolved == []  # a blocked name is never even looked up
    infos = socket.getaddrinfo("server", 8000)
    assert resolved == ["server"] and infos[0][4] == ("172.20.0.5", 8000)
    offline.check_address(socket.AF_INET, ("172.20.0.5", 8000))  # passes
    for other in ("172.20.0.6", "10.0.0.1", "8.8.8.8"):
        with pytest.raises(offline.NetworkBlocked, match=f"{other}:8000"):
            offline.check_address(socket.AF_INET, (other, 8000))
    # a real connect to a blocked address fails in the guard, before the socket is used
    with socket.socket() as s, pytest.raises(offline.NetworkBlocked, match="172.20.0.6"):
        s.connect(("172.20.0.6", 8000))
    with pytest.raises(offline.NetworkBlocked):
        socket.create_connection(("example.org", 80), timeout=1)


def test_allowed_ip_literal_and_loopback_names(clean_allow_list):
    offline.install_guard(allow=["10.1.2.3", "[fd00::7]"])
    assert offline.host_allowed("10.1.2.3") and offline.host_allowed("fd00::7")
    assert not offline.host_allowed("10.1.2.4") and not offline.host_allowed("fd00::8")
    assert offline.host_allowed("localhost") and offline.host_allowed("127.0.0.1")


def test_grpo_allows_only_the_server_url_host():
    """The loop derives the allowed host from server.url; a bad URL is one clear line."""
    from trainer.errors import UserError
    from trainer.grpo.loop import server_host

    assert server_host("http://server:8000/v1") == "server"
    assert server_host("http://[::1]:8000/v1") == "::1"
    with pytest.raises(UserError, match="server.url='server:8000'"):
        server_host("server:8000")


@pytest.mark.parametrize("name, call", [
    ("gethostbyname", lambda: socket.gethostbyname("example.com")),
    ("gethostbyname_ex", lambda: socket.gethostbyname_ex("example.com")),
    ("gethostbyaddr", lambda: socket.gethostbyaddr("192.0.2.1")),
    ("getnameinfo", lambda: socket.getnameinfo(("192.0.2.1", 53), 0)),
])
def test_other_resolvers_are_blocked(monkeypatch, name, call):
    """DNS lookups outside getaddrinfo are stopped; the real resolver behind the guard is
    replaced by a tripwire, so nothing could be sent even if the guard let the call through."""
    tripped = []
    monkeypatch.setitem(offline._original, name, lambda *a: tripped.append(a))
    with pytest.raises(offline.NetworkBlocked):
        call()
    assert not tripped


def test_udp_datagram_to_a_remote_address_is_blocked():
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.close()  # a closed socket: if the guard let the call through it would fail with EBADF, sending nothing
    with pytest.raises(offline.NetworkBlocked):
        sock.sendto(b"x", ("192.0.2.1", 53))


def test_udp_to_loopback_still_works():
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.sendto(b"ping", receiver.getsockname())
    receiver.settimeout(5)
    assert receiver.recvfrom(16)[0] == b"ping"
    sender.close()
    receiver.close()
