"""A small MQTT 3.1.1 client and broker: enough for 2Smart devices and the smoke test.

The client is what the virtual device's firmware logs in with (username
sha256(email), password token) and what the station's smoke test subscribes with.
The broker is the demo's embedded one, so the README's main command needs nothing
installed; tests use a real Mosquitto. QoS 0 and 1 publish, retained messages,
wildcard subscriptions, keep-alive, last will, username/password accounts, and the
part of Mosquitto's dynamic-security API the station uses for per-unit test accounts
(createRole, createClient, deleteClient, deleteRole; a client made so may publish and
subscribe only within its role's topic filters).
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Callable

CONNECT, CONNACK, PUBLISH, PUBACK = 1, 2, 3, 4
SUBSCRIBE, SUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 12, 13, 14
CONNACK_CODES = {0: "accepted", 1: "unacceptable protocol version", 2: "identifier rejected",
                 3: "server unavailable", 4: "bad user name or password", 5: "not authorized"}


class MqttError(Exception):
    pass


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n % 128
        n //= 128
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _str(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack(">H", len(b)) + b


def packet(ptype: int, flags: int, body: bytes) -> bytes:
    return bytes([(ptype << 4) | flags]) + _varint(len(body)) + body


def read_packet(sock: socket.socket) -> tuple[int, int, bytes]:
    head = _recv(sock, 1)[0]
    mult, length = 1, 0
    while True:
        b = _recv(sock, 1)[0]
        length += (b & 0x7F) * mult
        if not b & 0x80:
            break
        mult *= 128
    return head >> 4, head & 0x0F, _recv(sock, length)


def _recv(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed")
        buf += chunk
    return bytes(buf)


def topic_matches(filt: str, topic: str) -> bool:
    f, t = filt.split("/"), topic.split("/")
    for i, part in enumerate(f):
        if part == "#":
            return True
        if i >= len(t) or (part != "+" and part != t[i]):
            return False
    return len(f) == len(t)


@dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes
    retain: bool


class MqttClient:
    def __init__(self, host: str, port: int, client_id: str, username: str | None = None,
                 password: str | None = None, keepalive: int = 30, timeout: float = 5.0,
                 will: tuple[str, bytes, bool] | None = None):
        self.host, self.port, self.client_id = host, port, client_id
        self.username, self.password, self.keepalive = username, password, keepalive
        self.timeout, self.will = timeout, will
        self.sock: socket.socket | None = None
        self._handlers: list[tuple[str, Callable[[Message], None]]] = []
        self._lock = threading.Lock()
        self._pid = 0
        self._closed = threading.Event()
        self._subacks: dict[int, threading.Event] = {}
        self._connecting: socket.socket | None = None
        self._threads: list[threading.Thread] = []

    def connect(self) -> int:
        """Connect and log in; returns the CONNACK code (0 = accepted)."""
        sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        self._connecting = sock  # close() from another thread ends a login that waits
        if self._closed.is_set():
            sock.close()
            raise MqttError("closed while connecting")
        try:
            return self._login(sock)
        except BaseException:
            sock.close()
            raise
        finally:
            self._connecting = None

    def _login(self, sock: socket.socket) -> int:
        flags = 0x02
        payload = _str(self.client_id)
        if self.will:
            topic, msg, retain = self.will
            flags |= 0x04 | (0x20 if retain else 0)
            payload += _str(topic) + _str(msg)
        if self.username is not None:
            flags |= 0x80
            payload += _str(self.username)
        if self.password is not None:
            flags |= 0x40
            payload += _str(self.password)
        body = _str("MQTT") + bytes([4, flags]) + struct.pack(">H", self.keepalive) + payload
        sock.sendall(packet(CONNECT, 0, body))
        ptype, _, data = read_packet(sock)
        if ptype != CONNACK or len(data) != 2:
            sock.close()
            raise MqttError("broker did not answer CONNECT with CONNACK")
        if data[1] != 0:
            sock.close()
            return data[1]
        sock.settimeout(None)
        self.sock = sock
        threads = [threading.Thread(target=self._reader, daemon=True, name=f"mqtt-{self.client_id}"),
                   threading.Thread(target=self._pinger, daemon=True, name=f"mqtt-{self.client_id}-ping")]
        for t in threads:
            t.start()
        self._threads = threads  # only started threads: a close() from another thread joins them
        return 0

    def _send(self, data: bytes) -> None:
        with self._lock:
            if self.sock is None:
                raise MqttError("not connected")
            self.sock.sendall(data)

    def publish(self, topic: str, payload: bytes | str, retain: bool = False) -> None:
        body = _str(topic) + (payload.encode() if isinstance(payload, str) else payload)
        self._send(packet(PUBLISH, 0x01 if retain else 0, body))

    def subscribe(self, topic_filter: str, handler: Callable[[Message], None], wait: float = 5.0) -> None:
        self._pid = self._pid % 65535 + 1
        done = threading.Event()
        self._subacks[self._pid] = done
        self._handlers.append((topic_filter, handler))
        self._send(packet(SUBSCRIBE, 0x02, struct.pack(">H", self._pid) + _str(topic_filter) + b"\x00"))
        if not done.wait(wait):
            raise MqttError(f"no SUBACK for {topic_filter}")

    def _reader(self) -> None:
        try:
            while not self._closed.is_set():
                ptype, flags, data = read_packet(self.sock)
                if ptype == PUBLISH:
                    tlen = struct.unpack(">H", data[:2])[0]
                    topic = data[2 : 2 + tlen].decode()
                    pos = 2 + tlen
                    if (flags >> 1) & 3:
                        pid = data[pos : pos + 2]
                        pos += 2
                        self._send(packet(PUBACK, 0, pid))
                    msg = Message(topic, data[pos:], bool(flags & 1))
                    for filt, handler in list(self._handlers):
                        if topic_matches(filt, topic):
                            handler(msg)
                elif ptype == SUBACK:
                    ev = self._subacks.pop(struct.unpack(">H", data[:2])[0], None)
                    if ev:
                        ev.set()
        except (OSError, ConnectionError, MqttError):
            pass
        finally:
            self._closed.set()

    def _pinger(self) -> None:
        while not self._closed.wait(max(1.0, self.keepalive / 2)):
            try:
                self._send(packet(PINGREQ, 0, b""))
            except (OSError, MqttError):
                return

    @property
    def connected(self) -> bool:
        return self.sock is not None and not self._closed.is_set()

    def wait_closed(self, timeout: float | None = None) -> bool:
        return self._closed.wait(timeout)

    def close(self) -> None:
        """Disconnect and wait for the reader and pinger threads to end."""
        if self.sock is not None and not self._closed.is_set():
            try:
                self._send(packet(DISCONNECT, 0, b""))
            except (OSError, MqttError):
                pass
        self._closed.set()
        for sock in (self._connecting, self.sock):
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        if self.sock is not None:
            self.sock.close()
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(5)


DYNSEC = "$CONTROL/dynamic-security/v1"


class EmbeddedBroker:
    """A broker for demos on loopback: accounts optional, retained messages, wildcards."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0,
                 accounts: dict[str, str] | None = None, admin: tuple[str, str] | None = None):
        self.accounts = dict(accounts or {}) if accounts is not None or admin else None  # None: anyone may log in
        self.admin = admin[0] if admin else None  # may send dynamic-security commands
        if admin:
            self.accounts[admin[0]] = admin[1]
        self._roles: dict[str, list[str]] = {}  # role -> topic filters it allows
        self._limited: dict[str, list[str]] = {}  # username -> roles, for clients made over $CONTROL
        self._users: dict[socket.socket, str | None] = {}
        self._srv = socket.create_server((host, port))
        self.host, self.port = self._srv.getsockname()[:2]
        self._lock = threading.Lock()
        self._subs: list[tuple[socket.socket, str]] = []
        self._retained: dict[str, bytes] = {}
        self._clients: set[socket.socket] = set()  # every connection, logged in or not yet
        self._closed = False
        self._threads = [threading.Thread(target=self._accept, daemon=True, name="mqtt-broker")]
        self._threads[0].start()

    def close(self) -> None:
        """Stop listening, drop every client and wait for the broker's threads to end."""
        self._closed = True
        try:
            self._srv.shutdown(socket.SHUT_RDWR)  # wakes accept(); close() alone does not
        except OSError:
            pass
        self._srv.close()
        with self._lock:
            clients = list(self._clients)
        for c in clients:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        deadline = time.monotonic() + 5
        for t in list(self._threads):
            t.join(max(0.0, deadline - time.monotonic()))

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._srv.accept()
            except OSError:
                return
            with self._lock:
                if self._closed:
                    conn.close()
                    return
                self._clients.add(conn)
                self._threads = [t for t in self._threads if t.is_alive()]
                t = threading.Thread(target=self._serve, args=(conn,), daemon=True, name="mqtt-broker-client")
                self._threads.append(t)
            t.start()

    def _deliver(self, topic: str, payload: bytes, retain_flag: bool, only: socket.socket | None = None) -> None:
        data = packet(PUBLISH, 0x01 if retain_flag else 0, _str(topic) + payload)
        with self._lock:
            targets = [(c, f) for c, f in self._subs if only is None or c is only]
        for c, f in targets:
            if topic_matches(f, topic):
                try:
                    c.sendall(data)
                except OSError:
                    pass

    def _may(self, user: str | None, topic: str) -> bool:
        """Whether `user` may publish to (or subscribe to) `topic`."""
        with self._lock:
            if self.accounts is not None and user not in self.accounts:
                return False  # deleted while connected: not even its will goes out
            if topic.startswith("$"):
                return False
            roles = self._limited.get(user)
            if roles is None:
                return True
            return any(topic_matches(f, topic) for r in roles for f in self._roles.get(r, []))

    def _control(self, conn: socket.socket, payload: bytes) -> None:
        """The dynamic-security commands the station sends, answered on `.../response`."""
        try:
            commands = json.loads(payload)["commands"]
        except (ValueError, KeyError, TypeError):
            return
        responses = []
        for c in commands if isinstance(commands, list) else []:
            if not isinstance(c, dict):
                continue
            try:
                error, gone = self._command(c)
            except (KeyError, TypeError, AttributeError) as exc:
                error, gone = f"Invalid command: {exc}", []
            for s in gone:  # as Mosquitto does: a deleted client is disconnected
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            answer = {"command": c.get("command"), **({"error": error} if error else {})}
            if "correlationData" in c:
                answer["correlationData"] = c["correlationData"]
            responses.append(answer)
        self._deliver(f"{DYNSEC}/response", json.dumps({"responses": responses}).encode(), False, only=conn)

    def _command(self, c: dict) -> tuple[str | None, list[socket.socket]]:
        """Apply one command: its error text (None: done) and the connections to drop."""
        name, error, kick = c.get("command"), None, None
        with self._lock:
            if name == "createRole":
                self._roles[str(c["rolename"])] = [str(a["topic"]) for a in c.get("acls", []) if a.get("allow")
                                                   and a.get("acltype") in ("publishClientSend", "subscribePattern")]
            elif name == "createClient":
                if c["username"] in self.accounts:
                    error = "Client already exists"
                else:
                    self.accounts[str(c["username"])] = str(c.get("password", ""))
                    self._limited[str(c["username"])] = [str(r["rolename"]) for r in c.get("roles", [])]
            elif name == "deleteClient":
                kick = str(c["username"])
                if self.accounts.pop(kick, None) is None:
                    error = "Client not found"
                self._limited.pop(kick, None)
            elif name == "deleteRole":
                if self._roles.pop(str(c["rolename"]), None) is None:
                    error = "Role not found"
            else:
                error = "Unknown command"
            gone = [s for s, u in self._users.items() if kick is not None and u == kick]
        return error, gone

    def _serve(self, conn: socket.socket) -> None:
        will = None
        user = None
        try:
            ptype, _, data = read_packet(conn)
            if ptype != CONNECT:
                return
            pos = 2 + struct.unpack(">H", data[:2])[0]
            flags = data[pos + 1]
            pos += 4

            def field() -> bytes:
                nonlocal pos
                n = struct.unpack(">H", data[pos : pos + 2])[0]
                v = data[pos + 2 : pos + 2 + n]
                pos += 2 + n
                return v

            field()  # client id
            if flags & 0x04:
                will = (field().decode(), field(), bool(flags & 0x20))
            user = field().decode() if flags & 0x80 else None
            pw = field().decode() if flags & 0x40 else None
            with self._lock:
                refused = self.accounts is not None and (user not in self.accounts or self.accounts[user] != pw)
                if not refused:
                    self._users[conn] = user
            if refused:
                conn.sendall(packet(CONNACK, 0, b"\x00\x05"))
                return
            conn.sendall(packet(CONNACK, 0, b"\x00\x00"))
            while True:
                ptype, flags, data = read_packet(conn)
                if ptype == PUBLISH:
                    tlen = struct.unpack(">H", data[:2])[0]
                    topic = data[2 : 2 + tlen].decode()
                    pos = 2 + tlen
                    if (flags >> 1) & 3:
                        conn.sendall(packet(PUBACK, 0, data[pos : pos + 2]))
                        pos += 2
                    payload = data[pos:]
                    if topic == DYNSEC and user is not None and user == self.admin:
                        self._control(conn, payload)
                        continue
                    if not self._may(user, topic):
                        continue  # as Mosquitto does for QoS 0: dropped without a word
                    if flags & 1:
                        with self._lock:
                            if payload:
                                self._retained[topic] = payload
                            else:
                                self._retained.pop(topic, None)
                    self._deliver(topic, payload, False)
                elif ptype == SUBSCRIBE:
                    pid = data[:2]
                    pos, filters = 2, []
                    while pos < len(data):
                        n = struct.unpack(">H", data[pos : pos + 2])[0]
                        filters.append(data[pos + 2 : pos + 2 + n].decode())
                        pos += 3 + n
                    allowed = [f for f in filters if self._may(user, f) or
                               (user is not None and user == self.admin and f == f"{DYNSEC}/response")]
                    with self._lock:
                        self._subs += [(conn, f) for f in allowed]
                        retained = list(self._retained.items())
                    conn.sendall(packet(SUBACK, 0, pid + bytes(0 if f in allowed else 0x80 for f in filters)))
                    for topic, payload in retained:
                        if any(topic_matches(f, topic) for f in filters):
                            conn.sendall(packet(PUBLISH, 0x01, _str(topic) + payload))
                elif ptype == PINGREQ:
                    conn.sendall(packet(PINGRESP, 0, b""))
                elif ptype == DISCONNECT:
                    will = None
                    return
        except (OSError, ConnectionError, struct.error, IndexError):
            pass
        finally:
            with self._lock:
                self._subs = [(c, f) for c, f in self._subs if c is not conn]
                self._clients.discard(conn)
                self._users.pop(conn, None)
            if will and not self._may(user, will[0]):
                will = None
            if will:
                topic, payload, retain = will
                if retain:
                    with self._lock:
                        self._retained[topic] = payload
                self._deliver(topic, payload, False)
            conn.close()
