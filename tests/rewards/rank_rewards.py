"""A reward that is unavailable on rank 1 only, from its third call on (step 2 with 2 chunks per
rank): the ranks must still take one decision (``dist.any_flag``) and all skip that update."""

import os

from unigrpo.rewards import RewardUnavailable

CALLS = [0]


def rank1_down_in_step2(images, prompts, metadata):
    CALLS[0] += 1
    if os.environ.get("RANK") == "1" and CALLS[0] > 2:
        raise RewardUnavailable("reward service test: down on rank 1")
    return images.mean(dim=(1, 2, 3))
