"""`edge-runtime ask`: one request to a daemon over MQTT from the command line, its text
streamed to stdout (or its final reply printed as JSON with --json). The Python client
it drives is `edge_runtime.client.EdgeClient`."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .client import DEFAULT_TIMEOUT_S, EdgeClient, Generation, RemoteError
from .mqtt_connection import read_password_file
from .request_flags import add_request_arguments, integer_at_least, number_in, more_sampling, request_source


def add_ask_arguments(parser: argparse.ArgumentParser, *, request_arguments: bool = True) -> None:
    """Flags of `edge-runtime ask`. With ``request_arguments=False`` only the
    connection flags are added (for a parser that already has the prompt and
    sampling flags of `generate`: --prompt/--prefix/--suffix/--suffix-first/
    --messages/--max-tokens/--temperature/--top-p/--top-k/--seed/--stop/--json)."""
    parser.add_argument("--broker", required=True, help="mqtt://HOST:PORT or mqtts://HOST:PORT")
    parser.add_argument("--device-id", required=True, help="the daemon's device id (fleet: any device of a "
                                                           "fleet group)")
    parser.add_argument("--deadline-ms", type=integer_at_least(1), help="the daemon gives up after this long")
    parser.add_argument("--no-cache-prompt", dest="cache_prompt", action="store_false", default=None,
                        help="run the whole prompt, and leave nothing of it for the next request to reuse (the prompt cache)")
    parser.add_argument("--count-tokens", action="store_true",
                        help="generate nothing: print how many tokens the prompt has, the max_tokens it would run "
                             "with and the device's context limit (the protocol's count_tokens)")
    parser.add_argument("--timeout", type=number_in(0.0, low_open=True), default=DEFAULT_TIMEOUT_S,
                        help=f"seconds to wait for the first reply, and then between streamed chunks "
                             f"(default {DEFAULT_TIMEOUT_S:g})")
    parser.add_argument("--protocol", choices=["5", "3.1.1"], default="5", help="MQTT version (default 5)")
    parser.add_argument("--client-id", help="MQTT client id and reply topic level (default: the username as "
                                            "the reply topic level, connecting as USERNAME-<random>; else random)")
    parser.add_argument("--username", help="broker user name")
    parser.add_argument("--password-file", help="file whose first line is the broker password")
    parser.add_argument("--tls-ca", help="mqtts: CA certificate file (default: the system's)")
    parser.add_argument("--tls-cert", help="mqtts: client certificate")
    parser.add_argument("--tls-key", help="mqtts: client key")
    if request_arguments:
        add_request_arguments(parser)


def _ask_request(args: argparse.Namespace) -> dict[str, Any]:
    common: dict[str, Any] = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                  top_k=args.top_k, seed=args.seed, stop=list(args.stop) or None,
                                  deadline_ms=args.deadline_ms, cache_prompt=args.cache_prompt,
                                  count_tokens=True if args.count_tokens else None, **more_sampling(args))
    source = request_source(args)
    if source["mode"] == "infill" and not source["suffix_first"]:
        source["suffix_first"] = None  # the daemon's default order
    return {**source, **common}


def decode_speed(tokens_per_s: float | None) -> str:
    """The final reply's decode speed for the summary line (null: one token, nothing to time)."""
    return "decode speed n/a" if tokens_per_s is None else f"{tokens_per_s} tokens/s"


def drafted_note(accepted_draft_tokens: int | None) -> str:
    """', 12 of them confirmed drafts' for the summary line when prompt lookup kept any, else ''."""
    return f", {accepted_draft_tokens} of them confirmed drafts" if accepted_draft_tokens else ""


def client_from_args(args: argparse.Namespace) -> EdgeClient:
    """The (unconnected) EdgeClient of the connection flags; ValueError or OSError (an unreadable
    password file) for flags that cannot work."""
    tls_flags = [flag for flag, value in (("--tls-ca", args.tls_ca), ("--tls-cert", args.tls_cert),
                                          ("--tls-key", args.tls_key)) if value]
    if tls_flags and not args.broker.lower().startswith("mqtts://"):
        raise ValueError(f"{', '.join(tls_flags)} given, but --broker {args.broker} is a plain connection: TLS "
                         "needs an mqtts:// broker URL")
    if args.password_file and not args.username:
        raise ValueError("--password-file needs --username: without one the client would connect anonymously")
    password = read_password_file(args.password_file) if args.password_file else None
    return EdgeClient(args.broker, args.device_id, client_id=args.client_id, username=args.username,
                      password=password, tls_ca=args.tls_ca, tls_cert=args.tls_cert,
                      tls_key=args.tls_key, protocol=args.protocol)


def run_ask(args: argparse.Namespace) -> int:
    """`edge-runtime ask`: send one request, stream the text to stdout (or print the
    final reply as JSON with --json). Exit status 0; 1 on an error reply, a timeout
    or a connection failure (``error: <code>: <message>`` on stderr); 2 on bad flags."""
    try:
        request = _ask_request(args)
        client = client_from_args(args)
    except (ValueError, OSError) as exc:
        print(f"error: bad_request: {exc}", file=sys.stderr)
        return 2
    out = sys.stdout
    gen: Generation | None = None

    def failed(code: str, message: str) -> int:
        if args.json:  # scripts parse stdout: the error as the final reply it stands for
            reply = gen.final if gen is not None and gen.final is not None else \
                {"id": gen.id if gen is not None else None, "done": True,
                 "error": {"code": code, "message": message}}
            out.write(json.dumps(reply, ensure_ascii=False) + "\n")
            out.flush()
        elif gen is not None and gen.text:
            out.write("\n")
        print(f"error: {code}: {message}", file=sys.stderr)
        return 1

    try:
        with client:
            # chunks with --json too, printed or not: the timeout is for silence, not the whole answer
            gen = client.generate(timeout=args.timeout, **request)
            for chunk in gen:
                if not args.json:
                    out.write(chunk.get("delta", ""))
                    out.flush()
            final = gen.final or {}
    except RemoteError as exc:
        return failed(exc.code, exc.message)
    except TimeoutError as exc:
        return failed("timeout", str(exc))
    except BrokenPipeError:  # stdout closed (`ask ... | head`): the request was cancelled on the way out
        raise
    except (ConnectionError, OSError) as exc:
        return failed("connection", str(exc))
    if gen.stream_diverged and not args.json:
        return failed("stream_diverged", "the device generated this request again after a restart and the text "
                                         "streamed above is not its answer; `ask --json` prints the final reply")
    if args.json:
        out.write(json.dumps(final, ensure_ascii=False) + "\n")
    elif isinstance(final.get("count"), dict):
        count = final["count"]
        out.write(f"{count.get('prompt_tokens')} prompt tokens + max_tokens {count.get('max_tokens')} of the context "
                  f"limit {count.get('context_limit')}: {'fits' if count.get('fits') else 'does not fit'}\n")
    else:
        out.write("\n")
        usage, timings = final.get("usage") or {}, final.get("timings") or {}
        cached = f" ({usage['cached_prompt_tokens']} cached)" if usage.get("cached_prompt_tokens") else ""
        print(f"[{final.get('finish_reason')}; {usage.get('prompt_tokens')} prompt{cached} + "
              f"{usage.get('completion_tokens')} generated tokens{drafted_note(usage.get('accepted_draft_tokens'))}; ttft {timings.get('ttft_ms')} ms; "
              f"{decode_speed(timings.get('decode_tokens_per_s'))}]", file=sys.stderr)
        for warning in final.get("warnings") or ():
            print(f"warning: {warning}", file=sys.stderr)
    out.flush()
    return 0
