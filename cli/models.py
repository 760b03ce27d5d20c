"""`inspectd models ...`: publish, list, show, activate and roll back versions in the Redis model registry.

Exit status: 0 done; 1 refused or failed (message on stderr: nothing to roll back, a tampered or
unregistered parent, Redis unreachable); 2 a version that is not registered, or a bad combination of flags.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from daemon.scopes import DEFAULT_SCOPE

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
        print(f"{r['version']}  {r['kind']:<7}  parent {parent:<20}  {r['domain']}  {r['created_at']}{active}")
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
    print(_describe(registry.activate(args.scope, args.version), args.scope, args.version))
    return 0


def models_rollback(args: argparse.Namespace, registry: ModelRegistry) -> int:
    change = registry.rollback(args.scope)
    print(f"scope {change.scope} rolled back from {change.previous} to {change.version}")
    return 0


def models_publish(args: argparse.Namespace, registry: ModelRegistry) -> int:
    from csflow.artifacts import read_manifest

    if args.scope is not None and not args.activate:
        print("inspectd: publish --scope needs --activate", file=sys.stderr)
        return EXIT_USAGE
    new = not registry.registered(read_manifest(args.dir).version)
    manifest = registry.publish(args.dir)
    what = f"adapted from {manifest.parent}" if manifest.parent else f"base at {registry.base_path(manifest.version)}"
    print(f"{'published' if new else 'already registered:'} {manifest.version} ({what})")
    if args.activate:
        scope = args.scope or DEFAULT_SCOPE
        print(_describe(registry.activate(scope, manifest.version), scope, manifest.version))
    return 0


def add_models_parser(sub: argparse._SubParsersAction) -> None:
    """Register `inspectd models` and its actions on the main parser's subcommands."""
    models = sub.add_parser(
        "models",
        help="the model registry in Redis: publish, list, show, activate, roll back",
        description="Versions published here travel to every worker: adapted versions as blobs, base versions "
        "by their path on the shared volume. A scope is a camera id, a line ([registry] lines) or 'default'. "
        "Exit 2 when a version is not registered.",
    )
    models.set_defaults(handler=cmd_models)
    actions = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    scope_help = f"camera id, line or '{DEFAULT_SCOPE}' (default: {DEFAULT_SCOPE})"

    p = actions.add_parser("list", help="registered versions and where they are active")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(action=models_list)

    p = actions.add_parser("show", help="a version's manifest, base path and active scopes, as JSON")
    p.add_argument("version", metavar="VERSION")
    p.set_defaults(action=models_show)

    p = actions.add_parser("activate", help="make a version active in a scope (atomic; workers follow)")
    p.add_argument("version", metavar="VERSION")
    p.add_argument("--scope", default=DEFAULT_SCOPE, help=scope_help)
    p.set_defaults(action=models_activate)

    p = actions.add_parser("rollback", help="make the previously active version active again in a scope")
    p.add_argument("--scope", default=DEFAULT_SCOPE, help=scope_help)
    p.set_defaults(action=models_rollback)

    p = actions.add_parser(
        "publish",
        help="register a version directory (its parent must be registered)",
        description="Publishing again is harmless. A base version is registered by its absolute path, which "
        "must be where workers mount the shared volume.",
    )
    p.add_argument("dir", type=Path, metavar="DIR", help="version directory (manifest.json + tensors)")
    p.add_argument("--activate", action="store_true", help="then make it active in --scope")
    p.add_argument("--scope", help=scope_help)
    p.set_defaults(action=models_publish)
