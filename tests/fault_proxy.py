"""A TCP proxy that drops connections on purpose: network faults for the object-store tests.

proxy = FaultProxy(target_port)        # clients talk to 127.0.0.1:proxy.port
proxy.cut()                            # every open connection is reset, new ones too
proxy.busy()                           # every new request is answered 503 SlowDown (throttling)
proxy.restore()                        # connections pass again
"""

from __future__ import annotations

import socket
import struct
import threading


def _reset(s: socket.socket) -> None:
    """Drop a connection as a failing network does: the peer sees it end at once (a close from
    another thread alone would neither wake a pump blocked in recv nor tell the peer)."""
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    s.close()


class FaultProxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1"):
        self.target = (target_host, target_port)
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.port = self.listener.getsockname()[1]
        self.down = threading.Event()
        self.slow_down = False
        self.requests = 0  # connections forwarded (tests wait for traffic before cutting)
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cut(self) -> None:
        self.down.set()
        with self._lock:
            for s in list(self._open):
                _reset(s)
            self._open.clear()

    def busy(self) -> None:
        self.slow_down = True

    def restore(self) -> None:
        self.down.clear()
        self.slow_down = False

    def close(self) -> None:
        self.cut()
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.down.is_set():
                _reset(client)
                continue
            if self.slow_down:
                threading.Thread(target=self._answer_503, args=(client,), daemon=True).start()
                continue
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                _reset(client)
                continue
            with self._lock:
                self._open |= {client, upstream}
                self.requests += 1
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while not self.down.is_set():
                data = src.recv(1 << 16)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        with self._lock:
            for s in (src, dst):
                if s in self._open:
                    self._open.discard(s)
                    _reset(s) if self.down.is_set() else s.close()

    def _answer_503(self, client: socket.socket) -> None:
        """What a throttling S3 answers: 503 SlowDown, then the connection closes."""
        body = (
            b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
            b"<Message>Please reduce your request rate.</Message></Error>"
        )
        head = b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nConnection: close\r\n"
        try:
            client.settimeout(5)
            seen = b""
            while b"\r\n\r\n" not in seen:
                data = client.recv(1 << 16)
                if not data:
                    break
                seen += data
            answer = head + b"Content-Length: %d\r\n\r\n" % len(body)
            client.sendall(answer if seen.startswith(b"HEAD ") else answer + body)  # HEAD: headers only
            # Unread request bytes at close would turn the close into a reset, racing the answer.
            client.shutdown(socket.SHUT_WR)
            while client.recv(1 << 16):
                pass
        except OSError:
            pass
        client.close()
