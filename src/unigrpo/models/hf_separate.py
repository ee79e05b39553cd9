"""Separate mode of ``model.kind: hf``: a transformers causal LM (``model.reasoner``, a folder or hub
id) writes the reasoning, and the diffusers pipeline's OWN text encoders encode prompt + reasoning
as text. What any such pipeline shares lives here; a family (``hf_sd3``) adds ``encode_texts`` (its
``encode_prompt``), the transformer call and the VAE.

- **Text policy**: the reasoner, with the text phase of shared mode (``CausalLMReasoner``: chat
  template, left padding, seeded KV-cache decode). ``forward_context`` is ONE teacher-forced pass
  of the reasoner (the token log-probs) + the pipeline's text encoders on the joined text.
- **Joined text** (``joined_texts``): ``f"{prompt} {reasoning}"``, or the prompt alone when the
  reasoning is empty. The prompt is recovered from the prompt tokens (the reasoner's template
  rendered around it is stripped: byte-level BPE decodes losslessly; any other mismatch is an
  error, never a silent wrong prompt); the reasoning is the response decoded with
  ``skip_special_tokens=True`` (the stop token and pads dropped), stripped of outer whitespace.
  The prompt comes first so that an encoder that truncates (CLIP at 77 tokens) keeps it.
- **Gradients**: the text encoders are frozen and run under ``no_grad``, so the context carries no
  gradient to the text policy (the paper's setting: the reasoning learns only through its GRPO
  token loss); ``algo.detach_context`` changes nothing here.
- **CFG**: the null context is the pipeline's negative prompt ``""`` through the same encoders,
  computed once per device (the encoders are frozen).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from unigrpo.models.hf import DTYPES, HFUnifiedModel
from unigrpo.models.protocol import TokenBatch
from unigrpo.utils import dist
from unigrpo.utils.checkpoint import check_finite

__all__ = ["SeparateReasonerModel", "load_reasoner"]

SENTINEL = "\x00PROMPT\x00"  # where the prompt sits in the rendered chat template


def load_reasoner(name: str, dtype: str):
    """``AutoModelForCausalLM`` + ``AutoTokenizer`` from ``model.reasoner``; one line if it fails."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        lm = AutoModelForCausalLM.from_pretrained(name, dtype=DTYPES[dtype])
    except (OSError, ValueError) as e:  # missing folder, unknown / unreachable hub id, not a causal LM
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"model.reasoner: cannot load a transformers causal LM from {name!r}: {first}") from None
    check_finite({"reasoner": lm}, f"model.reasoner {name}")
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is None:
        raise ValueError(f"model.reasoner: the tokenizer of {name!r} has neither a pad nor an eos token")
    return lm.eval(), tokenizer


class SeparateReasonerModel(HFUnifiedModel):
    """A causal LM reasons (``lm``, the text side), the pipeline's frozen text encoders
    (``encoders``) encode ``joined_texts`` (module docstring). Families implement
    ``encode_texts(texts) -> context`` (a dataclass with ``hidden`` and ``mask``)."""

    mode = "separate"
    context_grad_to_text = False  # the context is text through frozen encoders (module docstring)

    def __init__(self, lm, tokenizer, dit, vae, scheduler_config: dict, encoders: dict[str, nn.Module], *,
                 enable_thinking: bool = True, **lora):
        super().__init__(lm, tokenizer, dit, vae, scheduler_config, hidden_layers=(-1,),
                         template_kwargs={"enable_thinking": enable_thinking}, **lora)
        self.encoders = nn.ModuleDict(encoders).requires_grad_(False).eval()
        head, sep, tail = self.reasoner._text(SENTINEL).partition(SENTINEL)
        if not sep:
            raise ValueError("model.reasoner: the chat template does not contain the prompt verbatim")
        self.template_head, self.template_tail = head, tail
        self._null_cache: dict[torch.device, object] = {}

    def encode_texts(self, texts: list[str]):
        """The pipeline's ``encode_prompt`` of ``texts`` (no gradient): the transformer's text input."""
        raise NotImplementedError

    def _decode(self, ids: list[int], skip_special: bool) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special, clean_up_tokenization_spaces=False)

    def joined_texts(self, tokens: TokenBatch) -> list[str]:
        """Per row: the prompt text + " " + the reasoning text (module docstring)."""
        texts = []
        for ids, mask, resp in zip(tokens.ids.tolist(), tokens.mask.tolist(), tokens.response_mask.tolist()):
            text = self._decode([i for i, m, r in zip(ids, mask, resp) if m and not r], False)
            head, tail = self.template_head, self.template_tail
            if not (text.startswith(head) and text.endswith(tail) and len(text) >= len(head) + len(tail)):
                raise ValueError(f"model.reasoner: the prompt tokens do not decode to the chat template around "
                                 f"a prompt: {text[:80]!r}")
            prompt = text[len(head):len(text) - len(tail)]
            reasoning = self._decode([i for i, r in zip(ids, resp) if r], True).strip()
            texts.append(f"{prompt} {reasoning}" if reasoning else prompt)
        return texts

    def forward_context(self, tokens: TokenBatch, temperature: float = 1.0):
        """The reasoner's teacher-forced log-probs + the frozen encoders on the joined text."""
        logp, _ = self.reasoner.forward_context(tokens, temperature)
        with torch.no_grad():
            return logp, self.encode_texts(self.joined_texts(tokens))

    def null_context(self, batch_size: int):
        """The pipeline's negative prompt "" (one row, cached per device), broadcast to the batch."""
        dev = self.device
        if dev not in self._null_cache:
            with torch.no_grad():
                self._null_cache = {dev: self.encode_texts([""])}
        one = self._null_cache[dev]
        return type(one)(**{f.name: getattr(one, f.name).expand(batch_size, *getattr(one, f.name).shape[1:])
                            for f in dataclasses.fields(one)})

    def wrap(self, ranks) -> None:
        """Rank 0's trainable sides on every rank (the frozen encoders and VAE load identically)."""
        dist.broadcast_parameters(self.lm, ranks)
        dist.broadcast_parameters(self.dit, ranks)
