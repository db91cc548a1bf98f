"""The MQTT client of the station's smoke test and of the virtual firmware: paho-mqtt 2.x.

A thin shape over paho (callback API v2, MQTT 3.1.1 as the 2Smart SDK speaks it):
a blocking login that says in words why a broker refused it, a subscribe that waits
for its SUBACK, TLS against a CA file (or the system's CA store), and a close that
may come from any thread, even during the login, and leaves no thread running.
paho's own reconnecting is off: the callers decide when to try again.
"""

from __future__ import annotations

import ssl
import threading
from dataclasses import dataclass
from typing import Callable

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode


class MqttError(Exception):
    """The connection to the broker failed or ended while it was needed."""


@dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes
    retain: bool


@dataclass(frozen=True)
class BrokerTls:
    """TLS to the broker: its certificate checked against `ca_file` (None: the system's CA store)."""

    ca_file: str | None = None


def refusal_words(reason: paho.ReasonCode) -> str:
    """A CONNACK refusal as the log and the operator read it: "not authorized"."""
    return reason.getName().lower()


class MqttClient:
    """One login to one broker; `connect()` once, then subscribe and publish, then `close()`."""

    def __init__(self, host: str, port: int, client_id: str, username: str | None = None,
                 password: str | None = None, keepalive: int = 30, timeout: float = 5.0,
                 will: tuple[str, bytes, bool] | None = None, tls: BrokerTls | None = None):
        self.host, self.port, self.keepalive, self.timeout = host, port, keepalive, timeout
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv311,
                        reconnect_on_failure=False)
        c.connect_timeout = timeout
        if username is not None:
            c.username_pw_set(username, password)
        if will is not None:
            c.will_set(will[0], will[1], qos=0, retain=will[2])
        if tls is not None:
            c.tls_set(ca_certs=tls.ca_file, cert_reqs=ssl.CERT_REQUIRED)  # and the host name is checked
        c.on_connect, c.on_disconnect = self._on_connect, self._on_disconnect
        c.on_subscribe, c.on_message = self._on_subscribe, self._on_message
        self._client = c
        self._handlers: list[tuple[str, Callable[[Message], None]]] = []
        self._subacks: dict[int, list[paho.ReasonCode]] = {}  # by message id, as they come
        self._sub_cond = threading.Condition()
        self._answered = threading.Event()  # CONNACK came, or the connection ended before it
        self._refusal: str | None = None
        self._closed = threading.Event()
        self._lock = threading.Lock()  # close() against connect() starting paho's thread
        self._started = False

    def connect(self) -> str | None:
        """Log in: None when the broker accepted, else its refusal in words ("not authorized").

        Raises OSError when the broker cannot be reached (TLS failures included), MqttError
        when it does not answer the login in time or the client was closed meanwhile.
        """
        try:
            with self._lock:
                if self._closed.is_set():
                    raise MqttError("closed while connecting")
            self._client.connect(self.host, self.port, self.keepalive)  # TCP, TLS handshake, CONNECT sent
            with self._lock:
                if self._closed.is_set():
                    raise MqttError("closed while connecting")
                self._client.loop_start()
                self._started = True
            if not self._answered.wait(self.timeout):
                raise MqttError(f"no answer to the login within {self.timeout:g} s")
            if self._closed.is_set() and self._refusal is None:
                raise MqttError("the connection ended during the login")
        except BaseException:
            self.close()
            raise
        if self._refusal is not None:
            self.close()
        return self._refusal

    def _on_connect(self, client, userdata, flags, reason, properties) -> None:
        if reason.is_failure:
            self._refusal = refusal_words(reason)
            self._closed.set()
        self._answered.set()

    def _on_disconnect(self, client, userdata, flags, reason, properties) -> None:
        self._closed.set()
        self._answered.set()
        with self._sub_cond:
            self._sub_cond.notify_all()

    def _on_subscribe(self, client, userdata, mid, reasons, properties) -> None:
        with self._sub_cond:
            self._subacks[mid] = list(reasons)
            self._sub_cond.notify_all()

    def _on_message(self, client, userdata, msg: paho.MQTTMessage) -> None:
        message = Message(msg.topic, bytes(msg.payload), bool(msg.retain))
        for filt, handler in list(self._handlers):
            if paho.topic_matches_sub(filt, msg.topic):
                handler(message)

    def subscribe(self, topic_filter: str, handler: Callable[[Message], None], wait: float = 5.0) -> None:
        """Subscribe (QoS 0) and wait for the broker's SUBACK; a refused filter is an MqttError."""
        self._handlers.append((topic_filter, handler))
        rc, mid = self._client.subscribe(topic_filter, qos=0)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise MqttError(f"cannot subscribe to {topic_filter}: {paho.error_string(rc)}")
        with self._sub_cond:  # the SUBACK may come before this wait starts: it is kept by message id
            self._sub_cond.wait_for(lambda: mid in self._subacks or self._closed.is_set(), wait)
            reasons = self._subacks.pop(mid, None)
        if reasons is None:
            raise MqttError(f"no SUBACK for {topic_filter}")
        if any(r.is_failure for r in reasons):
            raise MqttError(f"the broker refused the subscription to {topic_filter}")

    def publish(self, topic: str, payload: bytes | str, retain: bool = False) -> None:
        info = self._client.publish(topic, payload, qos=0, retain=retain)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise MqttError(f"cannot publish to {topic}: {paho.error_string(info.rc)}")

    @property
    def connected(self) -> bool:
        return self._started and not self._closed.is_set() and self._client.is_connected()

    def wait_closed(self, timeout: float | None = None) -> bool:
        return self._closed.wait(timeout)

    def close(self) -> None:
        """Disconnect (from any thread) and wait for paho's network thread to end."""
        with self._lock:
            self._closed.set()
            started = self._started
        self._answered.set()
        self._client.disconnect()  # wakes paho's loop, which then ends: no reconnecting
        if started:
            self._client.loop_stop()  # joins the thread, unless called from it
