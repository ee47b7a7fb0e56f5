"""A machine's clock outside the broker certificate's dates (a Jetson without a
battery-backed clock boots years in the past): the TLS handshake fails, and what the
user reads must say so, with the clock and the dates, not send them to check the CA
file. A certificate dated in the future stands in for a clock in the past; one that
expired, for a clock in the future. Real certificates (openssl), a real Mosquitto TLS
listener, the real client and the daemon's probe."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from edge_runtime.client import EdgeClient
from edge_runtime.mqtt_connection import TlsFiles, parse_broker_url, why_unreachable
from mosquitto_broker import MosquittoBroker, free_port

CA_CONF = """[ca]
default_ca = test_ca
[test_ca]
database = {d}/index.txt
new_certs_dir = {d}
serial = {d}/serial
default_md = sha256
policy = anything
copy_extensions = copy
[anything]
commonName = supplied
"""


def _openssl(*args: str, cwd: Path) -> None:
    done = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def _pki(d: Path, start: str, end: str) -> None:
    """ca.crt (valid now) and server.crt for localhost valid from `start` to `end` (YYYYMMDDHHMMSSZ)."""
    if not shutil.which("openssl"):
        pytest.fail("openssl is not installed (apt-get install openssl)", pytrace=False)
    d.mkdir(parents=True, exist_ok=True)
    (d / "index.txt").write_text("")
    (d / "serial").write_text("01\n")
    (d / "ca.cnf").write_text(CA_CONF.format(d=d))
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout",
             "ca.key", "-out", "ca.crt", "-days", "3650", "-subj", "/CN=clock test CA", cwd=d)
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", "server.key",
             "-out", "server.csr", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
             cwd=d)
    _openssl("ca", "-batch", "-config", "ca.cnf", "-cert", "ca.crt", "-keyfile", "ca.key", "-in", "server.csr",
             "-out", "server.crt", "-notext", "-startdate", start, "-enddate", end, cwd=d)


def _tls_broker(d: Path) -> MosquittoBroker:
    port = free_port()
    return MosquittoBroker(d / "broker", port=port, persistence=False, listener_config=(
        f"listener {port} 127.0.0.1\nallow_anonymous true\ncertfile {d}/server.crt\nkeyfile {d}/server.key\n"
        "tls_version tlsv1.2\n")).start()


@pytest.fixture(scope="module")
def future_broker(tmp_path_factory):
    """A TLS broker whose certificate is valid from 2099: this machine's clock is 'in the past'."""
    d = tmp_path_factory.mktemp("future-pki")
    _pki(d, "20990101000000Z", "21000101000000Z")
    broker = _tls_broker(d)
    yield broker, d
    broker.stop()


def test_a_clock_before_the_certificate_says_so_with_the_dates_and_what_to_do(future_broker):
    broker, d = future_broker
    url = f"mqtts://localhost:{broker.port}"
    with pytest.raises(ConnectionError) as caught:
        EdgeClient(url, "dev1", tls_ca=d / "ca.crt", connect_timeout=10).connect()
    message = str(caught.value)
    assert "not valid yet by this machine's clock" in message
    assert "valid from 2099-01-01 00:00:00 UTC to 2100-01-01 00:00:00 UTC" in message
    assert "timedatectl set-time" in message
    assert "check the CA file" not in message  # the CA file is right: the clock is not
    # the daemon's probe (the journal line of `cannot reach the broker`) says the same
    why = why_unreachable(parse_broker_url(url), tls=TlsFiles(ca=str(d / "ca.crt")))
    assert "not valid yet by this machine's clock" in why and "2099-01-01 00:00:00 UTC" in why


def test_a_clock_past_the_certificate_says_it_expired_by_this_clock(tmp_path):
    _pki(tmp_path, "20010101000000Z", "20020101000000Z")
    broker = _tls_broker(tmp_path)
    try:
        with pytest.raises(ConnectionError, match=r"has expired by this machine's clock .*the broker's certificate "
                                                  r"is valid from 2001-01-01 00:00:00 UTC to 2002-01-01 00:00:00 UTC"):
            EdgeClient(f"mqtts://localhost:{broker.port}", "dev1", tls_ca=tmp_path / "ca.crt",
                       connect_timeout=10).connect()
    finally:
        broker.stop()


def test_a_certificate_from_another_ca_still_says_to_check_the_ca_file(future_broker, tmp_path):
    broker, _ = future_broker
    _pki(tmp_path, "20200101000000Z", "20990101000000Z")  # a CA of its own, which did not sign the broker's
    with pytest.raises(ConnectionError, match=r"TLS handshake failed \(check the CA file.*\): unable to get local "
                                              r"issuer certificate"):
        EdgeClient(f"mqtts://localhost:{broker.port}", "dev1", tls_ca=tmp_path / "ca.crt", connect_timeout=10).connect()


def test_once_the_clock_is_inside_the_dates_the_probe_says_the_handshake_succeeds(tmp_path):
    """The probe runs after a failure; a handshake that verifies by then (a clock set since) must
    not be reported as failing."""
    _pki(tmp_path, "20200101000000Z", "20990101000000Z")
    broker = _tls_broker(tmp_path)
    try:
        why = why_unreachable(parse_broker_url(f"mqtts://localhost:{broker.port}"), tls=TlsFiles(ca=str(tmp_path / "ca.crt")))
        assert why == "TCP connects and a TLS handshake succeeds now, so the broker closed the connection"
        with EdgeClient(f"mqtts://localhost:{broker.port}", "dev1", tls_ca=tmp_path / "ca.crt", connect_timeout=10):
            pass  # and the client connects
    finally:
        broker.stop()
