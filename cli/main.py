"""The `inspectd` entry point: parse the command line, load the settings, run the command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from cli.common import EXIT_CONFIG, EXIT_ERROR, USER_ERRORS
from cli.console import add_console_parser
from cli.demo import add_demo_parser
from cli.model import add_model_parsers
from cli.models import add_models_parser
from cli.operator import add_operator_parsers
from cli.stream import add_stream_parsers
from daemon.config import ConfigError, Settings, load_settings
from daemon.logs import configure_logging


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="inspectd", description="Streaming, drift-aware visual inspection.")
    parser.add_argument("--config", help="settings file (default: $INSPECTD_CONFIG or ./config.toml)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_model_parsers(sub)
    add_stream_parsers(sub)
    add_models_parser(sub)
    add_operator_parsers(sub)
    add_demo_parser(sub)
    add_console_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"inspectd: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    configure_logging(settings.log.level, settings.log.format)
    handler: Callable[[argparse.Namespace, Settings], int] = args.handler
    try:
        return handler(args, settings)
    except ConfigError as exc:
        print(f"inspectd: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except USER_ERRORS as exc:
        print(f"inspectd: error: {exc}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
