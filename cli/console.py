"""`inspectd console`: the operator console (a web process beside the workers), and its users.

`inspectd console` serves the pages on [console] host:port until stopped; `inspectd console add-user NAME
--role ROLE` adds a user to [console] users_file or replaces their role and password (read twice from the
terminal, or once from stdin with --password-stdin). Exit status: 0 done; 1 refused (a bad name, role or
password; the users file unreadable).
"""

from __future__ import annotations

import argparse
import getpass
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from daemon.config import Settings

ROLES = ("viewer", "operator", "admin")  # as console.users.ROLES, without importing the web stack to parse


def cmd_console(args: argparse.Namespace, settings: Settings) -> int:
    from console.app import serve

    cfg = settings.console
    print(f"inspectd console on http://{cfg.host}:{cfg.port} (users: {cfg.users_file})", file=sys.stderr)
    serve(settings)
    return 0


def cmd_add_user(args: argparse.Namespace, settings: Settings) -> int:
    from console.users import add_user

    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = getpass.getpass(f"password for {args.name}: ")
        if getpass.getpass("again: ") != password:
            raise ValueError("the two passwords differ")
    path = settings.console.users_file
    new = add_user(path, args.name, args.role, password)
    print(f"{'added' if new else 'updated'} {args.name} ({args.role}) in {path}", file=sys.stderr)
    return 0


def add_console_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "console",
        help="the operator console: line, cameras, review queue, versions, events (web pages)",
        description="Serve the operator console on [console] host:port (default 127.0.0.1:8090; put a "
        "TLS-terminating reverse proxy in front). Users and roles live in [console] users_file: add them "
        "with `inspectd console add-user`.",
    )
    p.set_defaults(handler=cmd_console)
    users = p.add_subparsers(dest="console_command", metavar="SUBCOMMAND")
    a = users.add_parser(
        "add-user",
        help="add a console user, or change their role and password",
        description="Store NAME with ROLE and an argon2 hash of the password in [console] users_file "
        "(viewer: sees the pages; operator: also confirms frames; admin: also activates and rolls back versions).",
    )
    a.add_argument("name", metavar="NAME")
    a.add_argument("--role", choices=ROLES, required=True)
    a.add_argument("--password-stdin", action="store_true", help="read the password from the first line of stdin")
    a.set_defaults(handler=cmd_add_user)
