"""GPU training speed: pocketpeft's torch backend on CUDA vs peft + bitsandbytes QLoRA (nf4).

A SmolLM2-shaped model with random weights (no weight files: the architecture below is
SmolLM2-135M's), exported once to nf4 (and f16 for a bf16-base reference), LoRA r=8 on
q/k/v/o, rows of 64 tokens, batch 8, 32 and 64. Every configuration runs in its own process (so
its peak GPU memory is its own), all batch sizes per process, interleaved over repetitions:

* ``pocketpeft eager``          — torch backend, bf16 compute, frozen nf4 bytes dequantized on the
  GPU inside each layer, every kernel launched from Python (``step="eager"``).
* ``pocketpeft graph``          — the torch backend's CUDA default: the same step (forward, loss,
  backward, clipping, finite check, fused AdamW) captured once per batch shape as one CUDA
  graph and replayed (``step="graph"``, see runtime/backends/step_graph.py).
* ``pocketpeft compiled+graph`` — that graph over ``torch.compile``'d forward and backward:
  inductor fuses each dequantization and the elementwise work around the matmuls.
* ``peft+bnb nf4``              — the baseline: transformers + peft with bitsandbytes ``Linear4bit``
  (nf4, bf16 compute) over the same bytes (pocketpeft's ``peft`` backend).
* ``peft bf16 base``            — peft over a plain bf16 base, for scale.

Same optimizer step everywhere (AdamW, clipping, warmup + cosine). The share of the GPU's bf16
peak counts ~4 FLOPs per frozen weight per token (forward + input gradient) against a bf16
matmul measured in the same run (and the spec-sheet figure where the GPU is known).

    python -m benchmarks.gpu_train [--reps 3] [--steps 10]   # on a GPU
    python -m benchmarks.gpu_train --smoke                  # CPU, tiny, seconds
"""

from __future__ import annotations

import argparse
import re
import tempfile
import time
import traceback
from pathlib import Path

from benchmarks.common import Suite, main, peak_rss_mib, summarize

SEQ, RANK = 64, 8
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]
#: SmolLM2-135M's architecture (HF LlamaConfig fields).
SMOLLM2 = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
)
#: A tiny model of the same family for --smoke.
TINY = dict(
    SMOLLM2,
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
#: Dense bf16 tensor-core peak (TFLOP/s, spec sheets, no sparsity), matched on the device name.
SPEC_BF16_TFLOPS = {
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 80GB HBM3": 989.0,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "A100": 312.0,
    "L4": 121.0,
    "A10G": 70.0,
}
CONFIGS = {  # name -> (backend module, bundle quant, backend options)
    "pocketpeft eager": ("torch_backend", "nf4", {"step": "eager"}),
    "pocketpeft graph": ("torch_backend", "nf4", {"step": "graph"}),
    "pocketpeft compiled+graph": ("torch_backend", "nf4", {"step": "graph", "compile": True}),
    "peft+bnb nf4": ("peft_backend", "nf4", {}),
    "peft bf16 base": ("peft_backend", "f16", {}),
}
#: What runs without a GPU (--smoke, --device cpu): graphs need CUDA, compiling a CPU says nothing.
CPU_CONFIGS = ["pocketpeft eager", "peft+bnb nf4", "peft bf16 base"]
BASELINE = "peft+bnb nf4"


def write_random_model(folder: Path, arch: dict, seed: int = 0) -> Path:
    """An HF folder holding a random-init LlamaForCausalLM of ``arch`` and a word-level
    tokenizer.json of the same vocabulary size (the rows are random token ids anyway)."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    if (folder / "config.json").is_file():
        return folder
    torch.manual_seed(seed)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**arch)).save_pretrained(folder)
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(arch["vocab_size"])}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    return folder


def export_bundles(work: Path, arch: dict, batch: int) -> dict[str, str]:
    """nf4 and f16 bundles of the random model (exported once per work folder)."""
    import pocketpeft as pp

    folder = write_random_model(work / "model", arch)
    out = {}
    for quant in ("nf4", "f16"):
        path = work / f"bundle-{quant}"
        try:
            pp.Bundle(path)
        except pp.PocketPeftError:
            pp.export(
                folder,
                path,
                quant=quant,
                targets=["torch"],
                seq_len=SEQ,
                batch_size=batch,
                lora=pp.LoraConfig(r=RANK, lora_alpha=16, target_modules=MODULES),
            )
        out[quant] = str(path)
    return out


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def worker(config: str, bundle: str, device: str, batches: list[int], steps: int, warmup: int) -> dict:
    """Time ``steps`` optimizer steps per batch size for one configuration; returns per-batch
    step seconds, losses and peak memory (GPU allocator peak on CUDA, process RSS on CPU)."""
    import importlib

    import numpy as np
    import torch

    import pocketpeft as pp
    from pocketpeft.runtime import TrainConfig

    mod_name, _, options = CONFIGS[config]
    b = pp.Bundle(bundle)
    be = importlib.import_module(f"pocketpeft.runtime.backends.{mod_name}").create(device, "bfloat16", **options)
    be.load(b)
    vocab = b.manifest.arch.vocab_size
    rng = np.random.default_rng(0)
    out = {}
    for batch in batches:
        be.configure(TrainConfig(total_steps=steps + warmup))
        x = rng.integers(0, vocab, size=(steps + warmup, batch, SEQ), dtype=np.int64)
        y = np.roll(x, -1, axis=-1)
        y[..., -1] = -100
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        t_warm = time.perf_counter()
        for i in range(warmup):  # real steps: compilation, autotuning, graph capture, allocator warm-up
            be.train_step(x[i], y[i])
        _sync(device)
        t_warm = time.perf_counter() - t_warm
        times, losses = [], []
        for i in range(warmup, warmup + steps):
            t = time.perf_counter()
            r = be.train_step(x[i], y[i])  # returns python floats: the step has finished on the device
            _sync(device)
            times.append(time.perf_counter() - t)
            losses.append(r.loss)
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.startswith("cuda") else peak_rss_mib()
        out[str(batch)] = {
            "step_seconds": times,
            "losses": losses,
            "warmup_seconds": t_warm,
            "peak_mib": peak,
            "peak_kind": "cuda max_memory_allocated" if device.startswith("cuda") else "process RSS",
        }
    return out


def bf16_matmul_tflops(device: str, n: int, seconds: float = 2.0) -> float:
    """Measured bf16 matmul throughput (n x n x n) on ``device``, TFLOP/s."""
    import torch

    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    bm = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ bm
    _sync(device)
    k, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ bm
        k += 1
        if k % 10 == 0:
            _sync(device)
    _sync(device)
    return k * 2 * n**3 / (time.perf_counter() - t0) / 1e12


def frozen_params(arch: dict) -> int:
    """Weights a token passes through as matmuls: every linear plus the (tied) output projection."""
    h, i, layers = arch["hidden_size"], arch["intermediate_size"], arch["num_hidden_layers"]
    hd = h // arch["num_attention_heads"]
    attn = h * hd * (2 * arch["num_attention_heads"] + 2 * arch["num_key_value_heads"])
    return layers * (attn + 3 * h * i) + arch["vocab_size"] * h


class GpuTrain(Suite):
    name, module, description = "gpu_train", "benchmarks.gpu_train", __doc__
    quick_help = "1 repetition, batches 8 and 64, 5 timed steps"
    tmp: tempfile.TemporaryDirectory | None = None

    def add_arguments(self, ap: argparse.ArgumentParser) -> None:
        ap.add_argument(
            "--smoke",
            action="store_true",
            help="tiny model on the CPU, 2 steps, eager configs: checks it runs (results: --out, "
            "default a temp folder)",
        )
        ap.add_argument(
            "--device",
            default=None,
            help="cuda:0 when available; without CUDA nothing is measured unless --smoke or --device cpu",
        )
        ap.add_argument("--batches", default=None, help="comma-separated batch sizes (default 8,32,64; smoke 2,4)")
        ap.add_argument("--reps", type=int, default=None, help="interleaved repetitions (default 3; smoke 1)")
        ap.add_argument("--steps", type=int, default=None, help="timed steps per batch size (default 10; smoke 2)")
        ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; smoke 1)")
        ap.add_argument("--configs", default=None, help=f"comma-separated subset of: {', '.join(CONFIGS)}")
        ap.add_argument("--timeout", type=float, default=3600, help="seconds one configuration's process may take")
        ap.add_argument("--work", type=Path, default=None, help="folder for the random model and bundles (kept)")

    def worker(self, argv: list[str]) -> dict:
        config, bundle, device, batches, steps, warmup = argv
        try:
            return worker(config, bundle, device, [int(b) for b in batches.split(",")], int(steps), int(warmup))
        except Exception as e:  # one failing configuration must not sink the others' numbers
            return {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}

    def run(self, args: argparse.Namespace) -> dict | None:
        return _run(self, args)

    def result_name(self, args: argparse.Namespace, payload: dict) -> str:
        st = payload["settings"]
        smoke, gpu = st["smoke"], st["gpu"]
        tag = (
            "smoke_cpu" if smoke and not gpu else re.sub(r"[^A-Za-z0-9]+", "_", gpu or st["device"]).strip("_").lower()
        )
        return f"gpu_train_{tag}" + ("_quick" if args.quick and not smoke else "")

    def out_dir(self, args: argparse.Namespace) -> Path | None:
        if args.out is None and args.smoke and self.tmp is not None:
            return Path(self.tmp.name) / "results"
        return args.out

    def table(self, payload: dict, args: argparse.Namespace):
        rows = []
        for name, per in payload["results"].items():
            if "error" in per:
                rows.append([name, None, f"FAILED: {per['error'][:120]}", None, None, None])
                continue
            for batch, r in per.items():
                share = r["share_of_spec_bf16_peak"] or r["share_of_measured_bf16_matmul"]
                rows.append(
                    [
                        name,
                        batch,
                        r["tokens_per_s"]["median"],
                        f"{r.get('speed_vs_peft_bnb', 0):.2f}x",
                        r["peak_mib"]["median"],
                        f"{100 * share:.2f}%",
                    ]
                )
        return rows, [
            ("config", ""),
            ("batch", ""),
            ("tokens/s", ".0f"),
            ("vs peft+bnb", ""),
            ("peak MiB", ".0f"),
            ("of bf16 peak", ""),
        ]

    def summary(self, payload: dict, args: argparse.Namespace) -> list[str]:
        spec, measured = payload["bf16_peak_tflops_spec"], payload["bf16_matmul_tflops_measured"]
        lines = [f"bf16 matmul measured here: {measured:.3g} TFLOP/s" + (f"; spec peak {spec:.0f}" if spec else "")]
        for batch, t in payload["targets"].items():
            lines.append(
                f"target at {batch}: {t['speedup']:.2f}x of {t['needed_speedup']:.0f}x needed "
                f"({t['best_config']}) -> {'met' if t['met'] else 'NOT met'}; losses within "
                f"{100 * t['loss_max_rel_diff']:.2f}% of peft+bnb"
            )
        return lines


def _run(suite: GpuTrain, args: argparse.Namespace) -> dict | None:
    import numpy as np
    import torch

    smoke = args.smoke
    if args.device is None and not smoke and not torch.cuda.is_available():
        print(
            "no CUDA device here: nothing measured (a GPU benchmark; --smoke checks it on the CPU, "
            "--device cpu measures the CPU anyway)"
        )
        return None
    device = args.device or ("cuda:0" if torch.cuda.is_available() else "cpu")
    arch = TINY if smoke else SMOLLM2
    batches = [int(b) for b in (args.batches or ("2,4" if smoke else "8,64" if args.quick else "8,32,64")).split(",")]
    reps = args.reps or (1 if smoke or args.quick else 3)
    steps = args.steps or (2 if smoke else 5 if args.quick else 10)
    warmup = args.warmup or (1 if smoke else 3)
    if args.configs:
        names = [c.strip() for c in args.configs.split(",") if c.strip()]
        unknown = [c for c in names if c not in CONFIGS]
        if unknown:
            raise SystemExit(f"--configs: unknown configuration(s) {unknown}; choose among {', '.join(CONFIGS)}")
    elif smoke or not device.startswith("cuda"):
        names = list(CPU_CONFIGS)
    else:
        names = list(CONFIGS)
    if BASELINE not in names:
        names.append(BASELINE)
    tmp = tempfile.TemporaryDirectory(prefix="pocketpeft-gpu-train-") if (smoke or args.work is None) else None
    suite.tmp = tmp
    work = args.work or Path(tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    print(f"exporting the random {'tiny' if smoke else 'SmolLM2-shaped'} model to {work} …", flush=True)
    bundles = export_bundles(work, arch, max(batches))
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for rep in range(reps):
        for name in names:
            print(f"[{rep + 1}/{reps}] {name}", flush=True)
            wargs = [name, bundles[CONFIGS[name][1]], device, ",".join(map(str, batches)), str(steps), str(warmup)]
            try:
                runs[name].append(suite.run_worker(wargs, timeout=args.timeout))
            except Exception as e:  # a crash or a timeout of one configuration: report it, keep the rest
                runs[name].append({"error": f"{type(e).__name__}: {str(e)[-2000:]}", "traceback": ""})
    n_params = frozen_params(arch)
    measured = bf16_matmul_tflops(device, 256 if smoke else 8192, 0.5 if smoke else 3.0)
    gpu = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else None
    spec = next((v for k, v in SPEC_BF16_TFLOPS.items() if gpu and k in gpu), None)
    results: dict[str, dict] = {}
    for name, rs in runs.items():
        errors = [r["error"] for r in rs if "error" in r]
        if errors:
            results[name] = {"error": errors[0], "traceback": next(r["traceback"] for r in rs if "error" in r)}
            continue
        per = {}
        for batch in batches:
            cell = [r[str(batch)] for r in rs]
            tok = batch * SEQ
            tps = [tok * len(c["step_seconds"]) / sum(c["step_seconds"]) for c in cell]
            tflops = 4 * n_params * summarize(tps)["median"] / 1e12
            per[str(batch)] = {
                "tokens_per_s": summarize(tps),
                "step_ms": 1000 * tok / summarize(tps)["median"],
                "peak_mib": summarize([c["peak_mib"] for c in cell]),
                "peak_kind": cell[0]["peak_kind"],
                "achieved_tflops": tflops,
                "share_of_measured_bf16_matmul": tflops / measured,
                "share_of_spec_bf16_peak": tflops / spec if spec else None,
                "warmup_seconds": summarize([c["warmup_seconds"] for c in cell]),
                "losses_first_run": cell[0]["losses"],
            }
        results[name] = per
    base = results.get(BASELINE, {})
    for name, per in results.items():
        for batch, r in per.items():
            if batch in base and isinstance(r, dict) and "tokens_per_s" in r and "tokens_per_s" in base[batch]:
                r["speed_vs_peft_bnb"] = r["tokens_per_s"]["median"] / base[batch]["tokens_per_s"]["median"]
                r["memory_vs_peft_bnb"] = r["peak_mib"]["median"] / base[batch]["peak_mib"]["median"]
                ours, theirs = np.array(r["losses_first_run"]), np.array(base[batch]["losses_first_run"])
                r["loss_max_rel_diff_vs_peft_bnb"] = float(np.max(np.abs(ours - theirs) / np.abs(theirs)))
    targets = {}
    for batch, need in (("8", 5.0), ("64", 3.0)):
        got = {
            n: per[batch]["speed_vs_peft_bnb"]
            for n, per in results.items()
            if n.startswith("pocketpeft") and batch in per and "speed_vs_peft_bnb" in per[batch]
        }
        if got:
            best = max(got, key=got.get)
            targets[f"batch {batch}"] = {
                "needed_speedup": need,
                "best_config": best,
                "speedup": got[best],
                "met": got[best] >= need,
                "loss_max_rel_diff": results[best][batch]["loss_max_rel_diff_vs_peft_bnb"],
            }
    payload = {
        "settings": {
            "model": "SmolLM2-135M-shaped, random weights" if not smoke else "tiny Llama, random weights",
            "arch": arch,
            "frozen_matmul_params": n_params,
            "lora_r": RANK,
            "lora_alpha": 16,
            "target_modules": MODULES,
            "seq_len": SEQ,
            "batches": batches,
            "repetitions": reps,
            "quick": args.quick,
            "timed_steps": steps,
            "warmup_steps": warmup,
            "compute_dtype": "bfloat16",
            "device": device,
            "gpu": gpu,
            "smoke": smoke,
        },
        "bf16_matmul_tflops_measured": measured,
        "bf16_peak_tflops_spec": spec,
        "results": results,
        "target": "pocketpeft's CUDA path >= 5x peft+bnb tokens/s at batch 8 and >= 3x at batch 64, "
        "with matching loss curves",
        "targets": targets,
    }
    if tmp is not None and not smoke:  # the random model and its bundles; a smoke result is written into it
        tmp.cleanup()
    return payload


if __name__ == "__main__":
    main(GpuTrain())
