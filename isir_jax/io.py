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
import zipfile
from io import BytesIO
from typing import Any, Callable, Iterator, Optional, Sequence

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


# PNG grids show every image at least this many pixels high and wide (nearest-neighbour
# upscaling by an integer factor: 8x8 digits 4x, CIFAR-10's 32x32 as they are).
MIN_PNG_SIZE = 32


def png_scale(height: int, width: int) -> int:
  """The integer upscaling of `save_grid` for images of ``height`` x ``width``."""
  return max(1, MIN_PNG_SIZE // max(1, min(height, width)))


def save_grid(path: str, samples: np.ndarray, scale: Optional[int] = None) -> None:
  """Writes uint8 NHWC images as one PNG grid (`image_grid`), atomically.

  Args:
    path: the PNG file.
    samples: uint8 [N, H, W, C] images, C = 1 or 3.
    scale: nearest-neighbour upscaling of the grid (default: `png_scale`, so that small
      images stay readable).
  """
  scale = scale or png_scale(*samples.shape[1:3])
  grid = image_grid(samples)
  grid = np.repeat(np.repeat(grid, scale, axis=0), scale, axis=1)
  image = PIL.Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
  atomic_write(path, lambda f: image.save(f, format='PNG'))


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
  save_grid(os.path.join(workdir, f'samples_{k}.png'), samples)
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


def shard_paths(directory: str) -> list[str]:
  """The ``samples_{k}.npz`` files of a run directory, in shard order (k = 2 before 10)."""
  found = []
  for path in glob.glob(os.path.join(directory, 'samples_*.npz')):
    match = _SHARD_RE.search(os.path.basename(path))
    if match:
      found.append((int(match.group(1)), path))
  return [path for _, path in sorted(found)]


def complete_shards(workdir: str) -> list[int]:
  """The sorted indices of the shards whose npz file exists (written atomically)."""
  return [int(_SHARD_RE.search(os.path.basename(p)).group(1)) for p in shard_paths(workdir)]


def remove_temporaries(workdir: str) -> None:
  """Deletes the temporary files an interrupted run left behind in ``workdir``."""
  for path in glob.glob(os.path.join(workdir, '.tmp-*')):
    os.remove(path)


def iter_npz_images(source: str | Sequence[str], key: str = 'samples') -> Iterator[np.ndarray]:
  """Yields the uint8 images of ``samples_{k}.npz`` shards in shard order.

  Args:
    source: a directory (its `shard_paths`), one ``.npz`` file,
      or a list of files (taken in the given order).
    key: the array to read from each file.
  """
  if isinstance(source, str):
    paths = shard_paths(source) if os.path.isdir(source) else [source]
  else:
    paths = list(source)
  if not paths:
    raise FileNotFoundError(f'{source}: no samples_<k>.npz files found')
  for path in paths:
    with np.load(path) as data:
      if key not in data.files:
        raise ValueError(f'{path}: no {key!r} array (found {sorted(data.files)})')
      yield data[key]


def iter_image_files(source: str, batch_size: int = 250) -> Iterator[np.ndarray]:
  """Yields uint8 batches of the PNG/JPEG images of a folder or zip (EDM dataset layout).

  Files are taken in sorted path order, as EDM's ``ImageFolderDataset`` lists them.
  """
  exts = ('.png', '.jpg', '.jpeg', '.bmp', '.webp')
  if os.path.isdir(source):
    names = sorted(os.path.relpath(os.path.join(root, f), source)
                   for root, _, files in os.walk(source) for f in files if f.lower().endswith(exts))
    opener, archive = (lambda name: open(os.path.join(source, name), 'rb')), None
  elif zipfile.is_zipfile(source):
    archive = zipfile.ZipFile(source)
    names = sorted(n for n in archive.namelist() if n.lower().endswith(exts))
    opener = lambda name: BytesIO(archive.read(name))
  else:
    raise FileNotFoundError(f'{source}: not an image folder or zip')
  if not names:
    raise FileNotFoundError(f'{source}: no image files found')
  try:
    for start in range(0, len(names), batch_size):
      batch = []
      for name in names[start:start + batch_size]:
        with opener(name) as f:
          img = np.asarray(PIL.Image.open(f))
        batch.append(img[..., None] if img.ndim == 2 else img)
      yield np.stack(batch)
  finally:
    if archive is not None:
      archive.close()


def save_thresholds(path: str, thresholds: Sequence[np.ndarray],
                    log_ratios: Optional[np.ndarray] = None) -> None:
  """Writes DiffRS thresholds ``(log_ratio, increment)`` [n + 1] each, and optionally the
  warm-up log ratios [S, n + 1] they came from, to an npz file, atomically."""
  log_ratio, increment = thresholds
  arrays = dict(log_ratio=np.asarray(log_ratio), increment=np.asarray(increment))
  if log_ratios is not None:
    arrays['warmup_log_ratios'] = np.asarray(log_ratios)
  atomic_write(path, lambda f: np.savez(f, **arrays))


def load_thresholds(path: str) -> tuple[np.ndarray, np.ndarray]:
  """Reads ``(log_ratio, increment)`` written by `save_thresholds`."""
  with np.load(path) as f:
    missing = {'log_ratio', 'increment'} - set(f.files)
    if missing:
      raise ValueError(f'{path}: DiffRS thresholds lack {sorted(missing)} (has {sorted(f.files)})')
    return f['log_ratio'], f['increment']


def load_warmup_log_ratios(path: str) -> np.ndarray:
  """The warm-up log ratios [S, n + 1] stored beside a thresholds file."""
  with np.load(path) as f:
    if 'warmup_log_ratios' not in f.files:
      raise ValueError(f'{path}: no warm-up log ratios (has {sorted(f.files)})')
    return f['warmup_log_ratios']


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
