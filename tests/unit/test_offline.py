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
