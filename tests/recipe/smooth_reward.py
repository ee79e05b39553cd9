"""Rewards for the recipe tests, plugged in by dotted path (``smooth_reward:brightness``).

The built-in shapes reward is ~0 for a random model (no advantages, no learning signal); a smooth
reward gives non-zero advantages from step 1 and varies continuously with the pixels.
"""

import torch


def brightness(images, prompts, metadata):
    return images.mean(dim=(1, 2, 3))  # [B]


def darkness(images, prompts, metadata):
    return -images.mean(dim=(1, 2, 3))  # [B]


def redness(images, prompts, metadata):
    return images[:, 0].mean(dim=(1, 2)) - images[:, 1:].mean(dim=(1, 2, 3))


def wrong_shape(images, prompts, metadata):
    return torch.zeros(len(prompts), 2)


def not_finite(images, prompts, metadata):
    return torch.full((len(prompts),), float("nan"))


NOT_CALLABLE = 3


SEEN: list[dict] = []  # every metadata dict `uses_metadata` was called with (tests read it)


def uses_metadata(images, prompts, metadata):
    """Reads a custom JSONL field and the sampled reasoning: brightness pulled towards the line's
    ``"target"`` field, plus a small bonus per reasoning word."""
    SEEN.extend(metadata)
    target = torch.tensor([float(m["target"]) for m in metadata])
    words = torch.tensor([len(m["reasoning"].split()) for m in metadata], dtype=torch.float32)
    return -(images.mean(dim=(1, 2, 3)) - target).abs() + 0.01 * words
