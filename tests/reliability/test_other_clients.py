"""Users who drive the daemon without EdgeClient: shell scripts with the Mosquitto 2
command-line clients (mosquitto_pub, mosquitto_sub, mosquitto_rr), and MQTT libraries whose
habits differ from ours (other JSON encoders, QoS 0 and 2, persistent sessions, reply
topics with spaces and Unicode, wildcard subscribers). The real `edge-runtime serve` on the
tiny bundle behind a real Mosquitto; the docs' shell blocks are run as written.

The shell tools reach the test's broker, on a free port, through their options files
($XDG_CONFIG_HOME/mosquitto_pub, ..._sub, ..._rr hold `-p PORT`), so the blocks run verbatim.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from mosquitto_broker import MosquittoBroker
from reliability_kit import REPO, ServeProcess, StatusWatch, wait_online, write_serve_config

DEVICE = "line-3"  # the docs' device id
GENERATE = f"edge/{DEVICE}/v1/generate"
REPLY = f"edge/{DEVICE}/v1/reply"


@dataclass
class Rig:
    broker: MosquittoBroker
    proc: ServeProcess
    env: dict[str, str]

    def run(self, args: list, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(args, env=self.env, capture_output=True, timeout=timeout)

    def rr(self, topic: str, payload: bytes | str, *, v311: bool = False, wait_s: int = 20,
           extra: list[str] | None = None) -> dict | None:
        """mosquitto_rr: publish `payload` with `topic` as the reply topic (MQTT 5 Response
        Topic, or only a subscription on 3.1.1), and the first reply, or None on a timeout."""
        data = payload.encode() if isinstance(payload, str) else payload
        out = self.run(["mosquitto_rr", *(["-V", "mqttv311"] if v311 else []), "-h", "127.0.0.1", "-q", "1",
                        "-W", str(wait_s), "-t", GENERATE, "-e", topic, "-m", data, *(extra or [])], wait_s + 10)
        if out.returncode == 27:  # Timed out
            return None
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)


@pytest.fixture(scope="module")
def rig(tiny_bundle, tmp_path_factory):
    work = tmp_path_factory.mktemp("other-clients")
    broker = MosquittoBroker(work / "broker").start()
    xdg = work / "xdg"
    xdg.mkdir()
    for tool in ("mosquitto_pub", "mosquitto_sub", "mosquitto_rr"):
        (xdg / tool).write_text(f"-p {broker.port}\n")
    config = write_serve_config(work / "serve.toml", broker_url=broker.url, device_id=DEVICE, bundle=tiny_bundle,
                                state_dir=work / "state", max_tokens=128)  # the docs' request asks 128
    watch = StatusWatch(broker.host, broker.port, DEVICE)
    t = time.monotonic()
    proc = ServeProcess(config, work / "daemon.log")
    try:
        wait_online(watch, proc, 60, after=t)
        yield Rig(broker, proc, dict(os.environ, XDG_CONFIG_HOME=str(xdg)))
    finally:
        proc.close()
        watch.close()
        broker.stop()


# -- the docs' shell blocks, run as written ------------------------------------------------------


def sh_blocks(doc: str) -> list[str]:
    text = (REPO / doc).read_text(encoding="utf-8")
    return [b for b in re.findall(r"```sh\n(.*?)```", text, re.S) if "mosquitto_" in b]


DOC_BLOCKS = [(doc, i, block) for doc in ("README.md", "docs/protocol.md")
              for i, block in enumerate(sh_blocks(doc))]


def test_the_docs_show_the_shell_examples_users_need():
    """mosquitto_rr on MQTT 5 and 3.1.1, a streamed answer in a script, the dashboard's view."""
    blocks = "\n".join(b for _, _, b in DOC_BLOCKS)
    assert "mosquitto_rr -h" in blocks and "mosquitto_rr -V mqttv311" in blocks
    assert "kill $sub" in blocks and "'edge/+/v1/status' -v" in blocks


@pytest.mark.parametrize("doc,index,block", DOC_BLOCKS, ids=[f"{d}-{i}" for d, i, _ in DOC_BLOCKS])
def test_a_documented_shell_block_works_as_written(rig, doc, index, block):
    """Each block prints what the docs say: the final reply of its request (after its chunks,
    in order, adding up to the text), or for the dashboard the device's online status. A block
    that ends by itself exits 0 (mosquitto_rr, the script); one that runs until stopped
    (a background subscriber, the dashboard) is stopped once it has printed that."""
    ids = re.findall(r"-m '\{\"id\": \"(\w+)\"", block)
    ends_by_itself = "mosquitto_rr" in block or "kill $sub" in block
    proc = subprocess.Popen(["bash", "-c", block], env=rig.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True, text=True)
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line.rstrip("\n"))
            if ('"done":true' in line or '"state":' in line) and not ends_by_itself:
                break
        if ends_by_itself:
            assert proc.wait(30) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(10)
    assert lines, f"{doc} block {index} printed nothing: {proc.stderr.read()}"
    payloads = [line.split(" ", 1)[1] if line.startswith("edge/") else line for line in lines]
    objs = [json.loads(p) for p in payloads]
    if not ids:  # the dashboard
        assert lines[0].startswith(f"edge/{DEVICE}/v1/status {{"), lines[0]
        assert objs[0]["state"] == "online" and objs[0]["device_id"] == DEVICE
        return
    (request_id,) = ids
    final = objs[-1]
    assert final["id"] == request_id and final["done"] is True and "error" not in final, final
    chunks = [o for o in objs[:-1] if o.get("id") == request_id]
    assert [c["seq"] for c in chunks] == list(range(len(chunks)))
    if chunks:
        assert "".join(c["delta"] for c in chunks) == final["text"]
    # the docs' rule for line-based tools: the final reply is the line that holds "done":true
    assert '"done":true' in payloads[-1] and all('"done":false' in p for p in payloads[:-1] if '"seq":' in p)


# -- other clients' habits -----------------------------------------------------------------------


def reference(rig: Rig, name: str, **fields) -> dict:
    """The final reply to a plain request (greedy, not streamed), to compare the others with."""
    obj = {"id": f"ref-{name}", "mode": "complete", "prompt": "def add(a, b):", "max_tokens": 6, "temperature": 0,
           "stream": False, **fields}
    final = rig.rr(f"{REPLY}/ref/{name}", json.dumps(obj))
    assert final is not None and "error" not in final, final
    return final


def test_correlation_data_comes_back_to_mosquitto_rr(rig):
    out = rig.run(["mosquitto_rr", "-h", "127.0.0.1", "-q", "1", "-W", "20", "-t", GENERATE, "-e", f"{REPLY}/me/c1",
                   "-D", "publish", "correlation-data", "corr-1", "-F", "%D %p",
                   "-m", '{"id": "c1", "mode": "complete", "prompt": "x", "max_tokens": 2, "stream": false}'])
    assert out.returncode == 0, out.stderr
    corr, payload = out.stdout.decode().split(" ", 1)
    assert corr == "corr-1" and json.loads(payload)["id"] == "c1"


@pytest.mark.parametrize("v311", [False, True], ids=["mqtt5", "mqtt311"])
def test_null_for_an_optional_field_is_the_field_left_out(rig, v311):
    """What C#'s and Java's encoders send by default, and Go's without omitempty: every field of
    the request class, the other modes' and the unset ones as null."""
    topic = f"{REPLY}/nulls/{'v311' if v311 else 'v5'}"
    want = reference(rig, "nulls")
    obj = {"id": f"nulls-{v311}", "mode": "complete", "prompt": "def add(a, b):", "prefix": None, "suffix": None,
           "suffix_first": None, "messages": None, "max_tokens": 6, "temperature": 0, "top_p": None, "top_k": None,
           "seed": None, "stop": None, "stream": False, "deadline_ms": None, "cache_prompt": None,
           "repeat_penalty": None, "presence_penalty": None, "frequency_penalty": None, "repeat_last_n": None,
           "reply_to": topic if v311 else None}
    got = rig.rr(topic, json.dumps(obj), v311=v311)
    assert got is not None and "error" not in got, got
    assert got["text"] == want["text"] and got["usage"]["completion_tokens"] == want["usage"]["completion_tokens"]


def test_null_for_id_mode_or_an_unknown_field_is_still_a_bad_request(rig):
    for name, obj in {"id": {"id": None, "mode": "complete", "prompt": "x"},
                      "mode": {"id": "n-mode", "mode": None, "prompt": "x"},
                      "typo": {"id": "n-typo", "mode": "complete", "prompt": "x", "max_token": None}}.items():
        got = rig.rr(f"{REPLY}/nullbad/{name}", json.dumps(obj))
        assert got is not None and got["error"]["code"] == "bad_request", (name, got)


def test_a_leading_utf8_bom_is_skipped(rig):
    """A JSON file saved by a Windows editor and sent with mosquitto_pub -f, on MQTT 3.1.1: the
    reply topic is in the JSON, so a payload refused as not JSON could not even be answered."""
    want = reference(rig, "bom")
    topic = f"{REPLY}/bom/r"
    body = json.dumps({"id": "bom", "mode": "complete", "prompt": "def add(a, b):", "max_tokens": 6,
                       "temperature": 0, "stream": False, "reply_to": topic})
    got = rig.rr(topic, b"\xef\xbb\xbf" + body.encode(), v311=True, wait_s=10)
    assert got is not None, "no reply to a request with a byte order mark"
    assert "error" not in got and got["text"] == want["text"], got


def test_crlf_whitespace_exponents_and_a_key_given_twice(rig):
    """Other encoders' spellings: CRLF line ends and indentation, 0e0 for a number, a key given
    twice (the last counts, as JSON.parse reads it)."""
    want = reference(rig, "spell")
    body = ('{\r\n  "id": "spell",\r\n  "mode": "complete",\r\n  "prompt": "def add(a, b):",\r\n'
            '  "max_tokens": 2,\r\n  "max_tokens": 6,\r\n  "temperature": 0e0,\r\n  "stream": false\r\n}\r\n')
    got = rig.rr(f"{REPLY}/spell/r", body)
    assert got is not None and "error" not in got, got
    assert got["text"] == want["text"] and got["usage"]["completion_tokens"] == 6


@pytest.mark.parametrize("value,needle", [("6.0", "max_tokens must be an integer"),
                                          ("6.4e1", "max_tokens must be an integer"),
                                          ("123456789012345678901234567890", "max_tokens must be between 1 and 128")])
def test_integer_fields_refuse_fractions_exponents_and_huge_values_with_a_clear_message(rig, value, needle):
    got = rig.rr(f"{REPLY}/num/r", '{"id": "num", "mode": "complete", "prompt": "x", "max_tokens": %s}' % value)
    assert got is not None and got["id"] == "num" and got["error"]["code"] == "bad_request", got
    assert needle in got["error"]["message"], got


@pytest.mark.parametrize("qos", [0, 2])
def test_qos_0_and_qos_2_requests_are_answered(rig, qos):
    out = rig.run(["mosquitto_rr", "-h", "127.0.0.1", "-q", str(qos), "-W", "20", "-t", GENERATE,
                   "-e", f"{REPLY}/qos/{qos}",
                   "-m", json.dumps({"id": f"qos{qos}", "mode": "complete", "prompt": "x", "max_tokens": 2,
                                     "stream": False})])
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["id"] == f"qos{qos}" and got["done"] and "error" not in got, got


def test_reply_topics_with_spaces_and_unicode_reach_a_wildcard_subscriber(rig):
    watcher = subprocess.Popen(["mosquitto_sub", "-h", "127.0.0.1", "-q", "1", "-v", "-t", f"{REPLY}/#",
                                "-t", f"edge/{DEVICE}/v1/status", "-F", "%t\t%p"], env=rig.env,
                               stdout=subprocess.PIPE, text=True)
    try:
        assert watcher.stdout.readline().startswith(f"edge/{DEVICE}/v1/status\t")  # subscribed
        topics = [f"{REPLY}/Jürgen Müller/r 1", f"{REPLY}/工位 7/r2"]
        for i, topic in enumerate(topics):
            got = rig.rr(topic, json.dumps({"id": f"uni{i}", "mode": "complete", "prompt": "x", "max_tokens": 2,
                                            "stream": False}))
            assert got is not None and got["id"] == f"uni{i}" and "error" not in got, got
        seen = {}
        while len(seen) < len(topics):
            topic, payload = watcher.stdout.readline().rstrip("\n").split("\t", 1)
            if topic.startswith(REPLY):
                seen[topic] = json.loads(payload)["id"]
        assert seen == {topics[0]: "uni0", topics[1]: "uni1"}
    finally:
        watcher.terminate()
        watcher.wait(10)


def test_a_persistent_subscriber_gets_the_reply_published_while_it_was_away(rig):
    """mosquitto_sub -c (clean session off) with a QoS 1 subscription, disconnected while the
    daemon answers: the broker keeps the reply for the session."""
    topic = f"{REPLY}/away/r1"
    base = ["mosquitto_sub", "-h", "127.0.0.1", "-c", "-i", "qa-away", "-q", "1", "-t", topic]
    assert rig.run([*base, "-E"]).returncode == 0  # subscribe, then leave
    pub = rig.run(["mosquitto_pub", "-V", "mqttv5", "-h", "127.0.0.1", "-q", "1", "-t", GENERATE,
                   "-D", "publish", "response-topic", topic,
                   "-m", '{"id": "away", "mode": "complete", "prompt": "x", "max_tokens": 2, "stream": false}'])
    assert pub.returncode == 0, pub.stderr
    deadline = time.monotonic() + 20
    while "request 'away' done" not in rig.proc.log:
        assert time.monotonic() < deadline, rig.proc.log[-2000:]
        time.sleep(0.1)
    out = rig.run([*base, "-C", "1", "-W", "10"])
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["id"] == "away" and got["done"] and "error" not in got, got


# -- the JSON the docs show, against what the daemon takes and sends -------------------------------


def doc_json_objects(doc: str = "docs/protocol.md") -> list[dict]:
    text = (REPO / doc).read_text(encoding="utf-8")
    decoder, objs = json.JSONDecoder(), []
    for block in re.findall(r"```json\n(.*?)```", text, re.S):
        at = 0
        while block[at:].strip():
            at += len(block[at:]) - len(block[at:].lstrip())
            obj, at = decoder.raw_decode(block, at)
            objs.append(obj)
    return objs


def keys(obj: dict, *, skip: frozenset = frozenset()) -> dict:
    """The key tree of a JSON object: each key, with the key tree of an object value."""
    return {k: keys(v) if isinstance(v, dict) else None for k, v in obj.items() if k not in skip}


def test_the_documented_requests_are_served_and_the_documented_replies_and_status_have_the_real_keys(rig):
    """Each request protocol.md shows, sent as written, is answered without an error; its
    chunks and final reply carry the keys the docs show (besides those the docs call optional
    or added: `run`, `warnings`), and so does the retained status a dashboard reads."""
    objs = doc_json_objects()
    requests = [o for o in objs if "mode" in o]
    assert {r["mode"] for r in requests} == {"complete", "infill", "chat"}
    doc_chunk = next(o for o in objs if "seq" in o)
    doc_final = next(o for o in objs if o.get("done") is True and "text" in o)
    doc_status = next(o for o in objs if "state" in o)
    for request in requests:
        topic = f"{REPLY}/docs/{request['id']}"
        watcher = subprocess.Popen(["mosquitto_sub", "-h", "127.0.0.1", "-q", "1", "-t", topic,
                                    "-t", f"edge/{DEVICE}/v1/status", "-v"], env=rig.env, stdout=subprocess.PIPE,
                                   text=True)
        try:
            status = json.loads(watcher.stdout.readline().split(" ", 1)[1])  # the retained status: subscribed
            assert keys(status) == keys(doc_status) | {"policy": None}, status
            pub = rig.run(["mosquitto_pub", "-V", "mqttv5", "-h", "127.0.0.1", "-q", "1", "-t", GENERATE,
                           "-D", "publish", "response-topic", topic, "-m", json.dumps(request)])
            assert pub.returncode == 0, pub.stderr
            replies = []
            while not replies or not replies[-1]["done"]:
                line_topic, payload = watcher.stdout.readline().rstrip("\n").split(" ", 1)
                if line_topic == topic:
                    replies.append(json.loads(payload))
        finally:
            watcher.terminate()
            watcher.wait(10)
        final = replies[-1]
        assert "error" not in final, (request, final)
        assert keys(final, skip=frozenset({"warnings"})) == keys(doc_final), final
        assert len(replies) == 1 if request.get("stream") is False else len(replies) > 1
        for chunk in replies[:-1]:
            assert keys(chunk, skip=frozenset({"run"})) == keys(doc_chunk), chunk


def test_a_dashboard_sees_the_will_of_a_killed_daemon_dated_from_its_start(tiny_bundle, tmp_path):
    """What `mosquitto_sub -t 'edge/+/v1/status' -v` shows once a daemon is SIGKILLed: the
    will, offline with a reason, its ts the daemon's start (before its first online status)."""
    broker = MosquittoBroker(tmp_path / "broker").start()
    watch = StatusWatch(broker.host, broker.port, "line-9")
    config = write_serve_config(tmp_path / "serve.toml", broker_url=broker.url, device_id="line-9",
                                bundle=tiny_bundle, state_dir=tmp_path / "state")
    t = time.monotonic()
    proc = ServeProcess(config, tmp_path / "daemon.log")
    try:
        online = wait_online(watch, proc, 60, after=t)
        assert "reason" not in online
        proc.kill()
        watch.wait_state("offline", 20, after=t)
        out = subprocess.run(["mosquitto_sub", "-h", broker.host, "-p", str(broker.port), "-t", "edge/+/v1/status",
                              "-v", "-C", "1", "-W", "10"], capture_output=True, text=True, timeout=20)
        topic, payload = out.stdout.rstrip("\n").split(" ", 1)
        will = json.loads(payload)
        assert topic == "edge/line-9/v1/status" and will["device_id"] == "line-9"
        assert (will["state"], will["reason"], will["running"], will["queue_depth"]) == (
            "offline", "connection lost", False, 0)
        assert will["ts"] <= online["ts"]
        # the same keys as the online status (but for the will's reason and the watch's own _received)
        assert keys(will, skip=frozenset({"reason"})) == keys(online, skip=frozenset({"_received"}))
    finally:
        proc.close()
        watch.close()
        broker.stop()
