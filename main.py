"""Samples and scores EDM / DG / DiffRS / ISIR runs from a config file.

This file is intentionally kept short: the logic is in ``isir_jax.run_lib``
(and the samplers, ``isir_jax.parallel``, ``isir_jax.io``, ``isir_jax.fid``), where
it can be tested. Examples::

  python main.py                                     # the bundled digits demo (configs/digits.py)
  python main.py --config=configs/cifar10.py:isir --workdir=workdir/cifar10-isir
  python main.py --config=configs/cifar10.py:isir --workdir=workdir/cifar10-isir --mode=eval
  python main.py --config=configs/cifar10.py:dg,cond --config.sample.num_samples=10000
"""

import logging as py_logging
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from isir_jax import demo
from isir_jax import parallel
from isir_jax import run_lib
from isir_jax.train import trainers

# Mode name -> run_lib function (config, workdir) -> None.
MODES = {
    'sample': run_lib.sample,
    'fid_stats': run_lib.fid_stats,
    'eval': run_lib.evaluate,
    # The bundled digits (configs/digits.py): demo table, its assets and their training.
    'demo': demo.demo,
    'diffrs_thresholds': demo.diffrs_thresholds,
    'train_feature_net': trainers.train_feature_net,
    'train_denoiser': trainers.train_denoiser,
    'train_classifier': trainers.train_classifier,
    'train_discriminator': trainers.train_discriminator,
}

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                               'configs', 'digits.py')

_CONFIG = config_flags.DEFINE_config_file(
    'config', _DEFAULT_CONFIG, 'Experiment config file (configs/<data set>.py:<method>[,flags]).',
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Run directory for samples and scores [default: workdir/<config.name>].')
_MODE = flags.DEFINE_enum('mode', None, list(MODES), 'What to run [default: config.mode].')

# Where the project's own log lines come from: this file and the package (which may be
# installed elsewhere). Not the checkout's root, which may hold the virtual environment.
_PROJECT_FILE = os.path.abspath(__file__)
_PROJECT_DIR = os.path.dirname(os.path.abspath(run_lib.__file__)) + os.sep


class _ProjectInfo(py_logging.Filter):
  """Keeps the project's INFO lines and every library's warnings: orbax and XLA's backend
  probing log at INFO what a user of the driver need not read (``--verbosity=0`` shows all)."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    return (record.levelno >= py_logging.WARNING or record.pathname == _PROJECT_FILE or
            record.pathname.startswith(_PROJECT_DIR))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  config = _CONFIG.value
  mode = _MODE.value or config.mode
  if not flags.FLAGS['verbosity'].present:
    if mode == 'demo':
      logging.set_verbosity(logging.WARNING)   # the demo's console: its table and progress bars
    logging.get_absl_handler().addFilter(_ProjectInfo())
  parallel.initialize(config.distributed)
  logging.info('JAX %s', parallel.describe())
  workdir = _WORKDIR.value or os.path.join('workdir', config.name)
  logging.info('mode %s, config %s, workdir %s', mode, config.name, workdir)
  try:
    MODES[mode](config, workdir)
  except run_lib.RunError as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  app.run(main)
