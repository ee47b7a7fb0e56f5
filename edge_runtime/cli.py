"""`edge-runtime` command line. Each subcommand parses flags, calls one public
function, prints, and maps typed errors to a one-line message and exit code 2."""

from __future__ import annotations

import argparse
import codecs
import errno
import json
import logging
import os
import signal
import stat
import sys
from pathlib import Path

from .errors import BundleError, ConfigError, EdgeRuntimeError
from .interrupts import Terminated, terminate_as_interrupt
from .log_output import LOG_LEVELS, configure_logging, journal_lines, journal_priority, writes_to_journal
from .request_flags import add_request_arguments, empty_flag, integer_at_least, more_sampling, request_source


def _die(message: str, code: int = 2) -> int:
    text = f"error: {message}"
    # in systemd's journal at priority err (`journalctl -p err` shows why a start failed)
    print(journal_lines(text, journal_priority(logging.ERROR)) if writes_to_journal(sys.stderr) else text,
          file=sys.stderr)
    return code


def run_script(main) -> int:
    """The main of a script under benchmarks/: a known error (a bundle or checkpoint that is
    missing or damaged, a value out of range) is one line `error: ...` and exit 2, as from an
    edge-runtime command, not a traceback; Ctrl-C exits 130."""
    try:
        return main() or 0
    except EdgeRuntimeError as exc:
        return _die(str(exc))
    except KeyboardInterrupt:
        return _die("interrupted", 130)


# -- profiles -------------------------------------------------------------------------------
def cmd_profiles(args) -> int:
    from .profiles import detect_profile, list_profiles, profile_summary

    if args.detect:
        profile, reason = detect_profile()
        print(f"{profile.name}: {reason}")
        return 0
    for profile in list_profiles():
        print(profile_summary(profile))
    return 0


# -- export / verify --------------------------------------------------------------------------
EXPORT_DOES_NOT_FIT = 3  # export's exit status when the bundle was written but is over the profile's memory budget
FOLDER_OF = {"--checkpoint": "checkpoint folder", "--output": "bundle folder to create",
             "--profile": "device profile's name or TOML file"}


def export_side_missing(exc: ImportError) -> str:
    return (f"the export side is not installed ({exc.name} missing): pip install torch==2.13.0 && "
            "pip install '/path/to/edge-runtime[export,cpu]' (the source folder)")


def cmd_export(args) -> int:
    try:
        from edge_export.pipeline import ExportOptions, format_summary, run_export
    except ImportError as exc:
        return _die(export_side_missing(exc))
    empty = empty_flag(args, FOLDER_OF)
    if empty:
        return _die(empty)
    opts = ExportOptions(checkpoint=Path(args.checkpoint), profile=args.profile, output=Path(args.output),
                         precision=args.precision, max_context=args.max_context, allow_degraded=args.allow_degraded,
                         force=args.force, fidelity_tokens=args.fidelity_tokens,
                         fidelity_corpus_tokens=args.fidelity_corpus_tokens, algorithm=args.algorithm,
                         calibration_text=args.calibration_text, calibration_tokens=args.calibration_tokens,
                         kv_cache_bits=args.kv_cache_bits,
                         skip_fidelity=args.skip_fidelity, graph=args.graph, variant=args.variant)
    with terminate_as_interrupt():
        summary = run_export(opts)
    print(format_summary(summary))
    if not summary.fits:  # kept, but the engine refuses to start it with this profile
        return _die(f"the bundle at {summary.bundle} was written, but it does not fit the {summary.memory.profile} "
                    f"profile's memory budget ({summary.memory.describe()}): the engine will refuse to start it "
                    "with this profile; export again with a lower --max-context or a smaller --precision",
                    EXPORT_DOES_NOT_FIT)
    return 0


def cmd_verify(args) -> int:
    from .bundle import load_bundle, unlisted_files
    from .fidelity_record import FidelityRecord

    bundle = load_bundle(args.bundle, progress=(lambda name: print(f"checking {name}", file=sys.stderr))
                         if not args.quiet else None)
    files = bundle.manifest["files"]
    extra = unlisted_files(bundle.root, bundle.manifest)
    if extra:  # not the bundle's: nothing reads them (the graph's external data is listed, or refused above)
        shown = ", ".join(extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
        print(f"note: {bundle.root} also holds files bundle.json does not list (not part of the bundle, not "
              f"checked): {shown}", file=sys.stderr)
    print(f"ok: {bundle.root} ({len(files)} files, {sum(f['size'] for f in files)} bytes, format "
          f"{bundle.manifest['format_version']}, bundle.json sha256 {bundle.manifest_sha256})")
    fidelity = FidelityRecord.from_manifest(bundle.manifest)  # the files are intact; is what they hold measured?
    if not fidelity.trusted:
        print(f"warning: {fidelity.describe()}", file=sys.stderr)
    elif not args.quiet:
        print(fidelity.describe(), file=sys.stderr)
    return 0


# -- generate -------------------------------------------------------------------------------
def request_from_args(args):
    from .types import GenerationRequest, SamplingParams

    defaults = SamplingParams()
    sampling = SamplingParams(
        temperature=defaults.temperature if args.temperature is None else args.temperature,
        top_p=defaults.top_p if args.top_p is None else args.top_p,
        top_k=defaults.top_k if args.top_k is None else args.top_k,
        seed=args.seed, **more_sampling(args))
    common = dict(max_tokens=args.max_tokens, sampling=sampling, stop=tuple(args.stop))  # None: the default
    try:
        source = request_source(args)
    except ValueError as exc:
        raise EdgeRuntimeError(str(exc)) from None
    if source["mode"] == "chat":  # GenerationRequest makes the {"role", "content"} dicts Messages
        source["messages"] = tuple(source["messages"])
    return GenerationRequest(**source, **common)


def result_json(result) -> dict:
    from .protocol import usage_and_timings

    return {"text": result.text, "token_ids": list(result.token_ids),
            "prompt_token_ids": list(result.prompt_token_ids), "finish_reason": result.finish_reason,
            **usage_and_timings(result), **({"warnings": list(result.warnings)} if result.warnings else {})}


def cmd_generate(args) -> int:
    from .ask_command import decode_speed, drafted_note
    from .engine import Engine
    from .protocol import finite_or_none
    from .types import Chunk

    request = request_from_args(args)
    engine = Engine.from_bundle(args.bundle, profile=args.profile, prompt_lookup=args.prompt_lookup,
                                allow_cpu_fallback=args.allow_cpu_fallback)
    result = None
    streamed = False  # text written without its closing newline yet
    try:
        for item in engine.generate(request):
            if isinstance(item, Chunk):
                if not args.json and item.text:
                    streamed = True
                    sys.stdout.write(item.text)
                    sys.stdout.flush()
            else:
                result = item
    except EdgeRuntimeError as exc:  # the request's error, with the code `ask` and the protocol give it
        from .protocol import encode_error, error_fields

        if args.json:
            print(encode_error(None, exc.code, str(exc), fields=error_fields(exc)).decode())
        elif streamed:  # the error on a line of its own, not after the partial text
            print(flush=True)
        return _die(f"{exc.code}: {exc}", 1)
    except KeyboardInterrupt:
        if streamed:
            print(flush=True)
        raise
    if args.json:
        print(json.dumps(result_json(result), ensure_ascii=False))
    else:
        sys.stdout.write("\n")
        print(f"[{result.finish_reason}; {result.usage.prompt_tokens} prompt + {result.usage.completion_tokens} "
              f"generated tokens{drafted_note(result.usage.accepted_draft_tokens)}; ttft {result.timings.ttft_ms:.0f} ms; "
              f"{decode_speed(finite_or_none(result.timings.decode_tokens_per_s, 1))}]", file=sys.stderr)
        for warning in result.warnings:
            print(f"warning: {warning}", file=sys.stderr)
    return 0


# -- serve / ask ----------------------------------------------------------------------------
# After the bundle is loaded, how long the daemon waits for the broker before it tells systemd
# it is ready anyway (within the start time the bundle load leaves: at least 40 s)
BROKER_GRACE_S = 30.0


def cmd_serve(args, engine_factory=None) -> int:
    """Load config and engine (`engine_factory(bundle, profile)`, default
    Engine.from_bundle), serve until SIGTERM/SIGINT/SIGHUP, drain, exit 0. Under
    systemd (Type=notify): READY=1 once the bundle is loaded and the broker
    subscribed (or, with the broker out of reach, `BROKER_GRACE_S` after the load:
    the daemon is then active and keeps reconnecting), STATUS= lines, WATCHDOG=1
    while the worker is healthy, STOPPING=1 on drain."""
    from .serve_flags import missing_key_hint, serve_overrides
    from .config import load_config
    from .device_lock import DeviceLock
    from .engine import Engine
    from .malloc_arenas import limit_malloc_arenas
    from .policy import load_policy
    from .bundle import load_time_budget_s
    from .sdnotify import ReadyAnnouncer, StartExtender, SystemdNotifier, Watchdog
    from .service import SIGHUP_EXIT_STATUS, EdgeService

    try:
        config = load_config(Path(args.config) if args.config else None, serve_overrides(args))
    except ConfigError as exc:
        raise ConfigError(missing_key_hint(exc)) from None
    # an explicit --log-level wins over the config's [service] log_level
    logging.getLogger().setLevel(getattr(args, "log_level", None) or config.service.log_level_number)
    limit_malloc_arenas(2)  # before onnxruntime's and the daemon's threads: RSS stays flat over a soak
    # The policy is checked before the (slow) bundle load: a rule that does not compile stops start-up.
    policy = load_policy(config.policy.file) if config.policy.file is not None else None
    # before the (slow) bundle load too: a second daemon for this device stops at once
    device_lock = DeviceLock(config.service.resolved_state_dir, config.mqtt.device_id).acquire()
    notifier = SystemdNotifier.from_environment()
    notifier.status(f"loading {config.model.bundle}")
    # the first line in the journal, before the bundle's hashing (minutes for a 7B on an SD card)
    logging.getLogger("edge_runtime").info(
        "config %s; loading bundle %s (profile %s): checking the size and SHA-256 of each file first",
        args.config or "(command line only)", config.model.bundle, config.model.profile or "the bundle's own")
    with StartExtender(notifier, load_time_budget_s(config.model.bundle)):
        if engine_factory is None:
            engine = Engine.from_bundle(config.model.bundle, config.model.profile,
                                        check_memory=config.model.check_memory,
                                        allow_cpu_fallback=config.model.allow_cpu_fallback,
                                        pinned_sha256=config.model.bundle_sha256,
                                        prompt_cache=config.model.prompt_cache,
                                        prompt_lookup=config.model.prompt_lookup,
                                        copy_weights=config.model.copy_weights)
            # the first request should not pay for the first runs (and on a GPU a KV cache that does
            # not fit fails here, before the daemon reports ready)
            notifier.status(f"warming up {config.model.bundle}")
            try:
                warm_up_s = engine.warm_up()
            except EdgeRuntimeError:
                raise
            except Exception as exc:  # onnxruntime's own: out of device memory, a kernel that fails
                raise BundleError(f"{config.model.bundle} loaded but could not run a first request "
                                  f"({type(exc).__name__}: {exc}); on a GPU, is another process holding its "
                                  f"memory? (`edge-runtime fit` says what this model needs)") from exc
            logging.getLogger("edge_runtime").info("warmed up in %.0f ms", warm_up_s * 1000)
        else:
            engine = engine_factory(config.model.bundle, config.model.profile)
    logging.getLogger("edge_runtime").info("model %s (%s, %s) on %s", engine.info.model_name, engine.info.precision,
                                           engine.info.profile, engine.info.provider)
    service: EdgeService | None = None

    def on_status(text: str) -> None:
        if service is not None and service.state in ("draining", "offline"):
            notifier.stopping(text)
        else:
            notifier.status(text)

    announcer = ReadyAnnouncer(notifier, BROKER_GRACE_S, lambda: (
        f"loaded {engine.info.model_name}; waiting for the broker at {config.mqtt.broker} (requests are served "
        "once it answers)"))
    service = EdgeService(config, engine, on_status=on_status, policy=policy, device_lock=device_lock,
                          on_ready=lambda: announcer.serving(service.serving_status))
    watchdog = None
    if notifier.watchdog_interval_s:
        watchdog = Watchdog(notifier, lambda: bool(service.health()), notifier.watchdog_interval_s).start()
    announcer.start()
    try:
        service.run_forever()
    finally:
        announcer.stop()
        if watchdog is not None:
            watchdog.stop()
        notifier.close()
    return SIGHUP_EXIT_STATUS if service.stop_signal == signal.SIGHUP else 0


def cmd_ask(args) -> int:
    from .ask_command import run_ask

    return run_ask(args)


def cmd_openai_bridge(args) -> int:
    from .openai_bridge import run_bridge

    return run_bridge(args)


# -- policy / audit -------------------------------------------------------------------------
def cmd_policy(args) -> int:
    from .policy import load_policy

    policy = load_policy(args.file)
    print(f"ok: {policy.source} (sha256 {policy.sha256[:16]}): {len(policy.rules)} rules")
    for rule in policy.rules:
        scope = "" if not rule.clients else f" clients={','.join(rule.clients)}"
        hold = ""
        if rule.action == "stop":
            hold = "; holds back " + " and ".join(
                ([f"{rule.pattern_hold} characters for its patterns"] if rule.patterns else [])
                + (["what could begin a phrase"] if rule.phrases is not None else []))
        print(f"  {rule.name}: {rule.action} on {'+'.join(sorted(rule.on))} in {','.join(sorted(rule.modes))}"
              f"{scope}{hold}")
    lim = policy.limits
    print(f"  limits: {lim.requests_per_minute or 'no'} requests/min, max_tokens {lim.max_tokens or 'daemon default'}; "
          f"{len(lim.per_client)} client overrides")
    c = policy.classifier
    if c is not None:
        what = " ".join(c.command) if c.command else f"bundle {c.bundle}"
        print(f"  classifier: {what} ({c.action}, timeout {c.timeout_s:g} s, fails {c.on_failure})")
    return 0


def cmd_audit(args) -> int:
    from .audit import AUDIT_FILE, clock_notes, event_json, filter_events, format_event, parse_since, read_events
    from .config import SERVICE_STATE_DIR, default_state_dir, load_config

    candidates: list[Path]
    if args.file:
        candidates = [Path(args.file)]
    elif args.state_dir:
        candidates = [Path(args.state_dir) / AUDIT_FILE]
    else:
        config = load_config(Path(args.config), check_files=False) if args.config else None
        explicit = config.service.state_dir if config is not None else None
        # No state_dir in the config: the daemon's is $STATE_DIRECTORY under systemd (the
        # installed unit's /var/lib/edge-runtime), which a shell does not have; look there too.
        if explicit is not None:
            candidates = [explicit / AUDIT_FILE]
        else:
            try:
                own = [default_state_dir() / AUDIT_FILE]
            except ConfigError:  # no $HOME, and a user without a home: the service's is still there to read
                own = []
            candidates = list(dict.fromkeys([*own, SERVICE_STATE_DIR / AUDIT_FILE]))
    try:
        since = parse_since(args.since) if args.since is not None else None  # '': an error, not no filter
    except ValueError as exc:
        return _die(str(exc))
    def unreadable(path: Path, exc: OSError) -> EdgeRuntimeError:
        # the service writes the log 0600 (it may hold request text): root or the service user only
        hint = (" (run as root: sudo edge-runtime audit ...)"
                if exc.errno in (errno.EACCES, errno.EPERM) else "")
        return EdgeRuntimeError(f"cannot read {path}: {exc.strerror or exc}{hint}")

    def present(path: Path) -> bool:
        try:
            return path.exists() or path.with_name(path.name + ".1").exists()
        except OSError as exc:
            raise unreadable(path.parent, exc) from None

    if args.state_dir:  # a folder named on the command line that is not there is a typo, not "nothing yet"
        try:
            is_folder = stat.S_ISDIR(Path(args.state_dir).stat().st_mode)
        except (FileNotFoundError, NotADirectoryError):
            return _die(f"--state-dir {args.state_dir}: no such folder")
        except OSError as exc:
            raise unreadable(Path(args.state_dir), exc) from None
        if not is_folder:
            return _die(f"--state-dir {args.state_dir}: not a folder (the daemon's state directory; "
                        f"an audit.jsonl file: --file FILE)")
    found = [p for p in candidates if present(p)]
    if not found and args.file:
        return _die(f"--file {args.file}: no such file")
    if not found:
        print(f"no audit log at {' or '.join(map(str, candidates))}: nothing was refused, stopped or flagged there "
              "yet (a daemon with another state directory: --state-dir DIR)", file=sys.stderr)
        return 0
    path = found[-1]  # both: the service's
    try:
        logged = list(read_events(path))
    except OSError as exc:
        raise unreadable(path, exc) from None
    events = list(filter_events(logged, client=args.client, rule=args.rule, action=args.action,
                                request_id=args.request, since=since))
    for note in clock_notes(logged):
        print(f"note: {note}", file=sys.stderr)
    matched = len(events)  # the count says how many match, also where --tail shows fewer (--tail 0: only it)
    if args.tail is not None:  # --tail 0: none, as tail -n 0 (events[-0:] would be all)
        events = events[max(0, len(events) - args.tail):]
    for e in events:
        if args.json:
            print(event_json(e))
        else:
            print(format_event(e))
    if not args.json:
        shown = f", the last {len(events)} shown" if len(events) < matched else ""
        print(f"{matched} events ({path}){shown}", file=sys.stderr)
    return 0


# -- bench ----------------------------------------------------------------------------------
def cmd_bench(args) -> int:
    from .bench import format_result, result_json, run_bench

    if args.peers is not None:  # issue #8: side by side with onnxruntime-genai and llama.cpp (benchmarks/peers.py)
        import subprocess

        ignored = [flag for flag, value in (("--bundle", args.bundle), ("--profile", args.profile),
                                            ("--context", args.context), ("--json", args.json or None)) if value]
        if ignored:
            return _die(f"{', '.join(ignored)} would be ignored with --peers, which builds its own models and takes "
                        "its own arguments after it (bench --peers --help lists them)")

        script = Path(__file__).resolve().parents[1] / "benchmarks" / "peers.py"
        if not script.is_file():
            return _die(f"--peers needs the repository's benchmarks/peers.py (not found at {script})")
        return subprocess.call([sys.executable, str(script), *args.peers])
    if not args.bundle:
        return _die("bench needs --bundle (or --peers)")
    result = run_bench(args.bundle, profile=args.profile, prefill_tokens=args.prefill_tokens,
                       contexts=tuple(args.context or (128, 2048)), decode_tokens=args.decode_tokens,
                       roofline=args.roofline, bandwidth_mib=args.bandwidth_mib)
    print(result_json(result) if args.json else format_result(result))
    return 0


# -- demo model -------------------------------------------------------------------------------
def cmd_demo_model(args) -> int:
    try:
        from edge_export.demo_model import ensure_demo_model
    except ImportError as exc:
        return _die(export_side_missing(exc))
    try:
        with terminate_as_interrupt():
            path = ensure_demo_model(Path(args.cache_dir) if args.cache_dir else None)
    except ImportError as exc:  # training imports torch and transformers (a cached model needs neither)
        return _die(export_side_missing(exc))
    print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .bundle import SUPPORTED_FORMAT_VERSIONS

    parser = argparse.ArgumentParser(prog="edge-runtime", description="Offline Code Llama on edge devices.")
    # the bundle formats too: every version up to 2026-12-03 is 0.1.0, and they tell a runtime that
    # reads format 2 from one that does not (an upgrade from a wheel pip skipped, docs/deployment.md)
    formats = ", ".join(map(str, SUPPORTED_FORMAT_VERSIONS))
    parser.add_argument("--version", action="version",
                        version=f"edge-runtime {__version__} (bundle format_version {formats})")
    parser.add_argument("--log-level", default=None, type=str.upper, choices=LOG_LEVELS,
                        help="default WARNING; for serve, the config's [service] log_level (default INFO)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("profiles", help="list device profiles, or --detect the one for this machine")
    p.add_argument("--detect", action="store_true",
                   help="name the packaged profile for this machine (GPU, Jetson model, CPU architecture) and why")
    p.set_defaults(func=cmd_profiles)

    p = sub.add_parser("export", help="checkpoint folder -> quantized, verified ONNX bundle (workstation)")
    p.add_argument("--checkpoint", required=True, help="Hugging Face checkpoint folder (local)")
    p.add_argument("--profile", required=True, help="device profile name or TOML file")
    p.add_argument("--output", required=True, help="bundle folder to create")
    p.add_argument("--precision", choices=["int4", "int8", "fp16", "fp32"], help="default: the profile's")
    p.add_argument("--max-context", type=integer_at_least(1), help="context limit in tokens (default: the profile's)")
    p.add_argument("--allow-degraded", action="store_true", help="write the bundle even below the fidelity threshold")
    p.add_argument("--force", action="store_true", help="replace an existing bundle at --output")
    p.add_argument("--fidelity-tokens", type=integer_at_least(1), default=32, help="greedy tokens per fidelity prompt")
    p.add_argument("--fidelity-corpus-tokens", type=integer_at_least(0), default=512,
                   help="positions of the held-out code corpus scored by KL divergence against torch "
                        "(0: none; the corpus has about 1,860)")
    p.add_argument("--algorithm", choices=["rtn", "hqq", "gptq"],
                   help="quantization algorithm (default: the profile's): rtn rounds each block on its own; gptq "
                        "(fused graph) feeds each column's rounding error forward by the Hessian of calibration "
                        "activations; hqq (optimum graph)")
    p.add_argument("--calibration-text", type=Path,
                   help="gptq: a code file, or a folder of sources (its code files in path order), to calibrate on, "
                        "e.g. your own repository (default: export/assets/gptq-calibration.txt)")
    p.add_argument("--calibration-tokens", type=integer_at_least(1),
                   help="gptq: the first N tokens of the calibration text (default 4096)")
    p.add_argument("--kv-cache-bits", type=int, choices=[0, 8],
                   help="8: the fused graph keeps an int8 KV cache (scales calibrated here; needs onnxruntime >= 1.32 "
                        "on the device); 0: float (default: the profile's [kv_cache] bits, 8 on the CPU profiles)")
    p.add_argument("--graph", choices=["auto", "fused", "optimum"], default="auto",
                   help="fused: built from the tensors with GroupQueryAttention and one shared KV buffer, streamed "
                        "layer by layer (a 7B's graph in < 1 GiB of memory with --algorithm rtn, the int8 KV "
                        "cache's calibration included; ~3 GiB with gptq); optimum: "
                        "optimum's exporter (needed for --algorithm hqq); auto (default): fused, or optimum for "
                        "--algorithm hqq or a checkpoint the fused graph does not express (RoPE scaling, biases, "
                        "another activation, head_dim not a multiple of 16); auto does not switch for the profile: "
                        "fp32 (or an int8 KV cache) on a GPU profile is refused, ask --graph optimum")
    p.add_argument("--skip-fidelity", action="store_true",
                   help="do not measure fidelity (size/speed benchmarks of random weights); recorded in bundle.json")
    p.add_argument("--variant", choices=["base", "python", "instruct"], type=str.lower,
                   help="Code Llama variant (default: detected from the folder and config names, tokens, chat template)")
    p.set_defaults(func=cmd_export)

    from .memory_fit import add_arguments as add_fit_arguments, run as run_fit

    p = sub.add_parser("fit", help="does a bundle (--bundle) or each Code Llama size (--table) fit each profile's memory")
    add_fit_arguments(p)
    p.set_defaults(func=run_fit)

    p = sub.add_parser("verify", help="check a bundle's manifest and every file's SHA-256")
    p.add_argument("--bundle", required=True)
    p.add_argument("--quiet", action="store_true",
                   help="no 'checking FILE' line per file on stderr; the verdict only")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("generate", help="generate from a bundle on this machine (streams to stdout)")
    p.add_argument("--bundle", required=True)
    p.add_argument("--profile", help="device profile (default: the one the bundle was made for)")
    p.add_argument("--no-prompt-lookup", dest="prompt_lookup", action="store_false",
                   help="one decode step per token: no drafts from the context (requests draft by default)")
    p.add_argument("--allow-cpu-fallback", action="store_true", default=None,
                   help="run a GPU profile on the CPU provider when its GPU provider is missing, instead of "
                        "refusing (default: the profile's allow_cpu_fallback)")
    add_request_arguments(p)
    p.set_defaults(func=cmd_generate)

    from .roofline import DEFAULT_PROBE_MIB

    p = sub.add_parser("bench", help="prefill and decode speed of a bundle on this machine, and the share of "
                                     "its memory-bandwidth roofline")
    p.add_argument("--bundle")
    p.add_argument("--peers", nargs=argparse.REMAINDER, metavar="ARG",
                   help="compare with onnxruntime-genai and llama.cpp: runs benchmarks/peers.py with every argument "
                        "after --peers (--peers --help lists them; bash scripts/install-peers.sh installs the peers)")
    p.add_argument("--profile")
    p.add_argument("--prefill-tokens", type=integer_at_least(1), default=512)
    p.add_argument("--context", type=integer_at_least(1), action="append", help="decode context (repeatable; default 128 and 2048)")
    p.add_argument("--decode-tokens", type=integer_at_least(1), default=64)
    p.add_argument("--no-roofline", dest="roofline", action="store_false",
                   help="do not measure the memory bandwidth (nor give decode speed as a share of the roofline)")
    p.add_argument("--bandwidth-mib", type=integer_at_least(1), default=DEFAULT_PROBE_MIB,
                   help="MiB of each array the bandwidth is measured over (two on the host, one on a GPU; "
                        f"default {DEFAULT_PROBE_MIB})")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench)

    from .ask_command import add_ask_arguments
    from .serve_flags import add_serve_arguments
    from .install_service import add_arguments as add_install_arguments, run_install_service

    p = sub.add_parser("serve", help="the MQTT daemon: answer generation requests from the broker")
    add_serve_arguments(p)
    # also after `serve`, where an operator adds it to the unit's ExecStart= line (SUPPRESS: the one
    # given before `serve` stays when this is not given)
    p.add_argument("--log-level", default=argparse.SUPPRESS, type=str.upper, choices=LOG_LEVELS,
                   help="log level (default: the config's [service] log_level, INFO)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("ask", help="send one request to a daemon over MQTT and stream the answer")
    add_ask_arguments(p)
    p.set_defaults(func=cmd_ask)

    p = sub.add_parser("openai-bridge", help="serve OpenAI's HTTP API (completions, chat, infill via suffix) for "
                                             "tools that speak it, answered by a daemon over MQTT")
    add_ask_arguments(p, request_arguments=False)
    p.add_argument("--listen", default="127.0.0.1:8080",
                   help="HOST:PORT to serve on (default 127.0.0.1:8080; another host than loopback needs "
                        "--api-key-file)")
    p.add_argument("--api-key-file", help="file whose first line is the key clients must send "
                                          "(Authorization: Bearer KEY)")
    p.add_argument("--suffix-first", action="store_true",
                   help="infills (a completion with a suffix) in suffix-prefix-middle order, which keeps the prompt "
                        "cache across an editor's keystrokes (README: an editor's completions); a body's "
                        "\"suffix_first\" wins")
    p.set_defaults(func=cmd_openai_bridge)

    p = sub.add_parser("policy", help="check an operator safety policy file and list its rules")
    p.add_argument("file", help="policy TOML (see docs/policy.md)")
    p.set_defaults(func=cmd_policy)

    p = sub.add_parser("audit", help="print the policy audit log (refused, stopped and flagged requests)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--config", help="the daemon's config file (its [service] state_dir holds the log)")
    where.add_argument("--state-dir", help="the daemon's state directory")
    where.add_argument("--file", help="an audit.jsonl file")
    p.add_argument("--client", help="only this client id")
    p.add_argument("--rule", help="only this rule")
    p.add_argument("--action", choices=["refuse", "stop", "flag"])
    p.add_argument("--request", help="only this request id")
    p.add_argument("--since", help="30m, 2h, 7d or an ISO time")
    p.add_argument("--tail", type=integer_at_least(0), help="only the last N events (0: none, only the count)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("install-service", help="install the systemd unit, user, config and bundle (as root)")
    add_install_arguments(p)
    p.set_defaults(func=run_install_service)

    p = sub.add_parser("demo-model", help="train (or find cached) the small demo Code Llama checkpoint",
                       description="Train the 14 M-parameter demo Code Llama (the real architecture and tokenizer, "
                                   "a few minutes on the CPU; needs the export extra) or find it cached, and print "
                                   "its checkpoint folder (for export --checkpoint).")
    p.add_argument("--cache-dir", help="default: $EDGE_RUNTIME_CACHE or ~/.cache/edge-runtime")
    p.set_defaults(func=cmd_demo_model)
    return parser


def utf8_output() -> None:
    """Write standard output and error as UTF-8 whatever the locale says, as llama.cpp does: code is
    UTF-8, and under an ASCII or Latin-1 locale (PYTHONIOENCODING=ascii, LANG=en_US.ISO-8859-1) the
    first character the locale could not encode stopped `generate` and `ask` with a
    UnicodeEncodeError, and an error naming a rule `kein-passwört` said `kein-passw\\xf6rt`. The
    error handlers stay the locale's: under the C locale, stdout's surrogateescape writes a path's
    own bytes back (`verify` printing a bundle folder named `bündle` under LC_ALL=C PYTHONUTF8=0);
    stderr's backslashreplace never fails."""
    for stream in (sys.stdout, sys.stderr):
        encoding = getattr(stream, "encoding", None)
        if encoding and codecs.lookup(encoding).name != "utf-8" and hasattr(stream, "reconfigure"):
            stream.reconfigure(encoding="utf-8", errors=stream.errors)


# the device commands' paths (verify, generate, fit, bench, serve): Path("") would be the current folder
DEVICE_FLAGS = {"--bundle": "bundle folder", "--profile": "device profile's name or TOML file"}


def current_folder_gone() -> bool:
    """True when the working directory was removed after the process entered it (`cd build; rm -rf
    ../build` in another shell): relative paths then resolve nowhere."""
    try:
        os.getcwd()
    except FileNotFoundError:
        return True
    return False


def main(argv: list[str] | None = None) -> int:
    utf8_output()  # before parsing: argparse's errors quote the flags' text
    parser = build_parser()
    args = parser.parse_args(argv)
    empty = empty_flag(args, DEVICE_FLAGS)
    if empty:
        return _die(empty)
    if sys.stdout is None and args.func in (cmd_generate, cmd_ask):  # started with `>&-`: nowhere to stream to
        return _die("cannot write the output: standard output is closed (`>/dev/null` discards it)", 1)
    if args.func in (cmd_export, cmd_demo_model) and current_folder_gone():
        # torch's oneMKL exits the process at its first matrix product there ("Intel oneMKL FATAL ERROR:
        # Cannot load libtorch_cpu.so"), leaving the export's staging folder behind
        return _die("the current folder no longer exists (it was removed after the shell entered it): torch cannot "
                    "run from it; cd to a folder that exists")
    configure_logging(args.log_level or "WARNING")  # in systemd's journal: each line's priority, no timestamp
    try:
        return args.func(args)
    except EdgeRuntimeError as exc:
        return _die(str(exc))
    except Terminated as exc:
        return _die(f"interrupted ({exc.name})", exc.exit_status)
    except KeyboardInterrupt:
        return _die("interrupted", 130)
    except BrokenPipeError:  # `edge-runtime generate ... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 128 + signal.SIGPIPE
    except OSError as exc:  # the machine's, not the code's: a full disk (stdout to a full file), no permission
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO) and exc.filename is None:  # writing stdout
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
            return _die(f"cannot write the output: {exc.strerror}", 1)
        logging.getLogger("edge_runtime").debug("%s", exc, exc_info=True)
        where = f": {exc.filename}" if exc.filename is not None else ""
        return _die(f"{exc.strerror or exc}{where}", 1)


if __name__ == "__main__":
    sys.exit(main())
