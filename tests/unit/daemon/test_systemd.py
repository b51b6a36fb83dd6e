"""daemon/systemd.py: the environment rules of socket activation and sd_notify."""

from __future__ import annotations

import os
import socket

from ugem.daemon.systemd import Notifier, inherited_socket, socket_name


def test_listen_variables_are_removed_whoever_they_name() -> None:
    environ = {"LISTEN_PID": "1", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "ugem", "HOME": "/"}
    assert inherited_socket(environ) is None  # pid 1 is not us
    assert environ == {"HOME": "/"}  # children never inherit them
    environ = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "0"}
    assert inherited_socket(environ) is None and environ == {}


def test_notify_socket_is_taken_out_of_the_environment_and_used() -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(f"\0ugem-unit-notify-{os.getpid()}")
        environ = {"NOTIFY_SOCKET": f"@ugem-unit-notify-{os.getpid()}"}
        notifier = Notifier(environ)
        try:
            assert environ == {} and notifier.enabled
            notifier.send("READY=1", "STATUS=ok")
            assert listener.recv(100) == b"READY=1\nSTATUS=ok"
            assert socket_name(listener) == f"@ugem-unit-notify-{os.getpid()}"
        finally:
            notifier.close()
    disabled = Notifier({})
    assert not disabled.enabled
    disabled.send("READY=1")  # nothing to do, nothing fails
