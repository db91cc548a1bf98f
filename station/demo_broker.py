"""The demo's embedded MQTT broker: amqtt on loopback, run from Python, no files written.

It stands in for the factory's Mosquitto so that `station demo` needs nothing installed:
username/password accounts (refused logins get CONNACK "not authorized", as Mosquitto's
dynamic-security plugin answers), the part of that plugin's API the station drives
(createRole, createClient, deleteClient, deleteRole on `$CONTROL/dynamic-security/v1`,
answered on `.../response`), and Mosquitto's ACLs for each kind of account: the admin
only on `$CONTROL`, the monitor reads everything, a client made over `$CONTROL` only
within its role's topic filters, and any other account `pattern readwrite %u/#`.
amqtt runs on its own asyncio loop in one thread; `close()` ends it and that thread.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from dataclasses import dataclass
from typing import Any

from amqtt.broker import Broker
from amqtt.contexts import Action, BrokerConfig, ListenerConfig
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from paho.mqtt.client import topic_matches_sub

DYNSEC = "$CONTROL/dynamic-security/v1"


class Accounts:
    """Who may log in and what each may touch; read and changed on the broker's loop only."""

    def __init__(self, accounts: dict[str, str], admin: str | None, monitor: str | None):
        self.passwords = dict(accounts)
        self.admin, self.monitor = admin, monitor
        self.roles: dict[str, list[str]] = {}  # role -> topic filters it allows
        self.limited: dict[str, list[str]] = {}  # username -> roles, for clients made over $CONTROL

    def login(self, user: str | None, password: str | None) -> bool:
        return user is not None and user in self.passwords and self.passwords[user] == password

    def may(self, user: str | None, topic: str, action: Action) -> bool:
        """Whether `user` may publish to, or subscribe to, `topic` (a name or a filter)."""
        if user is None or user not in self.passwords:
            return False  # deleted while connected
        if user == self.admin:
            return topic == f"{DYNSEC}/response" and action == Action.SUBSCRIBE
        if topic.startswith("$"):
            return False
        if user == self.monitor:
            return action != Action.PUBLISH  # reads every device topic, writes none
        if user in self.limited:
            return any(topic_matches_sub(f, topic) for r in self.limited[user] for f in self.roles.get(r, []))
        return topic_matches_sub(f"{user}/#", topic)  # Mosquitto's `pattern readwrite %u/#`

    def command(self, c: dict) -> tuple[str | None, str | None]:
        """Apply one dynamic-security command: its error text (None: done) and a username to disconnect."""
        name = c.get("command")
        if name == "createRole":
            self.roles[str(c["rolename"])] = [str(a["topic"]) for a in c.get("acls", []) if a.get("allow")
                                              and a.get("acltype") in ("publishClientSend", "subscribePattern")]
        elif name == "createClient":
            if c["username"] in self.passwords:
                return "Client already exists", None
            self.passwords[str(c["username"])] = str(c.get("password", ""))
            self.limited[str(c["username"])] = [str(r["rolename"]) for r in c.get("roles", [])]
        elif name == "deleteClient":
            user = str(c["username"])
            self.limited.pop(user, None)
            if self.passwords.pop(user, None) is None:
                return "Client not found", None
            return None, user  # as Mosquitto does: a deleted client is disconnected
        elif name == "deleteRole":
            if self.roles.pop(str(c["rolename"]), None) is None:
                return "Role not found", None
        else:
            return "Unknown command", None
        return None, None


class AccountsAuth(BaseAuthPlugin):
    @dataclass
    class Config:
        accounts: Any = None

    async def authenticate(self, *, session) -> bool:
        return self.config.accounts.login(session.username, session.password)


class AccountsAcl(BaseTopicPlugin):
    @dataclass
    class Config:
        accounts: Any = None

    async def topic_filtering(self, *, session=None, topic=None, action=None) -> bool:
        if action == Action.RECEIVE:
            return True  # what a client may receive is settled when it subscribes
        return topic is not None and self.config.accounts.may(session.username if session else None, topic, action)


class _DynsecBroker(Broker):
    """amqtt's broker, answering the dynamic-security topic that amqtt would otherwise refuse ($-topics)."""

    accounts: Accounts

    async def _handle_message_delivery(self, client_session, handler, wait_deliver) -> bool:
        message = wait_deliver.result()
        if message is None or message.topic != DYNSEC:
            return await super()._handle_message_delivery(client_session, handler, wait_deliver)
        if client_session.username is not None and client_session.username == self.accounts.admin:
            await self._control(bytes(message.data))
        return True  # anyone else's command is dropped without a word, as Mosquitto does

    async def _control(self, payload: bytes) -> None:
        try:
            commands = json.loads(payload)["commands"]
        except (ValueError, KeyError, TypeError):
            return
        responses = []
        for c in commands if isinstance(commands, list) else []:
            if not isinstance(c, dict):
                continue
            try:
                error, kick = self.accounts.command(c)
            except (KeyError, TypeError, AttributeError) as exc:
                error, kick = f"Invalid command: {exc}", None
            if kick is not None:
                await self._disconnect(kick)
            answer = {"command": c.get("command"), **({"error": error} if error else {})}
            if "correlationData" in c:
                answer["correlationData"] = c["correlationData"]
            responses.append(answer)
        await self.internal_message_broadcast(f"{DYNSEC}/response", json.dumps({"responses": responses}).encode())

    async def _disconnect(self, user: str) -> None:
        for session, handler in list(self._sessions.values()):
            if session.username == user and handler is not None and handler.writer is not None:
                session.will_flag = False  # a deleted client's will does not go out
                await handler.writer.close()


class DemoBroker:
    """The broker on `host`, a free port when `port` is 0; `accounts` user -> password.

    `admin` (user, password) may send dynamic-security commands; `monitor` names the
    account that reads every topic. Listening when the constructor returns.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, accounts: dict[str, str] | None = None,
                 admin: tuple[str, str] | None = None, monitor: str | None = None):
        self.host, self.port = host, port
        passwords = dict(accounts or {})
        if admin:
            passwords[admin[0]] = admin[1]
        self._accounts = Accounts(passwords, admin[0] if admin else None, monitor)
        log = logging.getLogger("amqtt")  # its records name clients and topics: not the station's log
        log.propagate = False
        log.addHandler(logging.NullHandler())
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._failed: BaseException | None = None
        self._broker: _DynsecBroker | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name="mqtt-broker")
        self._thread.start()
        self._ready.wait()
        if self._failed is not None:
            self._thread.join()
            raise OSError(f"the demo broker could not start on {self.host}:{self.port} ({self._failed})")

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._start())
        except BaseException as exc:  # noqa: BLE001 - reported by the constructor
            self._failed = exc
        self._ready.set()
        if self._failed is None:
            self._loop.run_forever()
            self._loop.run_until_complete(self._broker.shutdown())
        self._loop.run_until_complete(self._loop.shutdown_default_executor())
        self._loop.close()

    async def _start(self) -> None:
        plugin = {"accounts": self._accounts}
        config = BrokerConfig(
            listeners={"default": ListenerConfig(bind=f"{self.host}:{self.port}")},
            plugins={f"{__name__}.AccountsAuth": plugin, f"{__name__}.AccountsAcl": plugin})
        broker = _DynsecBroker(config, loop=self._loop)
        broker.accounts = self._accounts
        await broker.start()
        self._broker = broker
        self.port = broker._servers["default"].instance.sockets[0].getsockname()[1]  # the port 0 became

    def close(self) -> None:
        """Drop every client, stop listening and end the broker's thread."""
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
