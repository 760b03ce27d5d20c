"""`inspectd confirm` and `inspectd review`: operator confirmations for people without their own HMI.

`review` lists the recent frames worth confirming (during a drift alarm: normal parts flagged anomalous)
with their scores; `confirm` appends one confirmation per frame to the stream that the workers handle.
Exit status: 0 done; 1 Redis unreachable; 2 a malformed confirmation (the message names the argument).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

import redis

if TYPE_CHECKING:
    from daemon.config import Settings
    from daemon.store import Keys

EXIT_USAGE = 2  # as argparse's
ARGUMENT = {"frame_id": "FRAME_ID", "operator": "--operator", "note": "--note"}

Command = Callable[[argparse.Namespace, "Settings", redis.Redis, "Keys"], int]


def _with_redis(command: Command) -> Callable[[argparse.Namespace, Settings], int]:
    """Run `command` with a Redis client; an unreachable Redis becomes the CLI's ordinary error (exit 1)."""

    def run(args: argparse.Namespace, settings: Settings) -> int:
        from daemon.store import Keys

        client = settings.redis.client()
        try:
            return command(args, settings, client, Keys(settings.redis.key_prefix))
        except redis.RedisError as exc:
            raise RuntimeError(f"Redis: {exc}") from exc
        finally:
            client.close()

    return run


def cmd_confirm(args: argparse.Namespace, settings: Settings, client: redis.Redis, keys: Keys) -> int:
    from daemon.confirmations import InvalidConfirmation, normal_entry, submit, validate

    cfg = settings.confirmations
    frame_ids = list(dict.fromkeys(args.frame_ids))
    entries = [normal_entry(frame_id, args.operator, args.note) for frame_id in frame_ids]
    try:  # all checked before any is sent: a typo never leaves half the frames confirmed
        for entry in entries:
            validate(entry, cfg)
    except InvalidConfirmation as exc:
        print(f"inspectd: argument {ARGUMENT[exc.field]}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    pipe = client.pipeline(transaction=False)
    for frame_id in frame_ids:
        pipe.exists(keys.frame(frame_id))
    for frame_id, cached in zip(frame_ids, pipe.execute(), strict=True):
        if not cached:
            print(
                f"inspectd: warning: frame {frame_id} is not cached (unknown, not kept by the cache policy, or"
                " expired): it will be rejected",
                file=sys.stderr,
            )
    for entry in entries:
        print(f"{submit(client, keys, cfg, entry)}\t{entry['frame_id']}")
    return 0


def cmd_review(args: argparse.Namespace, settings: Settings, client: redis.Redis, keys: Keys) -> int:
    from daemon.confirmations import AdaptationBuffer, recent_verdicts, review_queue

    recent = recent_verdicts(client, keys, args.window)
    if args.camera:
        recent = [v for v in recent if v["camera_id"] == args.camera]
    cameras = sorted({v["camera_id"] for v in recent})
    queue = review_queue(client, keys, recent, args.camera, args.limit, include_normal=args.all)
    shown = ("frame_id", "camera_id", "score", "threshold", "anomalous", "model_version")
    rows = [{**{k: getattr(r.verdict, k) for k in shown}, "cached": r.cached, "buffered": r.buffered} for r in queue]
    buffer = AdaptationBuffer(client, keys)
    buffers = {camera: buffer.size(camera) for camera in cameras}
    if args.json:
        print(
            json.dumps(
                {"frames": rows, "buffers": buffers, "buffer_max_frames": settings.confirmations.buffer_max_frames},
                indent=2,
            )
        )
        return 0
    which = "verdicts" if args.all else "frames above their threshold"
    print(f"{len(rows)} {which} among the last {args.window} verdicts" + (f" of {args.camera}" if args.camera else ""))
    if rows:
        print("FRAME_ID\tCAMERA\tSCORE\tTHRESHOLD\tVERDICT\tMODEL\tCACHED\tBUFFERED")
    for r in rows:
        print(
            f"{r['frame_id']}\t{r['camera_id']}\t{r['score']:.4f}\t{r['threshold']:.4f}\t"
            f"{'ANOMALOUS' if r['anomalous'] else 'normal'}\t{r['model_version']}\t"
            f"{'yes' if r['cached'] else 'no'}\t{'yes' if r['buffered'] else 'no'}"
        )
    limit = settings.confirmations.buffer_max_frames
    print("adaptation buffers: " + (", ".join(f"{c} {n}/{limit}" for c, n in buffers.items()) or "no cameras"))
    return 0


def add_operator_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "confirm",
        help="confirm frames as normal for their camera's adaptation buffer",
        description="Append one confirmation per frame to the Redis confirmations stream; a worker copies the "
        "cached frame into its camera's adaptation buffer or records the entry as rejected, with a reason. "
        "Prints the entry ids. Exit 2 on a malformed confirmation.",
    )
    p.add_argument("frame_ids", nargs="+", metavar="FRAME_ID")
    p.add_argument("--operator", required=True, help="who confirms (recorded with each frame)")
    p.add_argument("--note", default="", help="free text kept with the confirmation")
    p.set_defaults(handler=_with_redis(cmd_confirm))

    p = sub.add_parser(
        "review",
        help="recent frames worth confirming, most suspicious first",
        description="The highest-scoring frames above their threshold among the recent verdicts, whether each "
        "is still cached (confirmable) or already buffered, and each camera's adaptation buffer size.",
    )
    p.add_argument("--camera", help="only this camera")
    p.add_argument("--limit", type=int, default=20, help="frames to list")
    p.add_argument("--window", type=int, default=1000, help="recent verdicts to look through")
    p.add_argument("--all", action="store_true", help="list frames below their threshold too")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(handler=_with_redis(cmd_review))
