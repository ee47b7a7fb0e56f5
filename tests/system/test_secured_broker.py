"""The secured broker of deploy/: PKI from deploy/make-test-pki.sh, a real Mosquitto
running the sample config (deploy/mosquitto/edge-device.conf and acl) adapted to a
free loopback port, and paho clients over TLS checking who may connect, publish and
read what.

"Never arrives" is checked without sleeping: the denied publish is sent with QoS 1
and its PUBACK awaited, then an allowed sentinel goes to the same subscriber; when
the sentinel arrives, the broker has long finished with the denied message.
"""

from __future__ import annotations

import queue
import shutil
import socket
import ssl
import subprocess
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from mosquitto_broker import MosquittoBroker, free_port

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "deploy" / "make-test-pki.sh"
DEVICES = ("dev-a", "dev-b")
CLIENTS = ("client-a", "client-b")
TIMEOUT = 10.0
NOT_AUTHORIZED = 135


def _require_tools() -> None:
    missing = [t for t in ("openssl", "mosquitto_passwd", "mosquitto") if not shutil.which(t)
               and not Path(f"/usr/sbin/{t}").exists()]
    if missing:
        pytest.fail(f"missing tools {missing}: apt-get install -y openssl mosquitto", pytrace=False)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict:
    _require_tools()
    out = tmp_path_factory.mktemp("pki")
    port = free_port()
    args = ["bash", str(SCRIPT), str(out), "--port", str(port)]
    for client in CLIENTS:
        args += ["--client", client]
    first = subprocess.run([*args, *DEVICES], capture_output=True, text=True, timeout=60)
    assert first.returncode == 0, first.stderr
    passwords = {name: (out / "passwords" / f"{name}.password").read_text().strip()
                 for name in DEVICES + CLIENTS}
    return {"dir": out, "port": port, "passwords": passwords, "args": [*args, *DEVICES],
            "first_output": first.stdout}


@pytest.fixture(scope="module")
def secured(pki, tmp_path_factory):
    """Mosquitto on the generated config, its listener bound to loopback for the test."""
    conf = (pki["dir"] / "mosquitto.conf").read_text()
    listener = f"listener {pki['port']}\n"
    assert listener in conf
    conf = conf.replace(listener, f"listener {pki['port']} 127.0.0.1\n")
    # Started as root, mosquitto would drop to its own user, which cannot read the
    # pytest temp folders; the deployment itself runs as the mosquitto user.
    broker = MosquittoBroker(tmp_path_factory.mktemp("secured-broker"), port=pki["port"],
                             listener_config=conf, persistence=False)
    broker.start()
    yield broker
    broker.stop()


class Peer:
    """One paho MQTT 5 connection over TLS; received messages land in a queue."""

    def __init__(self, pki: dict, username: str | None, password: str | None = None, *,
                 host: str = "127.0.0.1", ca: Path | None | str = "generated",
                 client_id: str | None = None) -> None:
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id or f"t-{uuid.uuid4().hex[:8]}",
                                  protocol=mqtt.MQTTv5)
        if ca == "generated":
            ca = pki["dir"] / "ca.crt"
        if ca is not None:
            self.client.tls_set(ca_certs=str(ca))
        if username is not None:
            self.client.username_pw_set(username, password if password is not None else pki["passwords"][username])
        self.messages: queue.Queue = queue.Queue()
        self.connack: queue.Queue = queue.Queue()
        self.subacks: queue.Queue = queue.Queue()
        self.pubacks: dict[int, ReasonCode] = {}
        self.disconnected: queue.Queue = queue.Queue()
        self.client.on_connect = lambda c, u, flags, rc, props: self.connack.put(rc)
        self.client.on_message = lambda c, u, msg: self.messages.put((msg.topic, msg.payload.decode()))
        self.client.on_subscribe = lambda c, u, mid, rcs, props: self.subacks.put(rcs)
        self.client.on_publish = lambda c, u, mid, rc, props: self.pubacks.__setitem__(mid, rc)
        self.client.on_disconnect = lambda c, u, flags, rc, props: self.disconnected.put(rc)
        self.client.connect(host, pki["port"], keepalive=30)
        self.client.loop_start()

    def connected(self) -> ReasonCode:
        return self.connack.get(timeout=TIMEOUT)

    def subscribe(self, topic: str) -> None:
        self.client.subscribe(topic, qos=1)
        self.subacks.get(timeout=TIMEOUT)

    def publish(self, topic: str, payload: str) -> ReasonCode:
        info = self.client.publish(topic, payload, qos=1)
        info.wait_for_publish(TIMEOUT)
        return self.pubacks.get(info.mid)

    def received(self) -> list[tuple[str, str]]:
        out = []
        while True:
            try:
                out.append(self.messages.get_nowait())
            except queue.Empty:
                return out

    def wait_for(self, payload: str) -> list[tuple[str, str]]:
        """Messages up to and including the one with `payload` (fails after TIMEOUT)."""
        seen = []
        while True:
            try:
                item = self.messages.get(timeout=TIMEOUT)
            except queue.Empty:
                pytest.fail(f"{payload!r} did not arrive; got {seen}")
            seen.append(item)
            if item[1] == payload:
                return seen

    def close(self) -> None:
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()


@pytest.fixture
def peers(pki, secured):
    opened: list[Peer] = []

    def open_peer(username, password=None, **kw) -> Peer:
        peer = Peer(pki, username, password, **kw)
        opened.append(peer)
        return peer

    def connect(username) -> Peer:
        peer = open_peer(username)
        rc = peer.connected()
        assert not rc.is_failure, f"{username} could not connect: {rc}"
        return peer

    open_peer.connect = connect
    yield open_peer
    for peer in opened:
        peer.close()


# -- the script ---------------------------------------------------------------------------
def test_pki_script_is_idempotent_and_says_what_it_made(pki):
    out = pki["dir"]
    for name in ("ca.crt", "ca.key", "server.crt", "server.key", "passwd", "acl", "mosquitto.conf",
                 "devices/dev-a.toml", "passwords/client-a.password"):
        assert (out / name).is_file(), name
    assert "made:" in pki["first_output"]
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    again = subprocess.run(pki["args"], capture_output=True, text=True, timeout=60)
    assert again.returncode == 0, again.stderr
    assert "made:" not in again.stdout, again.stdout
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    # The server certificate names localhost and 127.0.0.1, signed by the CA.
    san = subprocess.run(["openssl", "x509", "-in", str(out / "server.crt"), "-noout", "-ext", "subjectAltName"],
                         capture_output=True, text=True, check=True).stdout
    assert "DNS:localhost" in san and "127.0.0.1" in san
    subprocess.run(["openssl", "verify", "-CAfile", str(out / "ca.crt"), str(out / "server.crt")],
                   check=True, capture_output=True)
    # The generated ACL keeps the sample's pattern lines verbatim.
    sample = (REPO / "deploy" / "mosquitto" / "acl").read_text().splitlines()
    generated = (out / "acl").read_text().splitlines()
    assert [l for l in sample if l.startswith("pattern ")] == [l for l in generated if l.startswith("pattern ")]


def test_pki_certificates_verify_on_a_board_whose_clock_is_years_behind(pki):
    """A Jetson without a battery-backed clock boots with its clock in the past (its image's build
    date): the broker's certificate and its CA must verify at such a time, not only from the moment
    the script ran. `openssl verify -attime` checks them as a machine whose clock says 2021-06-01
    would, and as one on the day before the certificates end."""
    out = pki["dir"]
    past = int(datetime(2021, 6, 1, tzinfo=timezone.utc).timestamp())
    verify = subprocess.run(["openssl", "verify", "-attime", str(past), "-CAfile", str(out / "ca.crt"),
                             str(out / "server.crt")], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    end = subprocess.run(["openssl", "x509", "-in", str(out / "server.crt"), "-noout", "-enddate"],
                         capture_output=True, text=True, check=True).stdout.strip().split("=", 1)[1]
    last_day = int(ssl.cert_time_to_seconds(end)) - 86400
    verify = subprocess.run(["openssl", "verify", "-attime", str(last_day), "-CAfile", str(out / "ca.crt"),
                             str(out / "server.crt")], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    # and no longer than the script's -days (825) from now: backdating the start lengthens nothing
    assert last_day < time.time() + 826 * 86400


def test_device_config_fragment_matches_the_daemon_config(pki):
    from edge_runtime.config import load_config

    fragment = (pki["dir"] / "devices" / "dev-a.toml").read_text()
    config_file = pki["dir"] / "config-check.toml"
    config_file.write_text('[model]\nbundle = "/nonexistent"\n' + fragment)
    try:
        config = load_config(config_file, check_files=False)
    finally:
        config_file.unlink()
    assert config.mqtt.device_id == "dev-a" and config.mqtt.username == "dev-a"
    assert config.mqtt.read_password() == pki["passwords"]["dev-a"]
    assert config.mqtt.address.tls


# -- authentication and TLS -------------------------------------------------------------------
def test_client_without_credentials_cannot_connect(peers):
    rc = peers(None).connected()
    assert rc.is_failure, rc


def test_wrong_password_is_refused(peers):
    rc = peers("client-a", "not-the-password").connected()
    assert rc.is_failure, rc
    rc = peers("nobody", "whatever").connected()
    assert rc.is_failure, rc


def test_tls_works_with_the_generated_ca_and_hostname(peers):
    peer = peers("client-a", host="localhost")
    assert not peer.connected().is_failure


def test_tls_rejects_a_server_the_ca_did_not_sign(pki, secured, tmp_path):
    other = tmp_path / "other-ca.crt"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(tmp_path / "other.key"), "-out", str(other), "-days", "1",
                    "-subj", "/CN=other CA"], check=True, capture_output=True)
    with pytest.raises(ssl.SSLCertVerificationError):
        Peer(pki, "client-a", ca=other)


def test_no_plain_mqtt_on_the_tls_port(pki, secured):
    # A plain MQTT 5 CONNECT (client id "x", no credentials) gets no CONNACK: the
    # TLS listener drops the connection.
    connect = bytes([0x10, 14, 0, 4]) + b"MQTT" + bytes([5, 2, 0, 30, 0, 0, 1]) + b"x"
    with socket.create_connection(("127.0.0.1", pki["port"]), timeout=TIMEOUT) as sock:
        sock.sendall(connect)
        try:
            answer = sock.recv(16)
        except ConnectionResetError:
            answer = b""
    assert answer == b"" or answer[0] != 0x20, answer



def test_edge_client_over_tls_with_the_generated_ca_and_password(pki, secured):
    from edge_runtime import EdgeClient

    password = pki["passwords"]["client-a"]
    with EdgeClient(f"mqtts://localhost:{pki['port']}", "dev-a", username="client-a", password=password,
                    tls_ca=pki["dir"] / "ca.crt") as client:
        assert client.status(timeout=0.5) is None  # connected and subscribed; no daemon here


def test_edge_client_on_the_tls_port_without_mqtts_says_so_at_once(pki, secured):
    from edge_runtime import EdgeClient

    started = time.monotonic()
    with pytest.raises(ConnectionError, match=r"closed the connection before answering its CONNECT \(a TLS port\? "
                                              r"TLS needs an mqtts:// broker URL\)"):
        EdgeClient(f"mqtt://127.0.0.1:{pki['port']}", "dev-a", username="client-a",
                   password=pki["passwords"]["client-a"], connect_timeout=30).connect()
    assert time.monotonic() - started < 10  # not after the 30 s


# -- authorization ------------------------------------------------------------------------------
def test_client_requests_reach_the_device_and_other_devices_cannot_send_them(peers):
    dev_a, dev_b, client = peers.connect("dev-a"), peers.connect("dev-b"), peers.connect("client-a")
    dev_a.subscribe("edge/dev-a/v1/generate")
    # dev-b may not read dev-a's requests either: subscribing is accepted, nothing arrives.
    dev_b.subscribe("edge/dev-a/v1/generate")
    dev_b.subscribe("edge/dev-b/v1/generate")

    assert dev_b.publish("edge/dev-a/v1/generate", "from-dev-b").value == NOT_AUTHORIZED
    assert client.publish("edge/dev-a/v1/generate", "from-client").value == 0
    assert [p for _, p in dev_a.wait_for("from-client")] == ["from-client"]

    assert client.publish("edge/dev-b/v1/generate", "sentinel-b").value == 0
    assert [p for _, p in dev_b.wait_for("sentinel-b")] == ["sentinel-b"]


def test_a_device_cannot_read_another_devices_cancels_or_write_its_status(peers):
    dev_a, client = peers.connect("dev-a"), peers.connect("client-a")
    dev_a.subscribe("edge/dev-b/v1/cancel")
    dev_a.subscribe("edge/dev-a/v1/cancel")
    client.subscribe("edge/+/v1/status")
    assert client.publish("edge/dev-b/v1/cancel", '{"id": "x"}').value == 0
    assert client.publish("edge/dev-a/v1/cancel", "sentinel").value == 0
    assert dev_a.wait_for("sentinel") == [("edge/dev-a/v1/cancel", "sentinel")]

    assert dev_a.publish("edge/dev-b/v1/status", "forged").value == NOT_AUTHORIZED
    assert client.publish("edge/dev-a/v1/status", "forged-by-client").value == NOT_AUTHORIZED
    assert dev_a.publish("edge/dev-a/v1/status", "online").value == 0
    assert client.wait_for("online") == [("edge/dev-a/v1/status", "online")]


def test_a_client_reads_only_its_own_replies(peers):
    dev_a, client_a, client_b = peers.connect("dev-a"), peers.connect("client-a"), peers.connect("client-b")
    client_a.subscribe("edge/dev-a/v1/reply/client-a/+")
    client_b.subscribe("edge/dev-a/v1/reply/client-a/+")  # someone else's replies
    client_b.subscribe("edge/+/v1/reply/#")  # everyone's replies
    client_b.subscribe("edge/dev-a/v1/reply/client-b/+")

    assert dev_a.publish("edge/dev-a/v1/reply/client-a/r1", "for-a").value == 0
    assert dev_a.publish("edge/dev-a/v1/reply/client-b/r2", "for-b").value == 0
    assert client_a.wait_for("for-a") == [("edge/dev-a/v1/reply/client-a/r1", "for-a")]
    # client-b gets its own reply (once per matching subscription) and never client-a's.
    assert {p for _, p in client_b.wait_for("for-b")} == {"for-b"}
    assert "for-a" not in {p for _, p in client_b.received()}


def test_replies_cannot_be_forged(peers):
    dev_a, dev_b, client_a, client_b = (peers.connect(n) for n in ("dev-a", "dev-b", "client-a", "client-b"))
    client_a.subscribe("edge/+/v1/reply/client-a/#")
    # Another device cannot reply in dev-a's name, nor a client in any device's.
    assert dev_b.publish("edge/dev-a/v1/reply/client-a/r1", "forged-by-dev-b").value == NOT_AUTHORIZED
    assert client_b.publish("edge/dev-a/v1/reply/client-a/r1", "forged-by-client").value == NOT_AUTHORIZED
    # A device only publishes under its own reply prefix, whatever response topic a request names.
    assert dev_a.publish("edge/dev-b/v1/reply/client-a/r1", "misrouted").value == NOT_AUTHORIZED
    assert dev_a.publish("elsewhere/topic", "misrouted").value == NOT_AUTHORIZED
    assert dev_a.publish("edge/dev-a/v1/reply/client-a/r1", "genuine").value == 0
    assert client_a.wait_for("genuine") == [("edge/dev-a/v1/reply/client-a/r1", "genuine")]


def test_fleet_requests_reach_one_device_of_the_group(peers):
    dev_a, dev_b, client_a, client_b = (peers.connect(n) for n in ("dev-a", "dev-b", "client-a", "client-b"))
    for dev in (dev_a, dev_b):
        dev.subscribe("$share/line-a/edge/fleet/v1/generate")
    client_b.subscribe("edge/fleet/v1/generate")  # a client may not read fleet requests
    client_a.subscribe("edge/fleet/v1/reply/client-a/+")
    sent = [f"fleet-{i}" for i in range(4)]
    for payload in sent:
        assert client_a.publish("edge/fleet/v1/generate", payload).value == 0
    assert sorted(_drain_fleet((dev_a, dev_b), len(sent))) == sent  # each to exactly one device
    # Fleet replies: devices write under edge/fleet/v1/reply/, clients read their own.
    assert dev_b.publish("edge/fleet/v1/reply/client-a/f1", "fleet-reply").value == 0
    assert client_a.wait_for("fleet-reply") == [("edge/fleet/v1/reply/client-a/f1", "fleet-reply")]
    # client-b's own fleet request reaches a device, but client-b reads no fleet request.
    assert client_b.publish("edge/fleet/v1/generate", "from-b").value == 0
    assert _drain_fleet((dev_a, dev_b), 1) == ["from-b"]
    assert client_b.received() == []


def _drain_fleet(devices, count: int) -> list[str]:
    got: list[str] = []
    deadline = time.monotonic() + TIMEOUT
    while len(got) < count:
        assert time.monotonic() < deadline, f"fleet requests lost: got {got}"
        for dev in devices:
            try:
                got.append(dev.messages.get(timeout=0.05)[1])
            except queue.Empty:
                pass
    return got


def test_client_id_cannot_take_over_another_identity(peers):
    dev_a = peers.connect("dev-a")
    # client-a connects with dev-a's client id; the broker uses the username instead,
    # so dev-a's session is neither taken over nor disconnected.
    impostor = peers("client-a", client_id="dev-a")
    assert not impostor.connected().is_failure
    dev_a.subscribe("edge/dev-a/v1/generate")
    assert impostor.publish("edge/dev-a/v1/generate", "still-here").value == 0
    assert dev_a.wait_for("still-here")
    assert dev_a.disconnected.empty()
