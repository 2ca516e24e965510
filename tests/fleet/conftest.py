"""Fleet fixtures: a tiny bundle (the tiny random Llama, LoRA r=4 on q/v of both layers, torch target)."""

from __future__ import annotations

import pytest

pytest.importorskip("flwr")
pytest.importorskip("dp_accounting")

FLEET_LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])


@pytest.fixture(scope="session")
def fleet_bundle(tiny_hf_dir, tmp_path_factory):
    """The tiny model exported for the torch backend (q8_0, 32-token rows, batch 4)."""
    import pocketpeft as pp

    b = pp.export(
        tiny_hf_dir,
        tmp_path_factory.mktemp("fleet") / "bundle",
        quant="q8_0",
        lora=pp.LoraConfig(**FLEET_LORA),
        targets=["torch"],
        seq_len=32,
        batch_size=4,
    )
    return b.root


@pytest.fixture()
def task_identity():
    """Messages built outside a Flower process need its task identity (run, task, node ids)."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved
