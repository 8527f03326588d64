"""Sample shards on disk: ``samples_{k}.npz`` + ``samples_{k}.png``, atomic writes, resume.

The layout matches the reference tools: each shard ``samples_{k}.npz`` holds
``samples`` (uint8 NHWC, quantised as ``clip(x * 127.5 + 128, 0, 255)``, as the
reference saves images) and ``label`` (int class indices) when conditional, and
a PNG grid of the same images. Every file is written under a temporary name and
renamed into place, and the npz is written last, so an existing npz marks a
complete shard and an interrupted run can resume.
"""

import glob
import json
import math
import os
import re
import tempfile
from typing import Any, Callable, Iterator, Optional

import numpy as np
import PIL.Image

RUN_CONFIG_NAME = 'sampling_config.json'
_SHARD_RE = re.compile(r'^samples_(\d+)\.npz$')


def to_uint8(images: np.ndarray) -> np.ndarray:
  """Quantises EDM-scale images in [-1, 1] to uint8 as the reference saves them."""
  return np.clip(np.asarray(images, np.float64) * 127.5 + 128, 0, 255).astype(np.uint8)


def atomic_write(path: str, write: Callable[[Any], None]) -> None:
  """Calls ``write(file)`` on a temporary file beside ``path``, then renames it to ``path``."""
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(prefix='.tmp-', suffix=os.path.basename(path), dir=directory)
  try:
    with os.fdopen(fd, 'wb') as f:
      write(f)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def image_grid(samples: np.ndarray, padding: int = 2) -> np.ndarray:
  """Tiles uint8 NHWC images into one HWC grid, ``int(sqrt(n))`` images per row.

  Same layout as the reference's ``torchvision.utils.make_grid(..., nrow, padding=2)``:
  black borders of ``padding`` pixels around and between the images.
  """
  n, h, w, c = samples.shape
  ncol = max(1, int(math.sqrt(n)))
  nrow = math.ceil(n / ncol)
  grid = np.zeros((nrow * (h + padding) + padding, ncol * (w + padding) + padding, c),
                  np.uint8)
  for i, image in enumerate(samples):
    y = padding + (i // ncol) * (h + padding)
    x = padding + (i % ncol) * (w + padding)
    grid[y:y + h, x:x + w] = image
  return grid


def shard_path(workdir: str, k: int) -> str:
  """The path of shard ``k``'s npz file."""
  return os.path.join(workdir, f'samples_{k}.npz')


def write_shard(workdir: str, k: int, samples: np.ndarray,
                labels: Optional[np.ndarray] = None) -> str:
  """Writes shard ``k`` (PNG grid first, npz last), each file atomically.

  Args:
    workdir: the run directory.
    k: the shard index.
    samples: uint8 [N, H, W, C] images.
    labels: int [N] class indices, or None when unconditional.

  Returns:
    The path of the npz file.
  """
  if samples.dtype != np.uint8 or samples.ndim != 4:
    raise ValueError(f'shard {k}: samples must be uint8 NHWC, got {samples.dtype} '
                     f'{samples.shape}')
  grid = image_grid(samples)
  grid_image = PIL.Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
  atomic_write(os.path.join(workdir, f'samples_{k}.png'),
               lambda f: grid_image.save(f, format='PNG'))
  arrays = {'samples': samples}
  if labels is not None:
    arrays['label'] = np.asarray(labels, np.int64)
  path = shard_path(workdir, k)
  atomic_write(path, lambda f: np.savez_compressed(f, **arrays))
  return path


def read_shard(path: str) -> tuple[np.ndarray, Optional[np.ndarray]]:
  """Returns ``(samples, labels or None)`` of an npz shard."""
  with np.load(path) as data:
    return data['samples'], (data['label'] if 'label' in data else None)


def complete_shards(workdir: str) -> list[int]:
  """The sorted indices of the shards whose npz file exists (written atomically)."""
  found = []
  for path in glob.glob(os.path.join(workdir, 'samples_*.npz')):
    match = _SHARD_RE.search(os.path.basename(path))
    if match:
      found.append(int(match.group(1)))
  return sorted(found)


def remove_temporaries(workdir: str) -> None:
  """Deletes the temporary files an interrupted run left behind in ``workdir``."""
  for path in glob.glob(os.path.join(workdir, '.tmp-*')):
    os.remove(path)


def iter_shards(workdir: str) -> Iterator[tuple[int, np.ndarray, Optional[np.ndarray]]]:
  """Yields ``(k, samples, labels)`` for every complete shard, in shard order."""
  for k in complete_shards(workdir):
    yield (k,) + read_shard(shard_path(workdir, k))


def check_writable(workdir: str) -> None:
  """Creates ``workdir`` and checks that files can be written there.

  Raises:
    OSError: with a one-line message naming the directory.
  """
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.TemporaryFile(dir=workdir):
      pass
  except OSError as e:
    raise OSError(f'--workdir={workdir} is not writable: {e.strerror or e}') from None


def check_run_config(workdir: str, run_config: dict) -> bool:
  """Stores the sampling config in ``workdir``, or checks it equals the stored one.

  A workdir holds the shards of one sampling config: resuming into it with other
  settings would mix two sample sets.

  Args:
    workdir: the run directory.
    run_config: the JSON-serialisable settings that determine the samples.

  Returns:
    True when the workdir already held this config (a resumed run).

  Raises:
    ValueError: if the stored config differs; the message names the first differing keys.
  """
  path = os.path.join(workdir, RUN_CONFIG_NAME)
  canonical = json.loads(json.dumps(run_config))
  if not os.path.exists(path):
    text = json.dumps(canonical, indent=2, sort_keys=True)
    atomic_write(path, lambda f: f.write(text.encode()))
    return False
  with open(path) as f:
    stored = json.load(f)
  if stored != canonical:
    diff = sorted(_diff_keys(stored, canonical))
    raise ValueError(
        f'{path} was written by a different sampling config (differs at: '
        f'{", ".join(diff[:5])}); use a new --workdir or the same config')
  return True


def _diff_keys(a: Any, b: Any, prefix: str = '') -> Iterator[str]:
  """Yields the dotted keys where two nested dicts differ."""
  if isinstance(a, dict) and isinstance(b, dict):
    for key in set(a) | set(b):
      yield from _diff_keys(a.get(key), b.get(key), f'{prefix}{key}.')
  elif a != b:
    yield prefix.rstrip('.') or '<root>'
