"""The GPU check script must be ready to run the moment a device is lent: device time is scarce
(minutes per task), so a script broken by a refactor of the benchmarks would waste it. Its smoke
mode runs the whole script, tiny sizes, on whatever device is here (the CPU in CI)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_script_runs_end_to_end_in_smoke_mode(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "OUT": str(tmp_path / "out"),
        "GPU_CHECK_SMOKE": "1",
        "HF_HUB_OFFLINE": "1",
    }
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "gpu-check.json").read_text())
    assert results["errors"] == []
    rows = {row["encoder"]: row for row in results["rows"]}
    assert set(rows) == {"open_clip:ViT-S-32:random", "efficientnet-lite0"}
    for row in rows.values():
        for key in (
            "floor_per_s",
            "end_to_end_gpu_decode_per_s",
            "end_to_end_cpu_decode_per_s",
            "naive_per_s",
            "feed_gpu_decode_per_s",
            "feed_cpu_decode_per_s",
            "decode_ms",
            "preprocess_ms",
            "header_ms",
        ):
            assert row[key] > 0, key
    table = (tmp_path / "out" / "gpu-check.md").read_text()
    assert "| efficientnet-lite0 |" in table and "Host stages" in table
    assert (tmp_path / "out" / "gpu-check.log").stat().st_size > 0
