"""`inspectd models ...`: publish, list, show, activate, roll back and unpin versions in the Redis registry.

A scope is named by its type: `--camera ID`, `--line NAME`, `--default`, or `--scope camera:ID | line:NAME |
default`; a bare name is refused (a camera called `default`, or named like a line, must not reach the
plant or the line by accident).

A worker keeps a candidate that its shadow refused: published, never activated by itself, marked refused in
`list` and with the failed checks in `show`; `activate --force` activates it (without it, the activation is
refused and says so).

Exit status: 0 done; 1 refused or failed (message on stderr: nothing to roll back or unpin, a tampered or
unregistered parent, a refused version without --force, Redis unreachable); 2 a version that is not
registered, a scope that is not typed, or a bad combination of flags.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from daemon.scopes import DEFAULT_SCOPE, ScopeError, camera_scope, check_scope, line_scope

if TYPE_CHECKING:
    from daemon.config import Settings
    from daemon.registry import Announcement, ModelRegistry

EXIT_USAGE = 2  # as argparse's: the command names an unregistered version or combines flags wrongly

Action = Callable[[argparse.Namespace, "ModelRegistry"], int]


def cmd_models(args: argparse.Namespace, settings: Settings) -> int:
    import redis

    from daemon.registry import ModelRegistry, RegistryError, UnknownVersionError

    client = settings.redis.client()
    action: Action = args.action
    try:
        return action(args, ModelRegistry.from_settings(client, settings))
    except UnknownVersionError as exc:
        print(f"inspectd: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except redis.RedisError as exc:
        raise RegistryError(f"Redis: {exc}") from exc
    finally:
        client.close()


def _describe(change: Announcement | None, scope: str, version: str) -> str:
    if change is None:
        return f"{version} was already active in scope {scope}"
    was = f"(was {change.previous})" if change.previous else "(it had none)"
    return f"{change.version} is now active in scope {change.scope} {was}"


def models_list(args: argparse.Namespace, registry: ModelRegistry) -> int:
    from daemon.registry import refused_checks

    actives = registry.actives()
    rows = []
    for version in registry.versions():
        m = registry.manifest(version)
        rows.append(
            {
                "version": version,
                "kind": "adapted" if m.parent else "base",
                "parent": m.parent,
                "domain": m.domain,
                "created_at": m.created_at,
                "refused": bool(refused_checks(m)),
                "active_in": [scope for scope, v in actives.items() if v == version],
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no versions registered")
    for r in rows:
        active = f"  active in: {', '.join(r['active_in'])}" if r["active_in"] else ""
        parent = r["parent"] or "-"
        refused = "  refused by the gate" if r["refused"] else ""
        print(f"{r['version']}  {r['kind']:<7}  parent {parent:<20}  {r['domain']}  {r['created_at']}{refused}{active}")
    return 0


def models_show(args: argparse.Namespace, registry: ModelRegistry) -> int:
    manifest = registry.manifest(args.version)
    path = registry.base_path(args.version)
    actives = registry.actives()
    report = {
        "manifest": asdict(manifest),
        "path": None if path is None else str(path),
        "active_in": [scope for scope, v in actives.items() if v == args.version],
    }
    print(json.dumps(report, indent=2))
    return 0


def models_activate(args: argparse.Namespace, registry: ModelRegistry) -> int:
    scope = args.scope or DEFAULT_SCOPE
    print(_describe(registry.activate(scope, args.version, force=args.force), scope, args.version))
    return 0


def models_rollback(args: argparse.Namespace, registry: ModelRegistry) -> int:
    change = registry.rollback(args.scope or DEFAULT_SCOPE)
    now = change.version or "nothing of its own (it falls back again)"
    print(f"scope {change.scope} rolled back from {change.previous or 'nothing of its own'} to {now}")
    return 0


def models_unpin(args: argparse.Namespace, registry: ModelRegistry) -> int:
    change = registry.unpin(camera_scope(args.camera))
    chain = registry.scopes(args.camera)
    pointers = {scope: registry.active_in(scope) for scope in chain[1:]}
    source = next((scope for scope in chain[1:] if pointers[scope] is not None), None)
    serves = f"{pointers[source]} from scope {source}" if source else "no registry version (the worker's model_dir)"
    print(f"scope {change.scope} unpinned (was {change.previous}); camera {args.camera} now serves {serves}")
    return 0


def models_publish(args: argparse.Namespace, registry: ModelRegistry) -> int:
    from csflow.artifacts import read_manifest

    if args.scope is not None and not args.activate:
        print("inspectd: publish with a scope (--camera, --line, --default, --scope) needs --activate", file=sys.stderr)
        return EXIT_USAGE
    new = not registry.registered(read_manifest(args.dir).version)
    manifest = registry.publish(args.dir)
    what = f"adapted from {manifest.parent}" if manifest.parent else f"base at {registry.base_path(manifest.version)}"
    print(f"{'published' if new else 'already registered:'} {manifest.version} ({what})")
    if args.activate:
        scope = args.scope or DEFAULT_SCOPE
        print(_describe(registry.activate(scope, manifest.version, force=args.force), scope, manifest.version))
    return 0


def _typed(make: Callable[[str], str]) -> Callable[[str], str]:
    """An argparse type: the scope `make` builds from the flag's value, or a usage error (exit 2) saying why."""

    def parse(text: str) -> str:
        try:
            return make(text)
        except ScopeError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from exc

    return parse


def _camera_id(text: str) -> str:
    camera_scope(text)  # the same check as the scope's name
    return text


def _add_scope(parser: argparse.ArgumentParser, what: str) -> None:
    """--camera ID | --line NAME | --default | --scope TYPED, one at most, into `args.scope` (None: none given)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--camera", dest="scope", type=_typed(camera_scope), metavar="ID", help=f"{what} one camera")
    group.add_argument("--line", dest="scope", type=_typed(line_scope), metavar="NAME", help=f"{what} a line")
    group.add_argument(
        "--default", dest="scope", action="store_const", const=DEFAULT_SCOPE, help=f"{what} the default scope"
    )
    group.add_argument(
        "--scope",
        dest="scope",
        type=_typed(check_scope),
        metavar="SCOPE",
        help="a typed scope: camera:ID, line:NAME or default",
    )


def _add_force(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--force",
        action="store_true",
        help="activate a version that the adaptation gate refused (a worker keeps those it refused in shadow; "
        "read `models show VERSION` first)",
    )


def add_models_parser(sub: argparse._SubParsersAction) -> None:
    """Register `inspectd models` and its actions on the main parser's subcommands."""
    models = sub.add_parser(
        "models",
        help="the model registry in Redis: publish, list, show, activate, roll back",
        description="Versions published here travel to every worker: adapted versions as blobs, base versions "
        "by their path on the shared volume. A scope is typed: camera:ID, line:NAME ([registry] lines) or "
        "default; a camera serves its own version, else its line's, else the default's. "
        "Exit 2 when a version is not registered or a scope is not typed.",
    )
    models.set_defaults(handler=cmd_models)
    actions = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    p = actions.add_parser("list", help="registered versions and where they are active")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(action=models_list)

    p = actions.add_parser("show", help="a version's manifest, base path and active scopes, as JSON")
    p.add_argument("version", metavar="VERSION")
    p.set_defaults(action=models_show)

    p = actions.add_parser(
        "activate",
        help="make a version active in a scope (atomic; workers follow)",
        description="Without a scope flag: the default scope.",
    )
    p.add_argument("version", metavar="VERSION")
    _add_scope(p, "activate it for")
    _add_force(p)
    p.set_defaults(action=models_activate)

    p = actions.add_parser(
        "rollback",
        help="make the previously active version active again in a scope",
        description="Without a scope flag: the default scope. Rolling back an unpin pins the camera again.",
    )
    _add_scope(p, "roll back")
    p.set_defaults(action=models_rollback)

    p = actions.add_parser(
        "unpin",
        help="remove a camera's own version, so that it serves its line's or the default's again",
        description="Recorded in the camera scope's history (a rollback pins it again) and as an event, and "
        "announced: workers re-resolve the camera between batches.",
    )
    p.add_argument("camera", type=_typed(_camera_id), metavar="CAMERA", help="the camera id")
    p.set_defaults(action=models_unpin)

    p = actions.add_parser(
        "publish",
        help="register a version directory (its parent must be registered)",
        description="Publishing again is harmless. A base version is registered by its absolute path, which "
        "must be where workers mount the shared volume.",
    )
    p.add_argument("dir", type=Path, metavar="DIR", help="version directory (manifest.json + tensors)")
    p.add_argument("--activate", action="store_true", help="then make it active (default scope unless a scope flag)")
    _add_scope(p, "with --activate: activate it for")
    _add_force(p)
    p.set_defaults(action=models_publish)
