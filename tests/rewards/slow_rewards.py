"""Rewards for the server tests (dotted path ``slow_rewards:...``)."""

import time

import torch


def sleepy(images, prompts, metadata):
    time.sleep(float(metadata[0].get("sleep", 0.3)))
    return images.mean(dim=(1, 2, 3))


def boom(images, prompts, metadata):
    raise RuntimeError("the judge model ran out of memory")


def needs_target(images, prompts, metadata):
    """Reads a metadata key: a request without it is the client's fault (422)."""
    return torch.tensor([float(m["target"]) for m in metadata])


def brightness_factory(scale: float = 1.0):
    return lambda images, prompts, metadata: scale * images.mean(dim=(1, 2, 3))


def count_calls(images, prompts, metadata):
    return torch.full((len(prompts),), float(len(prompts)))


count_calls.groupwise = True


RECORDED: list[tuple] = []  # (images, prompts) of every `record` call (tests read it)


def record(images, prompts, metadata):
    """Scores 0 and keeps the images it saw: a run's own pixels for a reference computation."""
    RECORDED.append((images.clone(), list(prompts)))
    return torch.zeros(len(prompts))
