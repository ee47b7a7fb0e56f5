"""Runs the real `EdgeService` with a `FakeEngine` as a separate process, so
tests can SIGTERM and SIGKILL a daemon.

    python fake_daemon.py --config FILE.toml [--token-delay S] [--calls-file PATH]
    python fake_daemon.py --config FILE.toml --run-serve [serve flags...]

Prints nothing; the tests watch the retained status topic and the broker.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fake_engine import FakeEngine  # noqa: E402

from edge_runtime.config import load_config  # noqa: E402
from edge_runtime.service import EdgeService  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--token-delay", type=float, default=0.0)
    parser.add_argument("--calls-file")
    parser.add_argument("--run-serve", action="store_true",
                        help="go through edge_runtime.cli.cmd_serve (the CLI's path)")
    args, rest = parser.parse_known_args()
    if args.run_serve:
        from edge_runtime.cli import cmd_serve as run_serve
        from edge_runtime.serve_flags import add_serve_arguments

        serve_parser = argparse.ArgumentParser()
        add_serve_arguments(serve_parser)
        serve_args = serve_parser.parse_args(["--config", args.config, *rest])
        logging.basicConfig(stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")  # as cli.main does
        return run_serve(serve_args, lambda bundle, profile: FakeEngine(
            token_delay_s=args.token_delay, calls_file=args.calls_file))
    config = load_config(args.config, check_files=False)
    logging.basicConfig(level=config.service.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(threadName)s %(name)s: %(message)s")
    engine = FakeEngine(token_delay_s=args.token_delay, calls_file=args.calls_file)
    EdgeService(config, engine, status_interval_s=0.2).run_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
