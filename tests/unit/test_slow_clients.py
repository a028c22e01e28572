"""The body-read timeout is on the client's socket only while the body is read: the answer's
writes (a long one to a client that reads it slowly but steadily) are not bounded by it."""

from __future__ import annotations

import socket

import pytest

from api.slow_clients import BodyTimeout, TimedInput


def test_the_timeout_bounds_body_reads_and_not_the_answer() -> None:
    ours, client = socket.socketpair()
    with ours, client, ours.makefile("rb", buffering=0) as raw:
        body = TimedInput(raw, ours, 0.3)
        client.sendall(b"hello")
        assert body.read(5) == b"hello"
        assert ours.gettimeout() is None  # writing the answer may take as long as it takes
        with pytest.raises(BodyTimeout) as err:  # nothing more comes
            body.read(5)
        assert err.value.status == 408 and "BATCHVISION_API_BODY_TIMEOUT_S" in err.value.message
        # Stalled: the socket is shut for reading, so the server closes the connection after
        # the answer instead of waiting again for the rest of the body.
        assert ours.recv(1) == b""
