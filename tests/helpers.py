"""Small shared helpers for tests (fixtures live in conftest.py)."""

import torch
import transformers

from pocketpeft.model import dequantized_state_dict

CHAT = [
    "hey are you coming to the game tonight?",
    "yeah i think so, what time does it start",
    "it starts at 7 but we should get there early",
    "ok cool i'll pick you up at 6",
    "sounds good see you then",
    "did you finish the homework for tomorrow",
    "not yet, i was going to do it after dinner",
    "lol same, it's so long this week",
] * 6


def hf_model_from_backend(backend) -> transformers.LlamaForCausalLM:
    """A transformers LlamaForCausalLM holding the (dequantized) base weights of a torch backend."""
    cfg = backend.model.config
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg.to_hf_dict())).eval()
    sd = dequantized_state_dict(backend.model)
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return hf.to(torch.float32)
