"""`inspectd demo`: the command that runs the whole loop on one machine (lab/demo)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from cli.common import EXIT_ERROR, progress
from lab.demo.spec import DemoSpec

if TYPE_CHECKING:
    from daemon.config import Settings

EXIT_INTERRUPTED = 130
DEMO_USER = "demo"
DEMO_PASSWORD_BYTES = 12


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from lab.demo.run import run_demo

    defaults = DemoSpec()
    spec = DemoSpec(
        out=args.out,
        data=args.data,
        shift=args.shift,
        camera=args.camera,
        frames_before=args.frames_before,
        frames_after=args.frames_after,
        max_shifted=args.max_shifted,
        rate=args.rate,
        shots=args.shots,
        fresh=args.fresh,
        image_size=args.image_size or defaults.image_size,
        hidden_channels=args.hidden_channels or defaults.hidden_channels,
        epochs=args.epochs or defaults.epochs,
        config=args.config,
        person=args.console,
    )
    console = partial(console_beside, settings, spec.out, spec.camera) if args.console else None
    try:
        result = run_demo(spec, settings, lambda line: print(line, flush=True), progress, console)
    except KeyboardInterrupt:
        print("inspectd demo: interrupted; everything it started has been stopped", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0 if result.ok else EXIT_ERROR


@contextmanager
def console_beside(settings: Settings, out: Path, camera: str, redis_url: str, key_prefix: str) -> Iterator[str]:
    """The operator console on the demo's Redis, with a user made for this run only (a fresh password in
    OUT/console-users.json); yields the line that tells the person where to go and how to log in."""
    import secrets

    from pydantic import SecretStr

    from console.app import serving
    from console.users import add_user

    users = out / "console-users.json"
    users.unlink(missing_ok=True)
    password = secrets.token_urlsafe(DEMO_PASSWORD_BYTES)
    add_user(users, DEMO_USER, "admin", password)
    redis = settings.redis.model_copy(update={"url": SecretStr(redis_url), "url_file": "", "key_prefix": key_prefix})
    console = settings.console.model_copy(
        update={"users_file": str(users), "redis_url": SecretStr(""), "redis_url_file": ""}
    )
    with serving(settings.model_copy(update={"redis": redis, "console": console})) as url:
        yield (
            f"console: {url}/cameras/{camera} — log in as {DEMO_USER} with password {password} (this run only); "
            "when the drift alarm comes, select normal frames in the review queue and confirm them"
        )


def add_demo_parser(sub: argparse._SubParsersAction) -> None:
    d = DemoSpec()
    p = sub.add_parser(
        "demo",
        help="the whole loop on this machine: camera, worker, drift alarm, operator, adaptation, recovery",
        description="Start a local Kafka-protocol broker and Redis, train a model on ELPV (once; reused from "
        "OUT/model), run a worker and a simulated camera, switch a domain shift on, confirm a few normal frames "
        "as the operator when the drift alarm comes, and show the worker adapting and the line recovering. "
        "Writes OUT/summary.json and OUT/timeline.png; stops everything it started. Exit 0 when the line "
        "recovered (the adapted version served --frames-after frames with no drift alarm and rejects at most "
        f"{d.recovery_margin:.0%} more of the normal cells than before the shift), 1 otherwise, with what did "
        "not happen.",
    )
    p.add_argument("--out", type=Path, default=d.out, help=f"output folder (default {d.out})")
    p.add_argument("--data", type=Path, default=d.data, help=f"ELPV export, made if missing (default {d.data})")
    p.add_argument("--shift", default=d.shift, help=f"domain shift switched on (default {d.shift}; also style, ...)")
    p.add_argument("--camera", default=d.camera, help=f"camera id (default {d.camera})")
    p.add_argument("--frames-before", type=int, default=d.frames_before, help="frames before the shift")
    p.add_argument(
        "--frames-after", type=int, default=d.frames_after, help="frames scored by the adapted version before stopping"
    )
    p.add_argument("--max-shifted", type=int, default=d.max_shifted, help="shifted frames to wait for a drift alarm")
    p.add_argument("--rate", type=float, default=d.rate, help=f"frames per second (default {d.rate:g})")
    p.add_argument("--shots", type=int, help="frames the operator confirms (default [adapt] min_shots)")
    p.add_argument("--fresh", action="store_true", help="train the model again even if OUT/model matches")
    p.add_argument("--image-size", type=int, help=f"model input size (default {d.image_size})")
    p.add_argument("--hidden-channels", type=int, help=f"flow hidden channels (default {d.hidden_channels})")
    p.add_argument("--epochs", type=int, help=f"training epochs (default {d.epochs})")
    p.add_argument(
        "--console",
        action="store_true",
        help="start the operator console beside the worker and let you confirm the frames (prints its URL and a "
        f"one-time login; gives up {d.person_timeout_s:.0f} s after the alarm) instead of the simulated operator",
    )
    p.set_defaults(handler=cmd_demo)
