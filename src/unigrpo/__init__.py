"""unigrpo: RL post-training of unified reason-then-draw models (UniGRPO, arXiv 2603.23500)."""

__version__ = "0.1.0"
