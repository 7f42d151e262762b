"""The examples run end to end (small sizes) and do what they claim."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_denoise_example_improves_psnr(tmp_path):
    out = tmp_path / "fig.png"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "denoise_image.py"), "--size", "96",
         "--out", str(out)],
        capture_output=True, text=True, check=True, timeout=600,
    )
    m = re.search(r"noisy PSNR ([\d.]+) dB -> denoised PSNR ([\d.]+) dB", proc.stdout)
    assert m, proc.stdout
    before, after = map(float, m.groups())
    assert after > before + 5.0
    assert out.stat().st_size > 10_000
