"""Small shared helpers for tests (fixtures live in conftest.py)."""

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import torch

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


def hf_model_from_backend(backend):
    """A transformers ``*ForCausalLM`` of the backend model's family holding the (dequantized)
    base weights of a torch backend."""
    from pocketpeft.reference.hf import hf_model

    return hf_model(backend.model.config, dequantized_state_dict(backend.model))


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


def assert_skips_non_finite_steps(backend, inputs, labels, steps: int = 6) -> None:
    """Train ``backend`` (configured with a divergent learning rate) for ``steps`` steps: some
    step must be skipped for a non-finite loss or gradient, leaving the adapter as it was."""
    import math

    import numpy as np

    results, snapshots = [], []
    for _ in range(steps):
        snapshots.append(backend.get_adapter())
        results.append(backend.train_step(inputs, labels))
    skipped = [i for i, r in enumerate(results) if r.skipped]
    assert skipped, [r.loss for r in results]
    i = skipped[0]
    after = backend.get_adapter() if i == steps - 1 else snapshots[i + 1]
    for k in after:
        assert np.array_equal(after[k], snapshots[i][k], equal_nan=True), f"{k} changed on a skipped step"
    assert not math.isfinite(results[i].loss) or not math.isfinite(results[i].grad_norm)


#: the split tests' LoRA: a few linears of layer 1 only, so the tiny model splits at layer 1
SPLIT_LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], layers_to_transform=[1])


def export_split_bundle(tiny_hf_dir, tmp_path_factory, targets, split=None, name="split"):
    """The tiny model exported with :data:`SPLIT_LORA` (``split=False``: the same model unsplit)."""
    import pocketpeft as pp

    return pp.export(
        tiny_hf_dir,
        tmp_path_factory.mktemp(name) / "b",
        quant="q4_0",
        lora=pp.LoraConfig(**SPLIT_LORA),
        targets=targets,
        seq_len=32,
        batch_size=4,
        split=split,
    )


def peft_logits(hf, adapter_dir, ids):
    """(base logits, logits with the PEFT adapter at ``adapter_dir`` loaded by real peft, the
    PeftModel) of ``hf`` on one sequence ``ids``."""
    import peft

    with torch.no_grad():
        base = hf(torch.tensor(ids[None])).logits[0].numpy()
        pm = peft.PeftModel.from_pretrained(hf, str(adapter_dir)).eval()
        return base, pm(input_ids=torch.tensor(ids[None])).logits[0].numpy(), pm


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op threads set to ``n`` inside the block: the tiny model's matmuls are small,
    and on a busy 2-core machine one thread is far quicker than two fighting other processes."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
