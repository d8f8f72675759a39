"""deepimage: scaling up image recognition on PyTorch.

Parallel training (butterfly synchronization, lazy update), aggressive augmentation and
multi-scale models, after "Deep Image: Scaling up Image Recognition" (Wu et al., 2015).
"""

__version__ = "0.1.0"
