"""MONAI Label serves the exported cond_ddpm bundle: a real server, one /infer call (scripts/monailabel_check.py).

Installs MONAI Label into its own virtual environment on first use (about 3 minutes, a few GB); set
MONAILABEL_VENV to reuse one. Run alone: ``pytest -m integration``.
"""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

# also `slow`: CI's `-m "not slow"` leaves it out (minutes and a large install)
pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_monailabel_infers_the_anomaly_segmentation(tmp_path):
    venv = os.environ.get("MONAILABEL_VENV", str(tmp_path / "venv"))
    command = [sys.executable, str(REPO / "scripts" / "monailabel_check.py"), "--workdir", str(tmp_path),
               "--venv", venv, "--port", os.environ.get("MONAILABEL_PORT", "8765")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    report = json.loads((tmp_path / "report.json").read_text())
    check = report["check"]
    assert report["status"] == 200 and check["problems"] == []
    assert check["label_shape"] == check["input_shape"] and check["label_spacing"] == check["input_spacing"]
    assert report["info"]["labels"] == {"anomaly": 1}
