"""Rewards for the reliability tests, by dotted path (``faulty_reward:explodes``)."""


def explodes(images, prompts, metadata):
    raise RuntimeError("the reward server is down\nsecond line of a long message")



class UnavailableFirst:
    """Missing (as a remote term with on_failure: skip) on its first ``calls`` calls: the first step's."""

    def __init__(self, calls: int = 1):
        self.left = calls

    def __call__(self, images, prompts, metadata):
        import torch

        from unigrpo.rewards import RewardUnavailable

        self.left -= 1
        if self.left >= 0:
            raise RewardUnavailable("the service is down")
        return torch.zeros(len(prompts))
