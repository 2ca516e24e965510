"""Small shared helpers for tests (fixtures live in conftest.py)."""

import json
import subprocess
import sys
from pathlib import Path

import torch
import transformers

from pocketpeft.reference.model import dequantized_state_dict

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


def run_without_torch(code: str, *args: str, timeout: float = 600) -> dict:
    """Run ``code`` in a child Python where torch can't be imported (as on a device that doesn't
    have it) and return the JSON object it prints last; ``sys.argv[1:]`` are ``args``. The
    child's ``TORCH`` global lists any torch module it imported anyway (must stay empty)."""
    child = "import json, sys\nfrom benchmarks.common import block_modules\nblock_modules('torch')\n" + code
    p = subprocess.run(
        [sys.executable, "-c", child, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=str(Path(__file__).resolve().parents[1]),
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])
