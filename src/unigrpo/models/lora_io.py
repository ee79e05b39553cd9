"""LoRA in the formats other libraries load (``unigrpo export``): a peft adapter folder, and a
module with its adapters merged into the base weights.

unigrpo injects LoRA with peft's ``inject_adapter_in_model`` (adapter ``default``, alpha per
target in ``peft_config``), so a module's LoRA state is peft's own (``get_peft_model_state_dict``:
keys ``<module>.lora_A.weight`` / ``.lora_B.weight``, no adapter name) and its config is
``module.peft_config["default"]``; both are written as they are, alpha included (a loader that
finds no alpha assumes alpha = r).
"""

from __future__ import annotations

import copy
from pathlib import Path

from torch import nn

__all__ = ["has_lora", "lora_config", "lora_state", "merge_lora", "write_peft_folder"]


def has_lora(module: nn.Module) -> bool:
    return "default" in getattr(module, "peft_config", {})


def lora_config(module: nn.Module):
    """A copy of the module's peft ``LoraConfig`` (ranks, alpha, targets)."""
    return copy.deepcopy(module.peft_config["default"])


def lora_state(module: nn.Module) -> dict:
    """The LoRA tensors of ``module`` by peft's key names (contiguous CPU copies)."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().contiguous().cpu() for k, v in get_peft_model_state_dict(module).items()}


def write_peft_folder(module: nn.Module, folder: Path, base_model: str, task_type: str = "CAUSAL_LM") -> None:
    """``folder/adapter_config.json`` + ``adapter_model.safetensors``: what ``PeftModel.from_pretrained``
    loads onto ``base_model`` (recorded in the config so that ``AutoPeftModel*`` finds the base)."""
    from safetensors.torch import save_file

    cfg = lora_config(module)
    cfg.base_model_name_or_path, cfg.task_type, cfg.inference_mode = base_model, task_type, True
    folder.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(str(folder))
    state = {f"base_model.model.{k}": v for k, v in lora_state(module).items()}  # PeftModel's own prefix
    save_file(state, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})


def merge_lora(module: nn.Module) -> nn.Module:
    """``module`` with every peft LoRA layer merged into its base layer (``W + (alpha / r) B A``,
    peft's ``merge``) and replaced by it: a plain module again, with the base's key names."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [(n, m) for n, m in module.named_modules() if isinstance(m, BaseTunerLayer)]
    for name, layer in layers:
        layer.merge(safe_merge=True)  # safe_merge: a NaN in the merged weight is an error
        parent, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, child, layer.get_base_layer())
    if hasattr(module, "peft_config"):
        del module.peft_config
    return module
