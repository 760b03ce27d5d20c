"""The console's writes: confirmations and registry changes, each checked whole before anything is written."""

from __future__ import annotations

import json
from collections.abc import Sequence

import redis

from daemon.config import Settings
from daemon.confirmations import InvalidConfirmation, normal_entry, submit_all, validate
from daemon.events import EventLog
from daemon.store import Keys

MAX_FRAME_ID_CHARS = 256


class Refused(ValueError):
    """A request the console will not carry out; `status` is the HTTP status, the message says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _listed(ids: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(ids[:limit])
    return shown + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


def confirm_frames(
    client: redis.Redis, settings: Settings, camera: str, frame_ids: Sequence[str], note: str, operator: str
) -> list[str]:
    """Confirm frames of `camera` as normal on behalf of the logged-in `operator`; returns the entry ids.
    Every frame must have a verdict of this camera and still be cached: one bad frame refuses them all."""
    keys = Keys(settings.redis.key_prefix)
    ids = list(dict.fromkeys(frame_ids))
    if not ids:
        raise Refused(400, "no frame selected")
    limit = settings.console.max_confirm_frames
    if len(ids) > limit:
        raise Refused(400, f"{len(ids)} frames selected; at most {limit} per confirmation")
    too_long = [i for i in ids if len(i) > MAX_FRAME_ID_CHARS or not i.isprintable()]
    if too_long:
        raise Refused(400, f"malformed frame id(s): {len(too_long)}")
    entries = [normal_entry(frame_id, operator, note) for frame_id in ids]
    try:
        for entry in entries:
            validate(entry, settings.confirmations)
    except InvalidConfirmation as exc:
        raise Refused(400, f"{exc.field}: {exc}") from exc
    pipe = client.pipeline(transaction=False)
    for frame_id in ids:
        pipe.get(keys.verdict(frame_id))
        pipe.exists(keys.frame(frame_id))
    found = pipe.execute()
    unknown, elsewhere, expired = [], [], []
    for i, frame_id in enumerate(ids):
        raw, cached = found[2 * i], found[2 * i + 1]
        if raw is None:
            unknown.append(frame_id)
        elif _camera_of(raw) != camera:
            elsewhere.append(frame_id)
        elif not cached:
            expired.append(frame_id)
    problems = []
    if unknown:
        problems.append(f"unknown frame(s) (no verdict): {_listed(unknown)}")
    if elsewhere:
        problems.append(f"frame(s) of another camera than {camera}: {_listed(elsewhere)}")
    if expired:
        problems.append(f"frame(s) no longer cached: {_listed(expired)}")
    if problems:
        raise Refused(400, "nothing confirmed: " + "; ".join(problems))
    events = EventLog(client, keys, settings.redis.events_max_len)
    return submit_all(client, keys, settings.confirmations, entries, events, camera)


def _camera_of(raw: bytes) -> str | None:
    try:
        return str(json.loads(raw)["camera_id"])
    except (ValueError, KeyError, TypeError):
        return None
