"""What a virtual board running a 2Smart-SDK firmware does after a clean boot.

It reads its configuration from the NVS config partition its firmware declares (so
a profile that writes a wrong key name gives a board that fails, as real hardware
would), starts its access point or joins "the network" (loopback here), serves the
local pairing server the 2Smart mobile app uses, and logs in to the MQTT broker
with username sha256(email) and password token, publishing its Homie attributes.
Its virtual network reaches loopback addresses only.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlparse

from ..images import PARTITION_TABLE_OFFSET, PARTITION_TABLE_SIZE, ImageError, parse_partition_table
from ..mqtt_client import BrokerTls, MqttClient, MqttError
from ..nvs import NvsEntry, NvsError, build_partition, read_keys_partition, read_partition

if TYPE_CHECKING:
    from .device import VirtualDevice

PAIR_REQUIRED_WIFI = ("ssid", "psk", "wsp", "token", "host", "brport")
PAIR_REQUIRED_WIRED = ("wsp", "token", "host", "brport")


class TwoSmartApp:
    def __init__(self, device: "VirtualDevice", manifest: dict, version: str,
                 partition_table_offset: int = PARTITION_TABLE_OFFSET):
        self.dev = device
        # one build's sdkconfig compiles the same CONFIG_PARTITION_TABLE_OFFSET into the app and its bootloader
        self.table_offset = partition_table_offset
        self.manifest = manifest
        self.version = version
        self.device_class = manifest.get("class", "wifi")
        cfg = manifest.get("config", {})
        self.partition = cfg.get("partition", "config")
        self.namespace = cfg.get("namespace", "2smart")
        self.known_keys = set(cfg.get("keys", []))
        self.encrypted = bool(cfg.get("encrypted", False))
        self.keys: bytes | None = None
        self.title = manifest.get("title", "2Smart device")
        self.config: dict[str, str | int] = {}
        self.stopped = threading.Event()
        self.server: ThreadingHTTPServer | None = None
        self.mqtt: MqttClient | None = None
        self.boot = device.boots
        self.mode = "starting"
        self.threads: list[threading.Thread] = []  # every thread this firmware run started
        self._reboot: threading.Timer | None = None

    # -- console, from any thread ---------------------------------------------------------
    def log(self, level: str, tag: str, msg: str) -> None:
        line = f"{level} ({self.dev.uptime_ms()}) {tag}: {msg}\n"
        self.say(line)

    def say(self, text: str) -> None:
        def do() -> None:
            if not self.stopped.is_set() and self.dev.boots == self.boot:
                self.dev._print(text)
        self.dev.post(do)

    # -- life cycle (device thread) ---------------------------------------------------------
    def start(self) -> None:
        if self.device_class == "other":
            self.log("I", "app", "device works behind its hub: no pairing server, no broker")
            self.mode = "hub"
            return
        error = self._load_config()
        if error:
            self.log("E", "2smart", f"config error: {error}")
            self.mode = "config-error"
            return
        ssid = self.config.get("ssid")
        if self.device_class == "no-wifi":
            self.log("I", "eth", "link up, 100 Mbps full duplex")
            address, self.mode = f"IP: {self.dev.net_ip}\n", "network"
        elif ssid:
            self.log("I", "wifi", f'connecting to "{ssid}"')
            address, self.mode = f"IP: {self.dev.net_ip}\n", "network"
        else:
            self.log("I", "wifi_ap", f'access point "{self.title} AP" started')
            address, self.mode = f"AP IP address: {self.dev.net_ip}\n", "ap"
        # listening (and its port logged) before the address: a station that reads the address
        # has the port in the same log, never port 80's default (a real board's port)
        self._start_server()
        self._address(address)
        if self.mode == "network" and self.config.get("token") and self.config.get("email"):
            self._spawn(threading.Thread(target=self._mqtt_loop, daemon=True,
                                         name=f"vdev-{self.dev.index}-mqtt"))

    def _address(self, text: str) -> None:
        delay = self.dev.faults.address_after
        if delay:  # the access point or DHCP takes its time; a reboot before then drops the line
            self.dev.schedule(delay, lambda: self.say(text))
        else:
            self.say(text)

    def _spawn(self, thread: threading.Thread) -> None:
        self.threads.append(thread)
        thread.start()

    def stop(self) -> None:
        """Stop serving and leave the broker; returns at once (the device thread calls it)."""
        self.stopped.set()
        if self._reboot is not None:
            self._reboot.cancel()
        server, self.server = self.server, None
        if server is not None:
            def shut() -> None:
                server.shutdown()  # waits for serve_forever to return: not on the device thread
                server.server_close()
            self._spawn(threading.Thread(target=shut, daemon=True, name=f"vdev-{self.dev.index}-http-stop"))
        mqtt = self.mqtt
        if mqtt is not None:
            mqtt.close()

    def running(self) -> bool:
        return any(t.is_alive() for t in self.threads)

    def join(self, timeout: float) -> None:
        """Wait until every thread of this stopped firmware run has ended."""
        deadline = time.monotonic() + timeout
        for t in list(self.threads):
            t.join(max(0.0, deadline - time.monotonic()))

    # -- configuration ----------------------------------------------------------------------
    def _slot(self):
        parts = parse_partition_table(self.dev.cache_read(self.table_offset, PARTITION_TABLE_SIZE))
        return next((p for p in parts if p.name == self.partition), None)

    def _load_config(self) -> str | None:
        try:
            slot = self._slot()
        except ImageError as exc:
            return f"partition table: {exc}"
        if slot is None:
            return f"no partition {self.partition!r} in the partition table"
        if self.encrypted:
            parts = parse_partition_table(self.dev.cache_read(self.table_offset, PARTITION_TABLE_SIZE))
            kslot = next((p for p in parts if p.type == 1 and p.subtype == 4), None)
            if kslot is None:
                return "NVS encryption is on but there is no nvs_keys partition"
            try:
                self.keys = read_keys_partition(self.dev.cache_read(kslot.offset, kslot.size))
            except NvsError as exc:
                return f"NVS encryption keys unusable: {exc}"
        image = self.dev.flash.read(slot.offset, slot.size)
        if image.count(0xFF) == len(image):
            return None  # nothing pre-specified: wait for pairing
        try:
            values = read_partition(image, self.keys).get(self.namespace, {})
        except NvsError as exc:
            if self.encrypted:
                return f"cannot decrypt partition {self.partition!r}: the NVS keys do not match ({exc})"
            return f"partition {self.partition!r} is corrupt: {exc}"
        unknown = sorted(set(values) - self.known_keys)
        if unknown:
            return (f"unknown key(s) {', '.join(repr(k) for k in unknown)} in namespace "
                    f"{self.namespace!r}: this firmware reads {', '.join(sorted(self.known_keys))}")
        self.config = dict(values)
        return None

    def store(self, updates: dict[str, str]) -> None:
        """Write the merged config to the NVS partition (called on the device thread)."""
        merged = {**self.config, **{k: v for k, v in updates.items() if v is not None}}
        slot = self._slot()
        image = build_partition(self.namespace, [
            NvsEntry(k, "string" if isinstance(v, str) else "u32", v) for k, v in merged.items()], slot.size,
            self.keys)
        self.dev.flash.erase(slot.offset, slot.size)
        self.dev.flash.program(slot.offset, image)
        self.dev.flash.sync()
        self.config = merged

    def reboot(self, delay: float = 0.3) -> None:
        def do() -> None:
            if self.dev.boots == self.boot and not self.stopped.is_set():
                self.dev._print("Restarting...\n")
                self.dev._start(False, "sw")
        self._reboot = threading.Timer(delay, lambda: self.dev.post(do))
        self._reboot.daemon = True
        self._reboot.name = f"vdev-{self.dev.index}-reboot"
        self._spawn(self._reboot)

    # -- pairing server ---------------------------------------------------------------------------
    def _start_server(self) -> None:
        if self.dev.faults.pairing == "down":
            self.log("E", "web_server", "httpd_start failed: pairing server not started")
            return
        app = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def reply(self, code: int, text: str) -> None:
                body = text.encode()
                self.send_response(code)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                fault = app.dev.faults.pairing
                url = urlparse(self.path)
                q = {k: v[0] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
                if fault == "hang" or (fault == "pair_hang" and url.path == "/pair"):
                    app.stopped.wait(300)  # accepts, never answers
                    return
                if fault == "error":
                    self.reply(500, "Internal error")
                    return
                if fault == "pair_drop" and url.path == "/pair":
                    self.close_connection = True  # hangs up without a status line
                    return
                if fault == "echo" or (fault == "pair_echo" and url.path == "/pair"):
                    self.reply(500, app.echo(self.requestline, {**app.config, **q}))
                    return
                app.handle(self, url.path, q)

            def do_POST(self) -> None:
                self.do_GET()

        try:
            self.server = ThreadingHTTPServer((self.dev.net_ip, self.dev.http_port), Handler)
        except OSError as exc:
            self.log("E", "web_server", f"cannot listen on port {self.dev.http_port}: {exc}")
            return
        self.server.daemon_threads = True
        self._spawn(threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1},
                                     daemon=True, name=f"vdev-{self.dev.index}-http"))
        self.log("I", "web_server", f"pairing server listening on port {self.dev.http_port}")

    @staticmethod
    def echo(request_line: str, values: dict) -> str:
        """A buggy firmware's error page: the request, then every value it holds, as text, base64 and hex."""
        lines = [f"cannot handle {request_line}"]
        for k, v in values.items():
            raw = str(v).encode()
            lines.append(f"{k}={v} b64={base64.b64encode(raw).decode()} "
                         f"b64url={base64.urlsafe_b64encode(raw).decode()} hex={raw.hex()}")
        return "\n".join(lines)

    def _admin_ok(self, handler: BaseHTTPRequestHandler) -> bool:
        want = base64.b64encode(f"admin:{self.config.get('admin_pass', 'admin')}".encode()).decode()
        return handler.headers.get("Authorization", "") == f"Basic {want}"

    def handle(self, h, path: str, q: dict[str, str]) -> None:
        if path == "/healthcheck":
            h.reply(200, "OK")
        elif path == "/pair":
            required = PAIR_REQUIRED_WIFI if self.device_class == "wifi" else PAIR_REQUIRED_WIRED
            if any(k not in q for k in required):
                h.reply(400, "Incorrect data")
                return
            if self.device_class == "wifi" and not q["ssid"]:
                h.reply(400, "Wifi name is NULL")
                return
            updates = {"email": q["wsp"], "token": q["token"], "host": q["host"], "brport": q["brport"]}
            if self.device_class == "wifi":
                updates.update(ssid=q["ssid"], psk=q["psk"])
            if q.get("mqtts_port"):
                updates["mqtts_port"] = q["mqtts_port"]
            if q.get("rootTopic"):
                updates["rootTopic"] = q["rootTopic"]
            try:
                self.dev.call(lambda: self.store(updates))
            except (NvsError, ImageError, ValueError) as exc:
                h.reply(500, f"Cannot save settings: {exc}")
                return
            h.reply(200, "OK")
            self.log("I", "web_server", "pairing data saved, rebooting")
            self.reboot()
        elif path in ("/setwifi", "/setcredentials", "/resetdefault", "/reboot", "/firmware/upload"):
            if not self._admin_ok(h):
                h.send_response(401)
                h.send_header("WWW-Authenticate", 'Basic realm="2Smart"')
                h.send_header("Content-Length", "0")
                h.end_headers()
                return
            if path == "/setwifi":
                self.dev.call(lambda: self.store({"ssid": q.get("ssid", ""), "psk": q.get("pass", "")}))
            elif path == "/setcredentials":
                names = {"mail": "email", "token": "token", "hostname": "host", "brokerPort": "brport",
                         "productId": "product_id", "deviceId": "device_id"}
                self.dev.call(lambda: self.store({names[k]: v for k, v in q.items() if k in names}))
            elif path == "/resetdefault":
                def wipe() -> None:
                    slot = self._slot()
                    self.dev.flash.erase(slot.offset, slot.size)
                    self.config = {}
                self.dev.call(wipe)
            elif path == "/firmware/upload":
                h.reply(501, "Not supported by the virtual device")
                return
            h.reply(200, "OK")
            if path in ("/reboot", "/resetdefault", "/setwifi"):
                self.reboot()
        else:
            h.reply(404, "Not found")

    # -- broker ---------------------------------------------------------------------------------
    @property
    def device_id(self) -> str:
        return str(self.config.get("device_id") or self.dev.mac_text.replace(":", "-"))

    def _mqtt_loop(self) -> None:
        email = str(self.config["email"])
        user = hashlib.sha256(email.encode()).hexdigest()
        token = str(self.config["token"])
        if self.dev.faults.mqtt_refused:
            token += "!"  # a token the broker does not know
        host = str(self.config.get("host", "cloud.2smart.com"))
        port = int(str(self.config.get("brport", "1883")) or 1883)
        tls = None
        if str(self.config.get("mqtts_port", "")).isdigit():  # the SDK logs in over TLS when paired with it
            port, tls = int(str(self.config["mqtts_port"])), BrokerTls(self.dev.broker_ca_file)
        root = f"{user}/sweet-home/{self.device_id}"
        while not self.stopped.is_set():
            try:
                addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][4][0]
                if not ipaddress.ip_address(addr).is_loopback:
                    raise OSError(f"{host} is outside the virtual network (it reaches this machine only)")
                self.log("I", "mqtt", f"connecting to {host}:{port}")
                client = MqttClient(host if tls else addr, port, self.device_id, user, token,  # TLS checks the name
                                    keepalive=max(10, int(self.dev.heartbeat_s * 3)),
                                    will=(f"{root}/$state", b"lost", True), tls=tls)
                self.mqtt = client  # stop() closes it, also while it is still connecting
                if self.stopped.is_set():
                    break
                refused = client.connect()
            except (OSError, MqttError) as exc:
                self.log("E", "mqtt", f"cannot reach broker {host}:{port}: {exc}; retrying in "
                         f"{self.dev.mqtt_retry_s:g} s")
                self.stopped.wait(self.dev.mqtt_retry_s)
                continue
            if refused:
                self.log("E", "mqtt", f"broker refused login for this device: {refused}; "
                         f"retrying in {self.dev.mqtt_retry_s:g} s")
                self.stopped.wait(self.dev.mqtt_retry_s)
                continue
            if self.stopped.is_set():
                client.close()
                return
            self.log("I", "mqtt", "connected, publishing device attributes")
            try:
                major = self.version.split(".")[0]
                attrs = {"$homie": "3.0.1", "$name": self.title, "$localip": self.dev.net_ip,
                         "$mac": self.dev.mac_text.upper(), "$fw/name": str(self.config.get("product_id", "")),
                         "$fw/version": major if major.isdigit() else "0",
                         "$implementation": self.dev.chip.key, "$state": "init"}
                for k, v in attrs.items():
                    client.publish(f"{root}/{k}", v, retain=True)
                client.publish(f"{root}/$state", "ready", retain=True)
                while not self.stopped.is_set() and client.connected:
                    client.publish(f"{root}/$heartbeat", str(int(time.time())))
                    if self.stopped.wait(self.dev.heartbeat_s):
                        break
            except (OSError, MqttError):
                pass
            client.close()
            if not self.stopped.is_set():
                self.log("W", "mqtt", "connection lost; reconnecting")
                self.stopped.wait(1.0)
