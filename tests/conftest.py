"""Suite-wide settings: one intra-op thread per test process.

With ``pytest -n 2`` on a 2-core machine, two processes each using every core would
oversubscribe the CPU several times over.
"""

import os

import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
