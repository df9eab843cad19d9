"""What a plain (non-editable) install gets: the wheel must carry the model-card templates
and the report schema, or ``repair --output`` fails outside a checkout."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_wheel_carries_the_card_templates_and_the_schema(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-v", "-w", str(tmp_path), str(ROOT)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = tmp_path.glob("otbr_hub-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    templates = {p.name for p in (ROOT / "cards").glob("*.md")}
    assert templates and {f"otbr_hub/cards/{t}" for t in templates} <= names
    assert "otbr_hub/schemas/scan-report.schema.json" in names
    # setuptools warns (and may one day stop shipping) data folders that are not declared packages
    assert "absent from the `packages` configuration" not in proc.stdout + proc.stderr
