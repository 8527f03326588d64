"""Client of the PyTorch reference worker (`benchmarks/reference_worker.py`)."""

import json
import os
import subprocess
from typing import Optional

import numpy as np


class Reference:
  """Client of `benchmarks/reference_worker.py`: one JSON request and reply per line."""

  def __init__(self, python: str, edm_checkout: str, seed_checkout: Optional[str],
               threads: int, workdir: str):
    self.python, self.workdir = python, workdir
    self.has_seed = bool(seed_checkout)
    worker = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          'reference_worker.py')
    cmd = [python, worker, f'--edm_checkout={edm_checkout}', f'--threads={threads}']
    if seed_checkout:
      cmd.append(f'--seed_checkout={seed_checkout}')
    self.log_path = os.path.join(workdir, 'reference_worker.log')
    self.log = open(self.log_path, 'w')
    # Passive OpenMP waiting: idle torch threads must not spin while JAX runs.
    env = dict(os.environ, OMP_WAIT_POLICY='PASSIVE')
    self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=self.log, text=True, env=env)
    self.info = self.request('info')

  def request(self, op: str, **kwargs) -> dict:
    self.proc.stdin.write(json.dumps(dict(kwargs, op=op)) + '\n')
    self.proc.stdin.flush()
    line = self.proc.stdout.readline()
    if not line:
      self.log.flush()
      with open(self.log_path) as f:
        tail = f.read()[-2000:]
      raise RuntimeError(f'reference worker exited (--reference_python='
                         f'{self.python}); its log ends:\n{tail}')
    reply = json.loads(line)
    if 'error' in reply:
      raise RuntimeError(f'reference worker, op {op!r}: {reply["error"]}')
    self.maxrss_mb = reply.get('maxrss_mb', float('nan'))
    return reply

  def array(self, name: str, value) -> str:
    path = os.path.join(self.workdir, f'{name}.npy')
    np.save(path, np.asarray(value))
    return path

  def close(self):
    self.proc.stdin.close()
    self.proc.wait(timeout=60)
    self.log.close()
