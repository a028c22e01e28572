"""Absolute deadlines on blocking sockets.

A socket timeout bounds each read, not an exchange: a peer that sends one byte just before
each read times out (a status line, a header, a TLS handshake or a chunk-size line dripped a
byte at a time) holds the thread for as long as it likes. :class:`Watchdog` shuts a socket
down at an absolute time, which ends at once every read or write blocked on it, and every
later one.

It watches a duplicate of the socket's descriptor, its own: the watched socket may be closed,
or wrapped in TLS (which detaches the plain socket), and its descriptor number reused by
another connection, without the shutdown ever reaching anything but the connection watched.
"""

from __future__ import annotations

import heapq
import itertools
import os
import socket
import threading
import time


class Watchdog:
    """Shuts sockets down at their deadlines (``time.monotonic()`` times), from one thread."""

    def __init__(self, name: str = "socket-deadlines") -> None:
        self._name = name
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int]] = []
        self._live: dict[int, socket.socket] = {}
        self._by_fd: dict[int, int] = {}  # the watched socket's descriptor -> its latest watch
        self._fd_of: dict[int, int] = {}  # and back
        self._tickets = itertools.count()
        self._thread: threading.Thread | None = None
        self.fired = 0  # how many sockets were shut down at their deadline (tests)

    def watch(self, sock: socket.socket, at: float) -> int:
        """Shut ``sock``'s connection down at ``at`` unless :meth:`cancel` comes first; returns
        the ticket to cancel it with. Raises ``OSError`` for a socket already closed."""
        fd = sock.fileno()
        own = socket.socket(sock.family, sock.type, sock.proto, fileno=os.dup(fd))
        with self._cond:
            ticket = next(self._tickets)
            self._live[ticket] = own
            self._by_fd[fd] = ticket
            self._fd_of[ticket] = fd
            heapq.heappush(self._heap, (at, ticket))
            if self._thread is None or not self._thread.is_alive():
                # Started lazily, in the process that uses it (workers fork after import).
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            self._cond.notify()
        return ticket

    def cancel(self, ticket: int) -> None:
        """Forget a watch (the exchange ended in time); its descriptor is closed."""
        with self._cond:
            own = self._live.pop(ticket, None)
            self._unmap(ticket)
        if own is not None:
            own.close()

    def forget(self, sock: socket.socket) -> None:
        """Cancel the latest watch of ``sock`` (it changes hands: back to a connection pool)."""
        with self._cond:
            ticket = self._by_fd.pop(sock.fileno(), None)
        if ticket is not None:
            self.cancel(ticket)

    def watching(self) -> int:
        """How many sockets are watched now (tests, metrics)."""
        with self._cond:
            return len(self._live)

    def _next_due(self) -> socket.socket:
        with self._cond:
            while True:
                while self._heap and self._heap[0][1] not in self._live:
                    heapq.heappop(self._heap)  # canceled
                if not self._heap:
                    self._cond.wait()
                    continue
                at, ticket = self._heap[0]
                left = at - time.monotonic()
                if left <= 0:
                    heapq.heappop(self._heap)
                    self.fired += 1
                    self._unmap(ticket)
                    return self._live.pop(ticket)
                self._cond.wait(left)

    def _unmap(self, ticket: int) -> None:
        fd = self._fd_of.pop(ticket, None)
        if fd is not None and self._by_fd.get(fd) == ticket:
            del self._by_fd[fd]

    def _run(self) -> None:
        while True:
            own = self._next_due()
            try:
                own.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # the peer or the owner closed it already
            finally:
                own.close()


#: The process's watchdog (its thread starts with the first watch).
WATCHDOG = Watchdog()
