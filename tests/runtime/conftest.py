"""Fixtures of the runtime tests: the tiny q4_0 bundle the keyboard tests share, and one torch
thread for the tests that decode it token by token."""

import pytest

import pocketpeft as pp
from tests.helpers import torch_threads


@pytest.fixture(scope="module")
def one_torch_thread():
    """Single-token decoding of the tiny model is all overhead; on a shared 2-core box two
    OpenMP threads fight other processes and run several times slower than one."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def keyboard_bundle(tiny_hf_dir, tmp_path_factory):
    """The tiny random Llama at q4_0 with a rank-4 LoRA and 32-token rows (torch target)."""
    return pp.export(
        tiny_hf_dir,
        tmp_path_factory.mktemp("kb") / "bundle",
        quant="q4_0",
        lora=pp.LoraConfig(r=4, lora_alpha=8),
        seq_len=32,
        batch_size=4,
    )
