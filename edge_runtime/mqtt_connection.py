"""paho-mqtt client setup shared by the daemon and the client: broker URL parsing,
protocol version, TLS, authentication, will message and MQTT 5 properties."""

from __future__ import annotations

import ipaddress
import socket
import ssl
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from .certificate_dates import validity

PROTOCOLS: dict[str, int] = {"5": mqtt.MQTTv5, "3.1.1": mqtt.MQTTv311}
SCHEMES: dict[str, tuple[bool, int]] = {"mqtt": (False, 1883), "mqtts": (True, 8883)}


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'mqtts' if self.tls else 'mqtt'}://{host}:{self.port}"


RECONNECT_DELAY_S = (1, 30)  # paho's reconnect backoff: from 1 s, doubling to 30 s


def parse_broker_url(url: str) -> BrokerAddress:
    """``mqtt://HOST[:PORT]`` (plain, default 1883) or ``mqtts://HOST[:PORT]`` (TLS, 8883).

    Raises ValueError with a message that says what is wrong.
    """
    if not isinstance(url, str) or "://" not in url:
        raise ValueError(f"broker must look like mqtt://HOST:PORT or mqtts://HOST:PORT, got {url!r}")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise ValueError(f"broker scheme must be mqtt or mqtts, got {parts.scheme!r} in {url!r}")
    if parts.username is not None or parts.password is not None:
        raise ValueError("broker URL must not hold credentials; use username and password_file")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"broker URL must be scheme://HOST:PORT only, got {url!r}")
    host = parts.hostname
    if not host:
        raise ValueError(f"broker URL has no host: {url!r}")
    if any(c.isspace() or not c.isprintable() or c in "\\%" for c in host) and not _is_scoped_ipv6(host):
        raise ValueError(f"broker URL has an invalid host {host!r}: {url!r}")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"broker URL has an invalid port: {url!r}") from None
    tls, default_port = SCHEMES[scheme]
    return BrokerAddress(host=host, port=port or default_port, tls=tls)


def _is_scoped_ipv6(host: str) -> bool:
    """An IPv6 address with a zone, as a link-local broker has (``fe80::1%eth0``)."""
    try:
        return "%" in host and ipaddress.IPv6Address(host).scope_id is not None
    except ValueError:
        return False


def why_unreachable(address: BrokerAddress, timeout: float = 2.0, tls: TlsFiles | None = None) -> str:
    """What stands between this machine and the broker, found out the way paho would
    connect (paho's connect-failure callback carries no reason): the name, the TCP
    connection, or what comes after it. For mqtts, a TLS handshake with `tls` (paho's
    settings) says why the broker's certificate does not verify, this machine's clock and
    the certificate's dates when the clock is outside them."""
    try:
        socket.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        return f"the name {address.host!r} does not resolve ({getattr(exc, 'strerror', None) or exc})"
    try:
        with socket.create_connection((address.host, address.port), timeout=timeout):
            pass
    except OSError as exc:
        return f"no TCP connection to port {address.port}: {exc.strerror or exc}"
    if not address.tls:
        return "TCP connects, but the broker closed the connection"
    why = "TCP connects, so the TLS handshake failed (check the CA file and the broker's certificate and name)"
    try:
        with socket.create_connection((address.host, address.port), timeout=timeout) as raw:
            with _tls_context(tls or TlsFiles()).wrap_socket(raw, server_hostname=address.host):
                # it verifies now: what failed has passed (a clock set since), or the broker closes after it
                return "TCP connects and a TLS handshake succeeds now, so the broker closed the connection"
    except ssl.SSLCertVerificationError as exc:
        if exc.verify_code in (_CERT_NOT_YET_VALID, _CERT_HAS_EXPIRED):
            return f"TCP connects, so the TLS handshake failed: {_clock_outside_validity(address, tls, exc, timeout)}"
        return f"{why}: {exc.verify_message or exc.reason}"
    except (ssl.SSLError, OSError) as exc:
        return f"{why}: {getattr(exc, 'reason', None) or exc.strerror or exc}"


# OpenSSL's X509_V_ERR_CERT_NOT_YET_VALID and X509_V_ERR_CERT_HAS_EXPIRED
_CERT_NOT_YET_VALID, _CERT_HAS_EXPIRED = 9, 10


def _tls_context(tls: TlsFiles, verify: bool = True) -> ssl.SSLContext:
    """The context paho's `tls_set` makes of `make_client`'s arguments (or one that verifies nothing)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if tls.cert is not None:
        context.load_cert_chain(tls.cert, tls.key)
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif tls.ca is not None:
        context.load_verify_locations(tls.ca)
    else:
        context.load_default_certs()
    return context


def _utc(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def _clock_outside_validity(address: BrokerAddress, tls: TlsFiles | None, exc: ssl.SSLCertVerificationError,
                            timeout: float) -> str:
    """A certificate of the broker's chain is not valid yet, or no longer, by this machine's clock:
    the clock, the broker certificate's dates, and what to do."""
    now = datetime.now(timezone.utc)
    early = exc.verify_code == _CERT_NOT_YET_VALID
    dates = ""
    try:  # the broker's own certificate, unverified, for its dates (the stdlib decodes none of a failed one)
        with socket.create_connection((address.host, address.port), timeout=timeout) as raw:
            # with the client certificate, for a broker that requires one (it may close before it sends its own)
            client = TlsFiles(cert=tls.cert, key=tls.key) if tls is not None else TlsFiles()
            with _tls_context(client, verify=False).wrap_socket(raw, server_hostname=address.host) as sock:
                der = sock.getpeercert(binary_form=True)
        not_before, not_after = validity(der) if der else (None, None)
    except (ssl.SSLError, OSError, ValueError):
        not_before = not_after = None
    if not_before is not None and not_after is not None:
        inside = not_before <= now <= not_after
        dates = (f"; the broker's certificate is valid from {_utc(not_before)} to {_utc(not_after)}"
                 + ("; another certificate of its chain, e.g. the CA's (openssl x509 -noout -dates -in CA_FILE), "
                    "is not" if inside else ""))
    if early:
        return (f"a certificate is not valid yet by this machine's clock ({exc.verify_message}): the clock says "
                f"{_utc(now)}{dates}. Is the clock wrong? A board without a battery-backed clock (a Jetson) "
                "starts with its clock in the past: set it (timedatectl set-time 'YYYY-MM-DD HH:MM:SS', or an NTP "
                "server), then connect again (the daemon retries on its own)")
    return (f"a certificate has expired by this machine's clock ({exc.verify_message}): the clock says "
            f"{_utc(now)}{dates}. If the clock is wrong, set it (timedatectl set-time 'YYYY-MM-DD HH:MM:SS', or an "
            "NTP server); if it is right, renew the broker's certificate")


def protocol_version(protocol: str) -> int:
    """paho's constant for "5" or "3.1.1"."""
    try:
        return PROTOCOLS[protocol]
    except KeyError:
        raise ValueError(f"protocol must be \"5\" or \"3.1.1\", got {protocol!r}") from None


@dataclass(frozen=True)
class TlsFiles:
    ca: str | None = None  # None: the system's trusted CAs
    cert: str | None = None  # client certificate (mutual TLS), with key
    key: str | None = None


def check_tls_files(tls: TlsFiles, names: tuple[str, str, str] = ("--tls-ca", "--tls-cert", "--tls-key")) -> None:
    """ValueError naming the setting (`names`: those of the CA, the certificate and the
    key) whose file cannot be read or holds no certificate or key, as paho would load them."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if tls.ca is not None:
        try:
            context.load_verify_locations(tls.ca)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"{names[0]} {tls.ca}: {_why_unusable(exc, 'a PEM CA certificate')}") from None
    if tls.cert is not None:
        for name, path in ((names[1], tls.cert), (names[2], tls.key or tls.cert)):
            try:
                Path(path).read_bytes()
            except OSError as exc:
                raise ValueError(f"{name} {path}: {_why_unusable(exc, '')}") from None
        try:
            context.load_cert_chain(tls.cert, tls.key)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"{names[1]} {tls.cert} with {names[2]} {tls.key}: "
                             f"{_why_unusable(exc, 'a PEM certificate and its private key')}") from None


def _why_unusable(exc: OSError, wanted: str) -> str:
    if isinstance(exc, ssl.SSLError) or not exc.strerror:
        return f"not {wanted} ({exc})" if wanted else str(exc)
    return exc.strerror.lower()


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


def read_password_file(path: str | Path) -> str:
    """The first line of a password file (the trailing newline is not part of it).
    ValueError for a file that is not UTF-8 text or whose first line is empty (the broker
    would refuse every connection as not authorized, with no word of why)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text: the password is its first line") from None
    password = text.splitlines()[0] if text else ""
    if not password:
        raise ValueError(f"{path} holds no password: its first line is empty")
    return password


def make_client(*, client_id: str, protocol: str, address: BrokerAddress,
                username: str | None = None, password: str | None = None,
                tls: TlsFiles | None = None, will: Will | None = None,
                manual_ack: bool = False, persistent: bool = False,
                reconnect_min_s: int = RECONNECT_DELAY_S[0], reconnect_max_s: int = RECONNECT_DELAY_S[1]) -> mqtt.Client:
    """A paho client (callback API v2) configured but not connected.

    `persistent` asks for a persistent session (3.1.1: clean_session False; MQTT 5:
    clean_start False is passed at connect with a Session Expiry Interval, see
    `connect_properties`).
    """
    version = protocol_version(protocol)
    kwargs: dict[str, object] = {}
    if version != mqtt.MQTTv5:
        kwargs["clean_session"] = not persistent
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=version, manual_ack=manual_ack, **kwargs)  # type: ignore[arg-type]
    if username is not None:
        client.username_pw_set(username, password)
    if address.tls:
        tls = tls or TlsFiles()
        client.tls_set(ca_certs=tls.ca, certfile=tls.cert, keyfile=tls.key,
                       cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
    if will is not None:
        client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
    client.reconnect_delay_set(min_delay=reconnect_min_s, max_delay=reconnect_max_s)
    client.on_socket_open = _no_nagle
    return client


def _no_nagle(client: mqtt.Client, userdata: object, sock) -> None:
    """Send each small MQTT packet (a streamed token, an ack) at once: with Nagle's
    algorithm and delayed ACKs, every request paid tens of milliseconds on loopback."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):  # not a TCP socket (e.g. a websocket wrapper)
        pass


def connect_properties(protocol: str, *, session_expiry_s: int | None = None,
                       receive_maximum: int | None = None) -> Properties | None:
    """MQTT 5 CONNECT properties (None for 3.1.1). `receive_maximum`: how many QoS 1 and 2
    messages the broker may send this client before it acknowledges them (1-65535; without
    it Mosquitto sends at most its max_inflight_messages, 20)."""
    if protocol_version(protocol) != mqtt.MQTTv5:
        return None
    props = Properties(PacketTypes.CONNECT)
    if session_expiry_s is not None:
        props.SessionExpiryInterval = int(session_expiry_s)
    if receive_maximum is not None:
        props.ReceiveMaximum = int(receive_maximum)
    return props


def publish_properties(protocol: str, *, response_topic: str | None = None,
                       correlation_data: bytes | None = None) -> Properties | None:
    """MQTT 5 PUBLISH properties carrying a response topic / correlation data."""
    if protocol_version(protocol) != mqtt.MQTTv5:
        return None
    if response_topic is None and correlation_data is None:
        return None
    props = Properties(PacketTypes.PUBLISH)
    if response_topic is not None:
        props.ResponseTopic = response_topic
    if correlation_data is not None:
        props.CorrelationData = correlation_data
    return props


def response_route(message: mqtt.MQTTMessage) -> tuple[str | None, bytes | None]:
    """(Response Topic, Correlation Data) of an MQTT 5 message, each None when absent."""
    props = getattr(message, "properties", None)
    if props is None:
        return None, None
    topic = getattr(props, "ResponseTopic", None)
    corr = getattr(props, "CorrelationData", None)
    return (topic if topic else None), (bytes(corr) if corr is not None else None)


def connect_async(client: mqtt.Client, address: BrokerAddress, *, protocol: str, keepalive: int,
                  persistent: bool, session_expiry_s: int | None = None,
                  receive_maximum: int | None = None) -> None:
    """Start connecting in the background (use with `loop_start`; paho reconnects
    with backoff on its own)."""
    if protocol_version(protocol) == mqtt.MQTTv5:
        client.connect_async(address.host, address.port, keepalive=keepalive, clean_start=not persistent,
                             properties=connect_properties(protocol, session_expiry_s=session_expiry_s,
                                                           receive_maximum=receive_maximum))
    else:
        client.connect_async(address.host, address.port, keepalive=keepalive)
