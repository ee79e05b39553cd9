"""``unigrpo export`` of ``model.kind: hf`` (docs/after_training.md): the trained policy in the
formats diffusers, transformers and peft load.

- ``lora``: the image side as diffusers' LoRA file ``pytorch_lora_weights.safetensors``, written by
  the pipeline class's own ``save_lora_weights`` with the adapter metadata (ranks, alpha, targets:
  without it ``load_lora_weights`` would assume alpha = r), loaded by ``pipe.load_lora_weights(DIR)``;
  the text side as a peft adapter folder (``text_encoder/`` in shared mode, ``reasoner/`` in
  separate mode), loaded by ``PeftModel.from_pretrained`` (these pipelines' LoRA loaders ignore
  text-encoder keys). Only when both sides are LoRA.
- ``merged``: the whole pipeline with the LoRA merged (or the fully trained weights), written by
  ``save_pretrained``, loaded by ``DiffusionPipeline.from_pretrained(DIR)``; separate mode adds the
  reasoner (``reasoner/``: model + tokenizer, ``AutoModelForCausalLM.from_pretrained``). Weights in
  ``model.dtype``.
"""

from __future__ import annotations

from pathlib import Path

from unigrpo.models.lora_io import merge_lora, write_peft_folder

__all__ = ["text_base", "write_lora", "write_merged"]


def text_base(model) -> str:
    """Where the text side's base weights live: the pipeline's ``text_encoder`` subfolder, or the reasoner."""
    m = model.config_section
    if model.mode == "separate":
        return m["reasoner"]
    return str(Path(m["pipeline"]) / "text_encoder") if Path(m["pipeline"]).is_dir() else m["pipeline"]


def write_lora(model, folder: Path) -> str:
    """The ``lora`` format (module docstring); returns the loading snippet for the README."""
    import diffusers

    from unigrpo.models.lora_io import lora_config, lora_state

    pipe_cls = getattr(diffusers, model.pipeline_class)
    pipe_cls.save_lora_weights(str(folder), transformer_lora_layers=lora_state(model.dit),
                               transformer_lora_adapter_metadata=lora_config(model.dit).to_dict())
    side = "text_encoder" if model.mode == "shared" else "reasoner"
    write_peft_folder(model.lm, folder / side, text_base(model))
    pipeline = model.config_section["pipeline"]
    if model.mode == "shared":
        text = ("# the text encoder is also the reasoner: its LoRA (peft; injected in place into pipe.text_encoder)\n"
                "PeftModel.from_pretrained(pipe.text_encoder, \"DIR/text_encoder\")\n")
    else:
        text = (f"# the reasoner (not part of the pipeline)\n"
                f"reasoner = AutoModelForCausalLM.from_pretrained({model.config_section['reasoner']!r})\n"
                f"reasoner = PeftModel.from_pretrained(reasoner, \"DIR/reasoner\")\n")
    return (f"from diffusers import {model.pipeline_class}\nfrom peft import PeftModel\n"
            + ("" if model.mode == "shared" else "from transformers import AutoModelForCausalLM\n")
            + f"\npipe = {model.pipeline_class}.from_pretrained({pipeline!r})\n"
              "pipe.load_lora_weights(\"DIR\")  # the image LoRA (pytorch_lora_weights.safetensors)\n" + text)


def write_merged(model, folder: Path) -> str:
    """The ``merged`` format (module docstring); returns the loading snippet for the README."""
    from diffusers import DiffusionPipeline

    from unigrpo.models.hf import DTYPES

    m = model.config_section
    dtype = DTYPES[m["dtype"]]
    lm, dit = (merge_lora(x) for x in (model.lm, model.dit))
    for x in (lm, dit):  # a fully trained side is float32 (its master weights): back to model.dtype
        if any(p.dtype != dtype for p in x.parameters()):
            x.to(dtype)
    parts = {"transformer": dit} | ({"text_encoder": lm} if model.mode == "shared" else {})
    pipe = DiffusionPipeline.from_pretrained(m["pipeline"], dtype=dtype, **parts)  # the rest: the base's
    pipe.save_pretrained(str(folder))
    snippet = "from diffusers import DiffusionPipeline\n\npipe = DiffusionPipeline.from_pretrained(\"DIR\")\n"
    if model.mode == "separate":
        lm.save_pretrained(str(folder / "reasoner"))
        model.tokenizer.save_pretrained(str(folder / "reasoner"))
        snippet += ("\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                    "reasoner = AutoModelForCausalLM.from_pretrained(\"DIR/reasoner\")\n"
                    "tokenizer = AutoTokenizer.from_pretrained(\"DIR/reasoner\")\n")
    return snippet
