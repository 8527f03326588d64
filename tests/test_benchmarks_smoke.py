"""Smoke test of benchmarks/speed.py: its code path on tiny networks (not a measurement).

Runs the script as users do, in a subprocess (its absl flags stay out of this process).
"""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _table_rows(text: str, first_cell: str) -> list[list[str]]:
  rows = [line.strip('|').split('|') for line in text.splitlines() if line.startswith('|')]
  return [[c.strip() for c in r] for r in rows if r[0].strip() == first_cell]


def test_tiny_run_writes_a_report(tmp_path):
  out = tmp_path / 'speed.md'
  cmd = [sys.executable, '-m', 'benchmarks.speed', '--tiny', '--sections=peak,denoiser',
         '--batch_sizes=2', '--repeats=2', '--matmul_size=64', f'--output={out}']
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                        env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert proc.returncode == 0, proc.stderr[-3000:]
  text = out.read_text()
  assert text.startswith('# Speed benchmark')
  assert '`python -m benchmarks.speed --tiny --sections=peak,denoiser' in text
  (row,) = _table_rows(text, '2')   # the batch-2 denoiser row
  img_per_s, gflop_per_img, reps = float(row[1]), float(row[4]), row[-1]
  assert img_per_s > 0 and gflop_per_img > 0
  assert reps == '2/2'              # JAX and matmul, interleaved, two rounds each
  (mm,) = _table_rows(text, 'jnp.dot')
  assert float(mm[1]) > 0
  assert 'JAX process peak RSS' in text
