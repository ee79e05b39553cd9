"""Rewards for the reliability tests, by dotted path (``faulty_reward:explodes``)."""


def explodes(images, prompts, metadata):
    raise RuntimeError("the reward server is down\nsecond line of a long message")
