"""The TF cross-checks run in their own venv (requirements-tf.txt) without JAX.

That venv does not install isir_jax; the repository root goes on sys.path so that
``isir_jax.fid_math`` (numpy + scipy only) imports. GPUs stay hidden from TF.
"""

import os
import sys

os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
