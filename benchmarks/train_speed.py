"""Training speed and memory: LoRA r=8 on q/k/v/o of SmolLM2-135M, batch 8 x 64 tokens.

Every configuration runs in its own process (so its peak RSS is its own), interleaved over
repetitions; PEFT + transformers eager at f32 is the baseline measured in the same run, and a
fp32 matmul measurement gives the machine's FLOP ceiling for this step (an int8 one shows
whether cheaper arithmetic would lift it here).

The training rows are packed once, in the parent, and handed to every worker as an .npz, so no
worker's memory includes the chat corpus. The onnxruntime workers run as on a device: torch is
made unimportable in them (the ORT path needs none; :func:`benchmarks.common.block_modules`),
while PEFT and the torch/executorch backends need it and import it.

    python -m benchmarks.train_speed [--quick] [--backends torch,executorch,onnxruntime]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from benchmarks.common import Suite, block_modules, main, peak_rss_mib, summarize

BATCH, SEQ, RANK = 8, 64, 8
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]


#: device-memory ONNX exports (see export/onnx_target.py): micro-batch rows, int8-stored 4-bit
LOW_MEMORY_ROWS = (1, 2)


def low_memory_name(rows: int) -> str:
    return f"pocketpeft onnxruntime q4_0, {rows}-row micro-batches, int8 4-bit"


def device_targets(results: dict) -> dict[str, bool]:
    """Per device-backend configuration (executorch, onnxruntime): >= 1.4x PEFT eager tokens/s
    and <= 0.3x its peak RSS, both together."""
    return {
        n: r["speed_vs_peft"] >= 1.4 and r["rss_vs_peft"] <= 0.3
        for n, r in results.items()
        if "executorch" in n or "onnxruntime" in n
    }


def pack_bench_rows(tokenizer_json: Path, n_rows: int, out: Path) -> Path:
    """The top chitchat sender's first 4000 training messages packed into ``n_rows`` full rows of
    ``SEQ`` tokens, written to ``out`` (.npz with ``x`` and ``y``)."""
    import numpy as np

    from pocketpeft.corpus import sender_split, top_senders
    from pocketpeft.text import pack_rows
    from pocketpeft.tokenizer import Tokenizer

    train, _ = sender_split(top_senders()[0])
    x, y = pack_rows(Tokenizer.from_file(tokenizer_json), train[:4000], SEQ, pad_to_full=False)
    np.savez(out, x=x[:n_rows], y=y[:n_rows])
    return out


def _rows(path: str):
    import numpy as np

    with np.load(path) as d:
        return d["x"], d["y"]


def worker_pocketpeft(bundle: str, backend: str, steps: int, rows: str) -> dict:
    import sys

    if backend == "onnxruntime":  # as on a device, where torch isn't installed
        block_modules("torch")
    import pocketpeft as pp

    t0 = time.perf_counter()
    sess = pp.runtime.open(bundle, backend=backend)
    load_s = time.perf_counter() - t0
    x, y = _rows(rows)
    be = sess.backend
    from pocketpeft.runtime import TrainConfig

    be.configure(TrainConfig(total_steps=steps + 1))
    be.train_step(x[:BATCH], y[:BATCH])  # warm-up (first-call allocation, kernel selection)
    times, losses = [], []
    for i in range(1, steps + 1):
        t = time.perf_counter()
        r = be.train_step(x[i * BATCH : (i + 1) * BATCH], y[i * BATCH : (i + 1) * BATCH])
        times.append(time.perf_counter() - t)
        losses.append(r.loss)
    return {
        "step_seconds": times,
        "losses": losses,
        "load_seconds": load_s,
        "peak_rss_mib": peak_rss_mib(),
        "torch_imported": "torch" in sys.modules,
    }


def hf_folder(path: Path) -> Path:
    """SmolLM2 (embedded GGUF, dequantized) saved once as an HF folder, so the PEFT baseline loads
    the way its users load: ``from_pretrained``."""
    if not (path / "config.json").is_file():
        import transformers

        from pocketpeft.reference.loading import load_base

        base = load_base("smollm2")
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**base.config.to_hf_dict()))
        hf.load_state_dict(base.state_dict, strict=False)
        hf.tie_weights()
        hf.save_pretrained(path)
        base.tokenizer.save(path / "tokenizer.json")
    return path


def worker_peft(folder: str, steps: int, rows: str) -> dict:
    import peft
    import torch
    import transformers

    t0 = time.perf_counter()
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    model = peft.get_peft_model(
        hf, peft.LoraConfig(r=RANK, lora_alpha=16, target_modules=MODULES, task_type="CAUSAL_LM")
    )
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    load_s = time.perf_counter() - t0
    x, y = _rows(rows)
    model.train()
    times, losses = [], []
    for i in range(steps + 1):
        ids = torch.from_numpy(x[i * BATCH : (i + 1) * BATCH])
        lab = torch.from_numpy(y[i * BATCH : (i + 1) * BATCH])
        t = time.perf_counter()
        logits = model(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), lab.reshape(-1), ignore_index=-100
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:  # step 0 is the warm-up
            times.append(time.perf_counter() - t)
            losses.append(float(loss))
    return {
        "step_seconds": times,
        "losses": losses,
        "load_seconds": load_s,
        "peak_rss_mib": peak_rss_mib(),
        "torch_imported": True,
    }


def matmul_ceiling(n_params: int, seconds: float = 3.0) -> dict:
    """fp32 GFLOP/s of this machine's matmul at the step's shapes, and the tokens/s it implies
    for a LoRA step (~4 FLOPs per frozen parameter per token: forward + input gradient)."""
    import torch

    x, w = torch.randn(BATCH * SEQ, 576), torch.randn(576, 1536)
    gflops = _rate(lambda: x @ w, 2 * x.shape[0] * 576 * 1536, seconds)
    return {
        "matmul_gflops": gflops,
        "ceiling_tokens_per_s": gflops * 1e9 / (4 * n_params),
        "int8_matmul_gops": int8_matmul_gops(seconds),
    }


def int8_matmul_gops(seconds: float = 3.0) -> float | None:
    """int8 GOP/s of ONNX Runtime's ``MatMulInteger`` (u8 x s8, int32 accumulate) at the same
    shapes: what quantized activations could buy on this CPU (None without onnxruntime)."""
    try:
        import numpy as np
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        return None
    m, k, n = BATCH * SEQ, 576, 1536
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.integers(-127, 128, (k, n), dtype=np.int8), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "w"], ["y"])],
        "mm",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [m, k])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [m, n])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    feed = {"a": rng.integers(0, 256, (m, k), dtype=np.uint8)}
    return _rate(lambda: sess.run(None, feed), 2 * m * k * n, seconds)


def _rate(run, ops: int, seconds: float) -> float:
    """Giga-ops per second of ``run()`` (``ops`` each) over ``seconds``, after 3 warm-up calls."""
    for _ in range(3):
        run()
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        run()
        count += 1
    return count * ops / (time.perf_counter() - t0) / 1e9


def _bundle(path: Path, quant: str, targets: list[str], onnx, exports: dict) -> Path:
    """The cached bench bundle at ``path``, exported (with the onnx target's ``OnnxOptions`` ``onnx``,
    None for the defaults) when it is
    missing or fails verification; a fresh export's per-target seconds go to ``exports``."""
    import pocketpeft as pp

    try:
        pp.Bundle(path).verify()
    except pp.PocketPeftError:
        print(f"exporting {path.name} …", flush=True)
        pp.export(
            "smollm2",
            path,
            quant=quant,
            targets=targets,
            seq_len=SEQ,
            batch_size=BATCH,
            lora=pp.LoraConfig(r=RANK, lora_alpha=16, target_modules=MODULES),
            onnx=onnx,
        )
        exports[path.name] = {t: i.get("export_seconds") for t, i in pp.Bundle(path).manifest.targets.items()}
    return path


class TrainSpeed(Suite):
    name, module, description = "train_speed", "benchmarks.train_speed", __doc__
    quick_help = "1 repetition x 3 steps"

    def add_arguments(self, ap: argparse.ArgumentParser) -> None:
        ap.add_argument("--backends", default="torch", help="pocketpeft backends to measure at q4_0 besides torch")
        ap.add_argument("--quants", default="f32,q8_0,q4_0", help="quant formats for the torch backend")

    def worker(self, argv: list[str]) -> dict:
        kind, *rest = argv
        return (
            worker_peft(rest[0], int(rest[1]), rest[2])
            if kind == "peft"
            else worker_pocketpeft(rest[0], rest[1], int(rest[2]), rest[3])
        )

    def run(self, args: argparse.Namespace) -> dict:
        return _run(self, args)

    def table(self, payload: dict, args: argparse.Namespace):
        rows = [
            [
                name,
                r["tokens_per_s"]["median"],
                f"{r['speed_vs_peft']:.2f}x",
                r["peak_rss_mib"]["median"],
                f"{r['rss_vs_peft']:.2f}x",
                f"{100 * r['share_of_ceiling']:.0f}%",
            ]
            for name, r in payload["results"].items()
        ]
        return rows, [
            ("config", ""),
            ("tokens/s", ".0f"),
            ("vs PEFT", ""),
            ("peak RSS MiB", ".0f"),
            ("vs PEFT", ""),
            ("of ceiling", ""),
        ]

    def summary(self, payload: dict, args: argparse.Namespace) -> list[str]:
        c = payload["ceiling"]
        return [
            f"fp32 matmul here: {c['matmul_gflops']:.0f} GFLOP/s -> ceiling {c['ceiling_tokens_per_s']:.0f} "
            f"tokens/s; int8 (ORT MatMulInteger): {c['int8_matmul_gops'] or 0:.0f} GOP/s"
        ]


def _run(suite: Suite, args: argparse.Namespace) -> dict:
    from pocketpeft.export import OnnxOptions
    from pocketpeft.fsutil import cache_dir
    from pocketpeft.runtime.selection import probe

    reps, steps = (1, 3) if args.quick else (3, 6)
    extra = [b for b in args.backends.split(",") if b and b != "torch"]
    extra = [b for b in extra if probe(b).available]
    targets = {"executorch": "executorch", "onnxruntime": "onnx"}
    folder = hf_folder(cache_dir() / "bench" / "smollm2-hf-f32")
    rows = str(
        pack_bench_rows(folder / "tokenizer.json", BATCH * (steps + 1), cache_dir() / "bench" / "train_rows.npz")
    )
    configs: list[tuple[str, list[str]]] = [("peft+transformers eager f32", ["peft", str(folder), str(steps), rows])]
    exports = {}
    for q in args.quants.split(","):
        tg = ["torch"] + ([targets[b] for b in extra] if q == "q4_0" else [])
        path = _bundle(cache_dir() / "bench" / f"smollm2-{q}-r{RANK}-{'-'.join(tg)}", q, tg, None, exports)
        configs.append((f"pocketpeft torch {q}", ["pp", str(path), "torch", str(steps), rows]))
        if q == "q4_0":
            configs += [(f"pocketpeft {b} q4_0", ["pp", str(path), b, str(steps), rows]) for b in extra]
        for n_rows in LOW_MEMORY_ROWS if q == "q4_0" and "onnxruntime" in extra else ():  # device-memory exports
            low = _bundle(
                cache_dir() / "bench" / f"smollm2-q4_0-r{RANK}-onnx-rows{n_rows}-int8",
                q,
                ["onnx"],
                OnnxOptions(rows=n_rows, q4="int8"),
                exports,
            )
            configs.append((low_memory_name(n_rows), ["pp", str(low), "onnxruntime", str(steps), rows]))
    runs: dict[str, list[dict]] = {name: [] for name, _ in configs}
    for rep in range(reps):
        for name, wargs in configs:
            print(f"[{rep + 1}/{reps}] {name}", flush=True)
            runs[name].append(suite.run_worker(wargs))
    n_params = 134_515_008
    ceiling = matmul_ceiling(n_params)
    tokens = BATCH * SEQ
    results = {}
    for name, rs in runs.items():
        tps = [tokens / (sum(r["step_seconds"]) / len(r["step_seconds"])) for r in rs]
        results[name] = {
            "tokens_per_s": summarize(tps),
            "peak_rss_mib": summarize([r["peak_rss_mib"] for r in rs]),
            "load_seconds": summarize([r["load_seconds"] for r in rs]),
            "torch_imported": any(r.get("torch_imported", True) for r in rs),
            "losses_first_run": rs[0]["losses"],
        }
    base = results["peft+transformers eager f32"]
    for r in results.values():
        r["speed_vs_peft"] = r["tokens_per_s"]["median"] / base["tokens_per_s"]["median"]
        r["rss_vs_peft"] = r["peak_rss_mib"]["median"] / base["peak_rss_mib"]["median"]
        r["share_of_ceiling"] = r["tokens_per_s"]["median"] / ceiling["ceiling_tokens_per_s"]
    payload = {
        "settings": {
            "model": "SmolLM2-135M-Instruct (embedded GGUF, dequantized)",
            "lora_r": RANK,
            "lora_alpha": 16,
            "target_modules": MODULES,
            "batch": BATCH,
            "seq_len": SEQ,
            "repetitions": reps,
            "timed_steps_per_run": steps,
            "quick": args.quick,
            "workers": "one process per run; rows packed once in the parent (.npz); onnxruntime "
            "workers with torch unimportable, as on a device",
        },
        "ceiling": ceiling,
        "exports": exports,
        "results": results,
        "target": "best device backend >= 1.4x PEFT eager tokens/s and <= 0.3x its peak RSS",
        "targets_met": device_targets(results),
    }
    return payload


if __name__ == "__main__":
    main(TrainSpeed())
