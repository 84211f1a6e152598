"""Test-session setup shared by every test module.

Without a CUDA device, Triton kernels can still be checked on CPU tensors through Triton's
interpreter, which must be switched on before triton is first imported.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
