"""A TCP relay the test can cut, and a port that refuses to talk: network faults on loopback."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence

from .ports import free_port


def accepted(listener: socket.socket, listening: Callable[[], bool]) -> Iterator[socket.socket]:
    """Each connection *listener* (with a timeout) accepts, while *listening()* holds and it is open."""
    while listening():
        try:
            client, _ = listener.accept()
        except TimeoutError:
            continue
        except OSError:
            return
        client.settimeout(None)
        yield client


def close_socket(sock: socket.socket) -> None:
    """Shut *sock* down both ways (the peer sees the connection drop) and close it."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


class Relay:
    """Listens on one port of each of *addresses* and forwards every connection to *target*.

    `cut()` closes the listeners (new connections are refused, as while a server restarts) and drops
    every open connection; `restore()` listens again on the same port. Counts connections per
    address they arrived on, so a test can show each host used its own link.
    """

    def __init__(self, target: tuple[str, int], addresses: Sequence[str] = ("127.0.0.1",), name: str = "relay") -> None:
        self.target = target
        self.addresses = list(addresses)
        self.name = name
        self.port = 0
        self.arrivals: Counter[str] = Counter()
        self._listeners: list[socket.socket] = []
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()

    @property
    def connections(self) -> int:
        return sum(self.arrivals.values())

    @property
    def is_cut(self) -> bool:
        return not self._listeners

    def start(self) -> Relay:
        """Listen on a port free on every address."""
        for _ in range(50):
            if self._listen(free_port()):
                return self
        raise RuntimeError(f"relay {self.name}: no port free on all of {self.addresses}")

    def restore(self) -> None:
        """Listen again on the same port (after a cut)."""
        if not self._listen(self.port):
            raise RuntimeError(f"relay {self.name}: port {self.port} is taken")

    def cut(self) -> None:
        with self._lock:
            listeners, self._listeners = self._listeners, []
            open_now = list(self._open)
        for listener in listeners:
            listener.close()
        for sock in open_now:
            self._drop(sock)

    stop = cut

    def _listen(self, port: int) -> bool:
        listeners: list[socket.socket] = []
        try:
            for address in self.addresses:
                listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                listeners.append(listener)
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                listener.bind((address, port))
                listener.listen(128)
                listener.settimeout(0.1)
        except OSError:
            for listener in listeners:
                listener.close()
            return False
        with self._lock:
            self.port = port
            self._listeners = listeners
        for listener in listeners:
            threading.Thread(
                target=self._accept_loop, args=(listener,), name=f"{self.name}-accept", daemon=True
            ).start()
        return True

    def _accept_loop(self, listener: socket.socket) -> None:
        address = str(listener.getsockname()[0])
        for client in accepted(listener, lambda: listener in self._listeners):
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                if listener not in self._listeners:  # cut while connecting
                    client.close()
                    upstream.close()
                    return
                self._open.update((client, upstream))
                self.arrivals[address] += 1
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), name=f"{self.name}-pump", daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                self._drop(sock)

    def _drop(self, sock: socket.socket) -> None:
        with self._lock:
            self._open.discard(sock)
        close_socket(sock)


class RefusingServer:
    """A port where a server would be: it accepts each connection and closes it at once (the client
    sees "lost connection", an unreachable server), counting how often the client tried."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port: int = self._listener.getsockname()[1]
        self.connections = 0
        self._open = True
        self._thread = threading.Thread(target=self._serve, name="refusing-server", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        for client in accepted(self._listener, lambda: self._open):
            self.connections += 1
            close_socket(client)

    def close(self) -> None:
        self._open = False
        self._thread.join(timeout=5)
        self._listener.close()
