"""Test session setup. The Triton interpreter must be switched on before triton is imported,
so this runs first: on a machine without CUDA every Triton kernel runs on the CPU."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))
