"""Formatting of figures and gate results for the demo's live lines and summary."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from daemon.events import Event


def num(x: Any) -> str:
    return f"{x:.4g}" if isinstance(x, int | float) else "?"


def failed_reasons(event: Event) -> list[str]:
    return [r for r in event.detail.get("reasons", []) if not str(r).startswith("ok")]


def gate_line(detail: Mapping[str, Any]) -> str:
    f = detail.get("figures", {})
    a = detail.get("adaptation", {})
    parts = [
        f"held-out normals rejected {pct(f.get('parent_false_reject_rate'))} -> "
        f"{pct(f.get('candidate_false_reject_rate'))}",
        f"median score {num(f.get('parent_median'))} -> {num(f.get('candidate_median'))} "
        f"(threshold {num(f.get('threshold'))})",
        f"synthetic defects caught {pct(f.get('defect_detection_rate'))}",
        f"{a.get('steps', '?')} steps in {num(a.get('seconds'))} s",
    ]
    shadow, recalibration = f.get("shadow"), f.get("recalibration")
    if isinstance(shadow, dict) and "threshold" in shadow:
        parts.append(on_live_frames("shadow", shadow, "by the candidate at its own threshold"))
    if isinstance(recalibration, dict) and "threshold" in recalibration:
        parts.append(on_live_frames("recalibration", recalibration, "by the source version at the new threshold"))
    return ", ".join(parts)


def on_live_frames(name: str, figures: Mapping[str, Any], who: str) -> str:
    """A shadow's (or a recalibration's) flag rates on the live frames: the source's, then the new one's."""
    return (
        f"{name} on {figures.get('frames_seen')} live frames: flagged {pct(figures.get('parent_flag_rate'))} by "
        f"the source version, {pct(figures.get('candidate_flag_rate'))} {who} {num(figures.get('threshold'))}"
    )


def pct(x: Any) -> str:
    return f"{x:.0%}" if isinstance(x, int | float) else "?"
