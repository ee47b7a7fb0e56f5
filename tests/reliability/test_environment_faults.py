"""Faults of the machine around the daemon: a read-only or full state directory,
the bundle folder removed under a running daemon, the broker unreachable at
start. Each ends in a clear error or a clean retry, never a hang or a silent loss.

The full and read-only state directories are small tmpfs mounts (the suite runs
as root in CI); where mounting is not allowed those tests are skipped.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from reliability_kit import Ledger, ServeProcess, StatusWatch, record_figures, wait_online, write_serve_config
from service_harness import DaemonProcess, write_config

from mosquitto_broker import MosquittoBroker, free_port

DEVICE = "env-dev"
GENERATE = f"edge/{DEVICE}/v1/generate"


@pytest.fixture
def tmpfs(tmp_path):
    """A 64 KiB tmpfs at tmp_path/"mnt" (unmounted afterwards)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _serve(config: Path, log: Path, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge_runtime", "serve", "--config", str(config)],
                          capture_output=True, text=True, timeout=timeout)


def test_read_only_state_dir_is_a_clear_error_at_start(tiny_bundle, broker, tmpfs, tmp_path):
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    config = write_serve_config(tmp_path / "s.toml", broker_url=broker.url, device_id=DEVICE, bundle=tiny_bundle,
                                state_dir=tmpfs)
    t = time.monotonic()
    r = _serve(config, tmp_path / "d.log")
    assert r.returncode == 2, r.stderr
    assert "service.state_dir" in r.stderr and "not writable" in r.stderr, r.stderr
    # and a state dir that cannot be created (a read-only parent)
    config2 = write_serve_config(tmp_path / "s2.toml", broker_url=broker.url, device_id=DEVICE, bundle=tiny_bundle,
                                 state_dir=tmpfs / "sub")
    r2 = _serve(config2, tmp_path / "d2.log")
    assert r2.returncode == 2 and "service.state_dir" in r2.stderr and "cannot create" in r2.stderr, r2.stderr
    record_figures("state_dir_read_only", {"exit_code": r.returncode, "message": r.stderr.strip().splitlines()[-1],
                                           "message_cannot_create": r2.stderr.strip().splitlines()[-1],
                                           "seconds_to_exit": round(time.monotonic() - t, 2)})


def test_full_state_dir_at_start_is_a_clear_error(tiny_bundle, broker, tmpfs, tmp_path):
    _fill(tmpfs)
    config = write_serve_config(tmp_path / "s.toml", broker_url=broker.url, device_id=DEVICE, bundle=tiny_bundle,
                                state_dir=tmpfs)
    t = time.monotonic()
    r = _serve(config, tmp_path / "d.log")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "cannot open the reply store" in r.stderr and "disk is full" in r.stderr, r.stderr
    record_figures("state_dir_full_at_start", {"exit_code": r.returncode, "message": r.stderr.strip().splitlines()[-1],
                                               "seconds_to_exit": round(time.monotonic() - t, 2)})


def _fill(mnt: Path) -> None:
    fd = os.open(mnt / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 1024)
    except OSError:
        pass
    finally:
        os.close(fd)


def test_state_dir_fills_up_while_serving(broker, tmpfs, tmp_path):
    """The reply store cannot be written: every request is still answered (once),
    and the log says why redelivery protection is missing for those replies."""
    config = write_config(tmp_path / "d.toml", broker, tmpfs, device_id=DEVICE)
    calls = tmp_path / "calls.txt"
    watch = StatusWatch(broker.host, broker.port, DEVICE)
    t = time.monotonic()
    daemon = DaemonProcess(config, calls_file=calls)
    try:
        wait_online(watch, daemon, 30, after=t)
        with Ledger(broker.host, broker.port, tag="full").listen() as ledger:
            ledger.send(GENERATE, "before", {"id": "before", "mode": "complete", "prompt": "a b"})
            assert not ledger.wait_finals(["before"], 10)
            _fill(tmpfs)
            ids = [f"full-{i}" for i in range(20)]
            for i, rid in enumerate(ids):
                ledger.send(GENERATE, rid, {"id": rid, "mode": "complete", "prompt": f"{'x' * 500} y{i}"})
            missing = ledger.wait_finals(ids, 20)
            time.sleep(0.3)
            tally = ledger.tally(ids)
            (tmpfs / "filler").unlink()
            # room again: 64 KiB less the store's files (its -shm alone takes 32 KiB) is still too little
            subprocess.run(["mount", "-o", "remount,size=1m", str(tmpfs)], check=True)
            ledger.send(GENERATE, "after", {"id": "after", "mode": "complete", "prompt": "c d"})
            assert not ledger.wait_finals(["after"], 10)
        with Ledger(broker.host, broker.port, tag="full").listen() as again:  # its redelivery: from the store
            again.send(GENERATE, "after", {"id": "after", "mode": "complete", "prompt": "c d"})
            assert not again.wait_finals(["after"], 10)
        assert daemon.process.poll() is None
        log = daemon.log
        assert calls.read_text().split().count("after") == 1, "storing did not resume once there was room again"
        store_errors = log.count("could not store the final reply")
        assert "Traceback" not in log, log[-3000:]
        record_figures("state_dir_full_while_serving", {**tally, "missing": len(missing),
                                                        "store_errors_logged": store_errors})
        assert not missing and tally["duplicated"] == 0, tally
        assert store_errors >= 1, log[-3000:]
    finally:
        watch.close()
        daemon.stop()


@pytest.fixture
def ext4_image(tmp_path):
    """A 16 MiB ext4 file system on a loop device at tmp_path/"card" (an SD card's state
    partition); unmounted and detached afterwards."""
    image, mnt = tmp_path / "card.img", tmp_path / "card"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(16 * 2**20)
    made = subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], capture_output=True)
    loop = subprocess.run(["losetup", "-f", "--show", str(image)], capture_output=True, text=True)
    if made.returncode != 0 or loop.returncode != 0:
        pytest.skip(f"no ext4 on a loop device here: {(made.stderr or b'').decode()}{loop.stderr}".strip())
    device = loop.stdout.strip()
    if subprocess.run(["mount", device, str(mnt)], capture_output=True).returncode != 0:
        subprocess.run(["losetup", "-d", device])
        pytest.skip("cannot mount a loop device here")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
    subprocess.run(["losetup", "-d", device], capture_output=True)


def _shut_down(mnt: Path) -> None:
    """Every later write to the file system fails (EIO), as on an SD card that stopped taking
    writes: EXT4_IOC_SHUTDOWN, without flushing its journal."""
    import fcntl
    import struct

    fd = os.open(mnt, os.O_RDONLY)
    try:
        fcntl.ioctl(fd, 0x8004587D, struct.pack("I", 2))  # _IOR('X', 125, __u32), EXT4_GOING_FLAGS_NOLOGFLUSH
    finally:
        os.close(fd)


def test_state_dir_stops_taking_writes_while_serving(broker, ext4_image, tmp_path):
    """The state partition fails mid-serve (writes end in EIO, as on an SD card that stopped
    taking them): every request is still answered once and the daemon stays up. The journal
    had a traceback a request, ending in `sqlite3.DatabaseError: database disk image is
    malformed` (sqlite's reading of EIO): one line now, naming the store, the error and
    what is lost."""
    state = ext4_image / "state"
    config = write_config(tmp_path / "d.toml", broker, state, device_id=DEVICE)
    watch = StatusWatch(broker.host, broker.port, DEVICE)
    t = time.monotonic()
    daemon = DaemonProcess(config)
    try:
        wait_online(watch, daemon, 30, after=t)
        with Ledger(broker.host, broker.port, tag="eio").listen() as ledger:
            ledger.send(GENERATE, "before", {"id": "before", "mode": "complete", "prompt": "a b"})
            assert not ledger.wait_finals(["before"], 10)
            _shut_down(ext4_image)
            ids = [f"eio-{i}" for i in range(5)]
            for rid in ids:
                ledger.send(GENERATE, rid, {"id": rid, "mode": "complete", "prompt": f"x y {rid}"})
            missing = ledger.wait_finals(ids, 20)
            tally = ledger.tally(ids)
        assert daemon.process.poll() is None
        log = daemon.log
        stored = [line for line in log.splitlines() if "could not store the final reply" in line]
        record_figures("state_dir_fails_while_serving", {**tally, "missing": len(missing),
                                                         "store_errors_logged": len(stored),
                                                         "message": stored[-1] if stored else None})
        assert not missing and tally["duplicated"] == 0, tally
        # one line each, naming the store and the disk's error, no traceback (was one per request)
        assert len(stored) == len(ids) and "Traceback" not in log, log[-3000:]
        assert all(f"in the reply store {state}/replies-{DEVICE}.sqlite3 (service.state_dir): " in line
                   and "a redelivery of it would be generated again" in line for line in stored), stored
    finally:
        watch.close()
        daemon.stop()


def test_bundle_removed_under_a_running_daemon(tiny_bundle, broker, tmp_path):
    """The model is in memory: the daemon keeps serving; a restart then refuses
    with a message naming the missing folder, at once."""
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    config = write_serve_config(tmp_path / "s.toml", broker_url=broker.url, device_id=DEVICE, bundle=bundle,
                                state_dir=tmp_path / "state")
    watch = StatusWatch(broker.host, broker.port, DEVICE)
    t = time.monotonic()
    proc = ServeProcess(config, tmp_path / "d.log")
    try:
        wait_online(watch, proc, 60, after=t)
        shutil.rmtree(bundle)
        with Ledger(broker.host, broker.port, tag="rm").listen() as ledger:
            ledger.send(GENERATE, "r1", {"id": "r1", "mode": "complete", "prompt": "def f():", "max_tokens": 8})
            assert not ledger.wait_finals(["r1"], 30)
            assert "text" in ledger.finals("r1")[0], ledger.finals("r1")
        proc.terminate()
        assert proc.wait(30) == 0
    finally:
        proc.close()
        watch.close()
    t = time.monotonic()
    r = _serve(config, tmp_path / "d2.log")
    assert r.returncode == 2 and "model.bundle" in r.stderr and str(bundle) in r.stderr, r.stderr
    # removed between the config check and the load: the loader names it too
    from edge_runtime.bundle import load_bundle
    from edge_runtime.errors import BundleError

    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(bundle)
    bundle.write_text("")  # a file where the folder was: said so
    with pytest.raises(BundleError, match="is a file, not a folder"):
        load_bundle(bundle)
    bundle.unlink()
    record_figures("bundle_removed", {"served_after_removal": True, "restart_exit_code": r.returncode,
                                      "restart_message": r.stderr.strip().splitlines()[-1],
                                      "seconds_to_exit": round(time.monotonic() - t, 2)})


@pytest.mark.parametrize("damage", ["weights-empty", "manifest-zeros"])
def test_an_installed_bundle_cut_short_by_a_power_cut_is_refused_at_boot_naming_the_repair(tiny_bundle, tmp_path,
                                                                                          damage):
    """What a power cut soon after a copy leaves (files of the right names, empty or zero-filled):
    `serve`, as the unit starts it, exits 2 with one `error:` line that names the file and how it
    is wrong, and says how to repair it on the device: install-service with the bundle it was
    installed from copies it again (it said only `copy the bundle again from where it was
    exported`; an all-zero bundle.json was `is not valid JSON: Expecting value: line 1 column
    1`, no remedy at all). The rerun repairs it."""
    from edge_runtime import install_service as svc
    from edge_runtime.bundle import load_bundle

    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").write_text("edge-runtime:x:999:999::/var/lib/edge-runtime:/usr/sbin/nologin\n")
    (root / "etc" / "group").write_text("edge-runtime:x:999:\n")
    exe = root / "opt/edge-runtime/venv/bin/edge-runtime"
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/opt/edge-runtime/venv/bin/python\n")
    exe.chmod(0o755)

    def install() -> list[str]:
        return svc.install_service("cpu-x86_64", tiny_bundle, root=root, executable="/" + str(exe.relative_to(root)),
                                   run=lambda argv, **kw: pytest.fail(f"no command expected: {argv}"))

    install()
    installed = root / "opt/edge-runtime/bundles" / tiny_bundle.name
    if damage == "weights-empty":
        (installed / "model.onnx.data").write_bytes(b"")
        said = "error: model.onnx.data: size 0 does not match the manifest"
    else:
        manifest = installed / "bundle.json"
        manifest.write_bytes(bytes(manifest.stat().st_size))
        said = f"error: {installed / 'bundle.json'} holds no manifest"
    config = write_serve_config(tmp_path / "s.toml", broker_url="mqtt://127.0.0.1:1", device_id=DEVICE,
                                bundle=installed, state_dir=tmp_path / "state")
    r = _serve(config, tmp_path / "d.log")
    errors = [line for line in r.stderr.splitlines() if "error" in line.lower()]
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(errors) == 1, r.stderr
    assert errors[0].startswith(said), errors[0]
    assert "`edge-runtime install-service --bundle <that folder>` copies an installed bundle again" in errors[0]
    steps = install()
    assert f"bundle /opt/edge-runtime/bundles/{tiny_bundle.name}: replaced from {tiny_bundle}" in steps, steps
    assert load_bundle(installed).manifest_sha256 == load_bundle(tiny_bundle).manifest_sha256


@pytest.mark.parametrize("copy_weights", [False, True])
def test_weights_file_rewritten_in_place_under_a_running_daemon(tiny_bundle, broker, tmp_path, copy_weights):
    """`cp` of another bundle over the served one rewrites model.onnx.data in place. onnxruntime
    maps that file by default: the next request reads the new bytes (another answer), and once
    the file is cut short the daemon dies of SIGBUS (docs/deployment.md). With [model]
    copy_weights (serve --copy-weights) the session holds its own copy: the same greedy answer
    after both, and the daemon keeps serving."""
    import signal

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    data = bundle / "model.onnx.data"
    config = write_serve_config(tmp_path / "s.toml", broker_url=broker.url, device_id=DEVICE, bundle=bundle,
                                state_dir=tmp_path / "state")
    watch = StatusWatch(broker.host, broker.port, DEVICE)
    t = time.monotonic()
    proc = ServeProcess(config, tmp_path / "d.log", extra=["--copy-weights"] if copy_weights else [])
    request = {"mode": "complete", "prompt": "def fib(n):", "max_tokens": 12, "temperature": 0}
    try:
        wait_online(watch, proc, 60, after=t)
        with Ledger(broker.host, broker.port, tag="cp").listen() as ledger:
            def answer(rid: str) -> str:
                ledger.send(GENERATE, rid, {"id": rid, **request})
                assert not ledger.wait_finals([rid], 30), proc.log[-3000:]
                return ledger.finals(rid)[0]["text"]

            first = answer("r1")
            size = data.stat().st_size
            with open(data, "r+b") as f:  # what cp does to the file: same inode, new bytes
                f.write(bytes(size))
            second = answer("r2")
            if not copy_weights:
                assert second != first  # the mapped weights changed under the session
            else:
                assert second == first
            os.truncate(data, 4096)
            if not copy_weights:
                ledger.send(GENERATE, "r3", {"id": "r3", **request})
                assert proc.wait(30) == -signal.SIGBUS
                return
            assert answer("r3") == first and proc.alive()
        assert "copied into the daemon's memory at load" in proc.log
        proc.terminate()
        assert proc.wait(30) == 0
    finally:
        proc.close()
        watch.close()


def test_broker_unreachable_at_start_then_appears(tmp_path):
    """No broker at start: the daemon retries with backoff (no exit, no hang) and
    serves as soon as the broker is up; SIGTERM while still unconnected exits 0 at once."""
    port = free_port()
    broker = MosquittoBroker(tmp_path / "broker", port=port)
    config = write_config(tmp_path / "d.toml", broker, tmp_path / "state", device_id=DEVICE)
    daemon = DaemonProcess(config)
    try:
        time.sleep(3.0)
        assert daemon.process.poll() is None, daemon.log
        broker.start()
        t_up = time.monotonic()
        watch = StatusWatch(broker.host, broker.port, DEVICE)
        try:
            wait_online(watch, daemon, 40, after=0)
            connect_s = time.monotonic() - t_up
            with Ledger(broker.host, broker.port, tag="late").listen() as ledger:
                ledger.send(GENERATE, "late", {"id": "late", "mode": "complete", "prompt": "a b"})
                assert not ledger.wait_finals(["late"], 10)
        finally:
            watch.close()
    finally:
        daemon.stop()
        broker.stop()
    # never reachable: SIGTERM ends it cleanly and quickly
    dead = MosquittoBroker(tmp_path / "nobroker", port=free_port())
    config2 = write_config(tmp_path / "d2.toml", dead, tmp_path / "state2", device_id=DEVICE)
    daemon2 = DaemonProcess(config2)
    try:
        time.sleep(2.0)
        assert daemon2.process.poll() is None
        t = time.monotonic()
        daemon2.signal(15)
        code = daemon2.wait(15)
        stop_s = time.monotonic() - t
    finally:
        daemon2.stop()
    assert code == 0, daemon2.log
    record_figures("broker_unreachable_at_start", {"online_after_broker_up_s": round(connect_s, 2),
                                                   "sigterm_while_unconnected_exit_code": code,
                                                   "sigterm_while_unconnected_s": round(stop_s, 2)})
