"""A TCP relay between MQTT clients and the real broker that a test can cut: the
network between a client and the broker fails (both ends see the connection
drop) while the broker keeps running. Not a broker double: every byte goes to
and from the real Mosquitto."""

from __future__ import annotations

import socket
import threading

from mosquitto_broker import free_port


class NetworkCut:
    """Listens on a free loopback port and relays each connection to
    ``host:port``. `cut()` closes every relayed connection at once."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.host = "127.0.0.1"
        self.port = free_port()
        self._server = socket.create_server((self.host, self.port))
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._closed = False
        self.connections = 0
        threading.Thread(target=self._accept, name="network-cut", daemon=True).start()

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return  # closed
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                if self._closed:
                    client.close()
                    upstream.close()
                    return
                self._sockets += [client, upstream]
                self.connections += 1
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> None:
        """Drop every relayed connection (a network failure: no DISCONNECT is sent)."""
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for s in sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self._server.close()
        self.cut()

    def __enter__(self) -> "NetworkCut":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
