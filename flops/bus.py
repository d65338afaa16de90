"""The MQTT bus: one paho 2.x (MQTT 5) client, QoS 1, persistent session, callbacks that only enqueue.

paho's network thread runs the callbacks; they convert the packet into an :class:`Inbound` and put it on a
queue. Whoever owns the bus (the manager's worker, an agent, the CLI) drains that queue. Publishing is
bounded: at most ``max_inflight`` unacknowledged QoS 1 messages (paho refuses beyond ~65k), every
``publish()`` result is checked, and TCP_NODELAY is set on the socket (paho never does, and Nagle plus
delayed ACK turns a sub-millisecond hop into ~40-90 ms).
"""

from __future__ import annotations

import contextlib
import queue
import socket
import ssl
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from flops.errors import BrokerUnavailable, PublishFailed
from flops.settings import BrokerAddress

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Inbound:
    """One received message, as handed from paho's thread to the owner's worker."""

    topic: str
    payload: bytes
    mid: int
    qos: int
    retain: bool
    response_topic: str | None = None
    correlation_data: bytes | None = None


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes
    retain: bool = True


@dataclass
class BusOptions:
    client_id: str
    subscriptions: list[str] = field(default_factory=list)
    clean_start: bool = True
    session_expiry_s: int = 0
    manual_ack: bool = False
    will: Will | None = None
    # Published (retained) on every (re)connect once the subscriptions are acknowledged, e.g. an agent's
    # "online" status: whoever reacts to it (the manager re-sending commands) finds us subscribed.
    birth: Callable[[], tuple[str, bytes]] | None = None
    # Called on paho's thread after every (re)connect once subscribed, with the broker's session_present:
    # False means a fresh session (a restarted broker without persistence), where retained messages and
    # queued deliveries may be gone. Implementations only enqueue.
    on_ready: Callable[[bool], None] | None = None
    max_inflight: int = 10_000
    keepalive: int = 30
    ca_file: str | None = None
    client_cert: str | None = None
    client_key: str | None = None


class Bus:
    """A connected MQTT client whose received messages land on :attr:`inbox`."""

    def __init__(self, address: BrokerAddress, options: BusOptions) -> None:
        self.address = address
        self.options = options
        self.inbox: queue.Queue[Inbound] = queue.Queue()
        self._connected = threading.Event()
        self._answered = threading.Event()
        self._subscribed = threading.Event()
        self._pending_subs: set[int] = set()
        self._connect_error: str | None = None
        self._inflight = threading.BoundedSemaphore(min(options.max_inflight, 65_000))
        # mid -> (on_acked, on_refused); a PUBACK with a reason code >= 0x80 is a refusal (ACL, quota).
        self._acked: dict[int, tuple[Callable[[], None], Callable[[str], None] | None]] = {}
        self._early_acks: dict[int, str | None] = {}
        self._lock = threading.RLock()
        self._closing = False
        self.session_present = False
        self._log = log.bind(client_id=options.client_id, broker=address.url)

        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=options.client_id,
            protocol=mqtt.MQTTv5,
            manual_ack=options.manual_ack,
        )
        # No paho-side window: paho re-scans every unacknowledged message on each PUBACK when one is set
        # (quadratic under load). ``_inflight`` below is the bound; paho refuses beyond ~65k mids anyway.
        client.max_inflight_messages_set(0)
        client.max_queued_messages_set(0)
        if address.username:
            client.username_pw_set(address.username, address.password)
        if address.tls:
            context = ssl.create_default_context(cafile=options.ca_file)
            if options.client_cert:
                context.load_cert_chain(options.client_cert, options.client_key)
            client.tls_set_context(context)
        if options.will:
            client.will_set(options.will.topic, options.will.payload, qos=1, retain=options.will.retain)
        client.reconnect_delay_set(min_delay=1, max_delay=10)
        client.on_socket_open = self._on_socket_open
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        self._client = client

    # --- lifecycle ---------------------------------------------------------------------------------

    def connect(self, timeout: float = 10.0) -> Bus:
        """Connect, subscribe and (for agents) publish the birth message; raise if not done in time."""
        props = Properties(PacketTypes.CONNECT)
        if self.options.session_expiry_s:
            props.SessionExpiryInterval = self.options.session_expiry_s
        try:
            self._client.connect(
                self.address.host,
                self.address.port,
                keepalive=self.options.keepalive,
                clean_start=self.options.clean_start,
                properties=props,
            )
        except OSError as exc:
            raise BrokerUnavailable(self.address.url, str(exc)) from exc
        self._client.loop_start()
        # Wakes on CONNACK either way: a refusal (bad password, ACL) should not wait out the timeout.
        self._answered.wait(timeout)
        if not self._connected.is_set():
            self.close()
            raise BrokerUnavailable(self.address.url, self._connect_error or f"no CONNACK within {timeout} s")
        if self.options.subscriptions and not self._subscribed.wait(timeout):
            self.close()
            raise BrokerUnavailable(self.address.url, f"no SUBACK within {timeout} s")
        return self

    def close(self) -> None:
        self._closing = True
        try:
            self._client.disconnect()
        finally:
            self._client.loop_stop()

    def kill(self) -> None:
        """Drop the connection without a DISCONNECT, so the broker publishes our last will (tests)."""
        self._closing = True
        sock = self._client.socket()
        if sock is not None:
            sock.close()
        self._client.loop_stop()

    def __enter__(self) -> Bus:
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    # --- publish / subscribe / ack -----------------------------------------------------------------

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        retain: bool = False,
        qos: int = 1,
        response_topic: str | None = None,
        on_acked: Callable[[], None] | None = None,
        on_refused: Callable[[str], None] | None = None,
        timeout: float = 30.0,
    ) -> mqtt.MQTTMessageInfo:
        """Publish with QoS 1; ``on_acked`` runs (on paho's thread) when the broker acknowledges it, or
        ``on_refused`` with the reason when its PUBACK carries an error code (without ``on_refused`` a refusal
        is logged and counts as acknowledged)."""
        props = None
        if response_topic:
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = response_topic
        if qos and not self._inflight.acquire(timeout=timeout):
            raise PublishFailed(topic, f"more than {self.options.max_inflight} messages unacknowledged")
        # Never hold our lock across client.publish(): paho's thread may be inside on_publish waiting
        # for it while holding paho's own mutex, which publish() needs (a deadlock seen in tests).
        info = self._client.publish(topic, payload, qos=qos, retain=retain, properties=props)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            if qos:
                self._inflight.release()
            raise PublishFailed(topic, mqtt.error_string(info.rc))
        if qos:
            # A publish made while disconnected sits in paho's queue and goes out on reconnect.
            with self._lock:
                early = info.mid in self._early_acks
                if early:
                    refusal = self._early_acks.pop(info.mid)
                else:
                    self._acked[info.mid] = (on_acked or _noop, on_refused)
            if early:
                self._inflight.release()
                self._complete(topic, on_acked or _noop, on_refused, refusal)
        elif on_acked:
            on_acked()
        return info

    def _complete(
        self,
        topic: str | None,
        on_acked: Callable[[], None],
        on_refused: Callable[[str], None] | None,
        refusal: str | None,
    ) -> None:
        if refusal is None:
            on_acked()
        elif on_refused is not None:
            on_refused(refusal)
        else:
            self._log.error("broker refused a publish", topic=topic, reason=refusal)
            on_acked()

    def publish_wait(self, topic: str, payload: bytes, *, retain: bool = False, timeout: float = 10.0) -> None:
        """Publish and wait until the broker acknowledged it (CLI clients that exit right after)."""
        done = threading.Event()
        refused: list[str] = []

        def refuse(reason: str) -> None:
            refused.append(reason)
            done.set()

        self.publish(topic, payload, retain=retain, on_acked=done.set, on_refused=refuse, timeout=timeout)
        if not done.wait(timeout):
            raise PublishFailed(topic, f"not acknowledged within {timeout} s")
        if refused:
            raise PublishFailed(topic, f"refused by the broker: {refused[0]}")

    def subscribe(self, topics: Iterable[str], *, again: bool = False) -> None:
        """Add subscriptions now and on every reconnect. With ``again``, subscribe even to filters we hold, so
        the broker delivers their retained messages once more."""
        wanted = list(topics)
        new = [t for t in wanted if t not in self.options.subscriptions]
        self.options.subscriptions.extend(new)
        send = wanted if again else new
        if send and self.connected:
            self._client.subscribe([(t, 1) for t in send])

    def ack(self, message: Inbound) -> None:
        """Acknowledge a message received with ``manual_ack`` once its effects are committed."""
        if self.options.manual_ack and message.qos:
            self._client.ack(message.mid, message.qos)

    # --- paho callbacks: convert and enqueue, nothing else -------------------------------------------

    def _on_socket_open(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        # A websocket wrapper is no TCP socket; nothing to tune there.
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            self._connect_error = str(reason)
            self._log.warning("broker refused connection", reason=str(reason))
            self._answered.set()
            return
        self.session_present = bool(flags.session_present)
        subscribing = False
        if self.options.subscriptions:
            _, mid = client.subscribe([(t, 1) for t in self.options.subscriptions])
            with self._lock:
                self._pending_subs.add(mid)
            subscribing = True
        self._connected.set()
        self._answered.set()
        self._log.debug("connected", session_present=self.session_present)
        if not subscribing:
            self._ready(client)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any, props: Any) -> None:
        with self._lock:
            if mid not in self._pending_subs:
                return  # a later subscribe() call, not the (re)connect's
            self._pending_subs.discard(mid)
            done = not self._pending_subs
        if done:
            self._ready(client)
            self._subscribed.set()

    def _ready(self, client: mqtt.Client) -> None:
        """Subscribed after a (re)connect: announce ourselves, then tell the owner."""
        if self.options.birth:
            topic, payload = self.options.birth()
            info = client.publish(topic, payload, qos=1, retain=True)
            # Its PUBACK is handled on this same thread, after this callback returns.
            with self._lock:
                self._acked[info.mid] = (_noop_untracked, None)
        if self.options.on_ready:
            self.options.on_ready(self.session_present)

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        self._connected.clear()
        if not self._closing:
            self._log.warning("disconnected from broker; paho reconnects", reason=str(reason))

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        props = getattr(msg, "properties", None)
        self.inbox.put(
            Inbound(
                topic=msg.topic,
                payload=msg.payload,
                mid=msg.mid,
                qos=msg.qos,
                retain=bool(msg.retain),
                response_topic=getattr(props, "ResponseTopic", None),
                correlation_data=getattr(props, "CorrelationData", None),
            )
        )

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        refusal = str(reason) if getattr(reason, "is_failure", False) else None
        with self._lock:
            callbacks = self._acked.pop(mid, None)
            if callbacks is None:
                # The PUBACK beat publish() back to its caller; publish() completes it.
                self._early_acks[mid] = refusal
                return
        on_acked, on_refused = callbacks
        if on_acked is _noop_untracked:
            if refusal is not None:
                self._log.error("broker refused our birth message", reason=refusal)
            return
        self._inflight.release()
        self._complete(None, on_acked, on_refused, refusal)


def _noop() -> None:
    return None


def _noop_untracked() -> None:
    """Marks publishes made outside :meth:`Bus.publish` (the birth), which hold no in-flight slot."""
    return None
