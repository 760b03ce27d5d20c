"""Argument and configuration errors answer at once: the model stack (torch, timm) is imported only by the
commands that use it. Checked on the modules a fresh interpreter loaded (deterministic), timed for the record."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROBE = """
import json, sys
from cli.main import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:  # argparse's usage errors
    code = exc.code
print(json.dumps({"code": code, "heavy": sorted(m for m in ("torch", "timm", "FrEIA") if m in sys.modules)}))
"""


def probe(*argv: str) -> tuple[dict, str, float]:
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", PROBE, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
    elapsed = time.perf_counter() - t0
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr, elapsed


@pytest.mark.parametrize(
    "argv, code, message",
    [
        (["train"], 2, "the following arguments are required: --data"),
        (["no-such-command"], 2, "invalid choice"),
        (["models", "activate"], 2, "the following arguments are required: VERSION"),
        (["--config", "BAD", "score", "--model", "m", "x.png"], 2, "hidden_chanels"),
        # an option the worker cannot serve: refused at once, not after a model appears
        (["--config", "FOLD", "run"], 2, "fold_batch_norm = true"),
    ],
)
def test_usage_and_config_errors_do_not_load_the_model_stack(
    argv: list[str], code: int, message: str, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[flow]\nhidden_chanels = 8\n")  # a typo: unknown key
    fold = tmp_path / "fold.toml"
    fold.write_text(f"[model]\nfold_batch_norm = true\n[worker]\nmodel_dir = '{tmp_path / 'none'}'\n")
    argv = [{"BAD": str(bad), "FOLD": str(fold)}.get(a, a) for a in argv]
    result, stderr, elapsed = probe(*argv)
    print(f"{' '.join(argv[:2])}: exit {result['code']} in {elapsed:.2f} s")
    assert result["code"] == code and message in stderr, stderr
    assert result["heavy"] == [], f"loaded {result['heavy']} to answer a usage or config error"


def test_a_command_that_needs_the_model_stack_still_loads_it(tmp_path: Path) -> None:
    """The probe can say no: scoring a missing model imports torch before failing on the model."""
    result, stderr, _ = probe("score", "--model", str(tmp_path / "none"), str(tmp_path / "x.png"))
    assert result["code"] == 1 and "torch" in result["heavy"], stderr
