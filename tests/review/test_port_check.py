"""The port check before Label Studio starts: a port something listens on is busy; one held only by
connections in TIME_WAIT (what a server killed mid-request leaves for a minute) is free, as it is
to the server's own bind (issue 26). Real sockets on 127.0.0.1."""

from __future__ import annotations

import socket
import subprocess

from stages.review.server import port_is_free


def _time_wait_port() -> int:
    """A port whose listener is gone and whose server side closed first: left in TIME_WAIT. The
    listener sets SO_REUSEADDR, as Label Studio's server (Django's runserver) does."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    conn, _ = listener.accept()
    conn.close()  # the server closes first, as the kernel does for a killed server
    client.recv(1)  # the FIN arrives
    client.close()
    listener.close()
    return port


def test_a_listening_port_is_busy_and_a_time_wait_port_is_free() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert not port_is_free("127.0.0.1", s.getsockname()[1])
    port = _time_wait_port()
    states = subprocess.run(["ss", "-tan", f"sport = :{port}"], capture_output=True, text=True).stdout
    assert "TIME-WAIT" in states, states
    assert port_is_free("127.0.0.1", port)
    # And the server, binding as it does, gets the port.
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()
