"""Whole-loop memory: the Personalizer as an app runs it (text store, a gated update, serving
suggestions), peak RSS per configuration, each in its own process, same run:

- ``device``: the device path, torch unimportable (as on a phone): a split bundle (LoRA on the
  top 8 layers, all linears, r=16), updates on onnxruntime (prefix outputs cached, suffix
  trained), suggestions from llama.cpp.
- ``torch``: the same loop on the torch reference (training and serving), the all-layer default
  LoRA bundle.
- ``peft``: PEFT + transformers eager training alone (all-layer q/k/v/o r=8), for scale.

Target (issue: the device path): the device loop peaks at <= 512 MiB for SmolLM2 q4_0.
RSS is sampled at each stage (after loading, after each stage of the update, after serving) so
the report says where memory goes. ``python -m benchmarks.loop_memory [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from .common import Column, Suite, main

TARGET_MIB = 512
BATCH, SEQ = 8, 64


def rss_mib() -> float:
    """Current resident set size (VmRSS) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def bundles(cache: Path) -> dict[str, Path]:
    """The split personal bundle (torch, onnx, gguf) and the default all-layer bundle (torch,
    gguf), exported once under ``cache``."""
    import pocketpeft as pp
    from pocketpeft.config import personal_lora
    from pocketpeft.errors import PocketPeftError

    out = {}
    specs = {
        "split": dict(
            lora=personal_lora(30),
            targets=["torch", "onnx", "gguf"],
            onnx=pp.export.OnnxOptions(rows=2, q4="int8"),
        ),
        "whole": dict(lora=pp.LoraConfig(), targets=["torch", "gguf"]),
    }
    for name, kw in specs.items():
        path = cache / "bundles" / f"loop-{name}-q4_0"
        try:
            pp.Bundle(path).verify()
        except PocketPeftError:
            print(f"exporting {path.name} (once)", file=sys.stderr)
            pp.export("smollm2", path, quant="q4_0", seq_len=SEQ, batch_size=BATCH, **kw)
        out[name] = path
    return out


def worker_loop(kind: str, bundle: str, store: str, texts: str, seconds: float, n_prefixes: int) -> dict:
    """One Personalizer loop; ``kind`` is ``device`` (torch blocked, onnxruntime + llama.cpp)
    or ``torch`` (the reference for both). ``texts``: a JSON file ``{"train": [...], "test": [...]}``
    (the parent reads the corpus: its 258k messages would cost this process ~150 MiB)."""
    if kind == "device":
        from .common import block_modules

        block_modules("torch")
    import shutil

    import numpy as np

    import pocketpeft as pp
    from pocketpeft.procinfo import peak_rss_mib
    from pocketpeft.runtime.keyboard.personalizer import Personalizer

    stages: dict[str, float] = {"start": rss_mib()}
    data = json.loads(Path(texts).read_text(encoding="utf-8"))
    train, test = data["train"], data["test"]
    shutil.rmtree(store, ignore_errors=True)
    backend, serve = ("onnxruntime", "llamacpp") if kind == "device" else ("torch", "torch")
    sess = pp.runtime.open(bundle, backend=backend)
    stages["train_session"] = rss_mib()
    serving = pp.runtime.open(bundle, backend=serve, need_train=False)
    stages["serve_session"] = rss_mib()
    p = Personalizer(sess, store, serve_session=serving)
    p.observe(train)
    stages["observed"] = rss_mib()

    def tell(d: dict) -> None:
        stages[f"update:{d['stage']}"] = rss_mib()

    t0 = time.perf_counter()
    rep = p.update(max_seconds=seconds, progress=tell)
    update_s = time.perf_counter() - t0
    prefixes = []
    for msg in test:
        words = msg.split()
        prefixes += [" ".join(words[:i]) + " " for i in range(1, len(words))]
        if len(prefixes) >= n_prefixes:
            break
    ms = []
    for pre in prefixes[:n_prefixes]:
        t = time.perf_counter()
        p.suggest(pre, 3)
        ms.append(1000 * (time.perf_counter() - t))
    stages["served"] = rss_mib()
    out = {
        "kind": kind,
        "backend": f"{sess.backend.name}:{sess.backend.device}",
        "serving": f"{p.serve_session.backend.name}:{p.serve_session.backend.device}",
        "accepted": rep.accepted,
        "reason": rep.reason,
        "steps": rep.steps,
        "update_seconds": round(update_s, 2),
        "suggest_ms_p50": float(np.percentile(ms, 50)) if ms else None,
        "suggest_ms_p95": float(np.percentile(ms, 95)) if ms else None,
        "rss_mib_by_stage": {k: round(v, 1) for k, v in stages.items()},
        "peak_rss_mib": peak_rss_mib(),
        "torch_imported": "torch" in sys.modules,
        "hidden_cache": p.hidden_cache.stats() if p.hidden_cache is not None else None,
    }
    p.close()
    return out


def worker_peft(folder: str, seconds: float, texts: str) -> dict:
    """PEFT + transformers eager training on the sender's text for ``seconds``."""
    import numpy as np
    import peft
    import torch
    import transformers

    from pocketpeft.procinfo import peak_rss_mib
    from pocketpeft.text import pack_rows
    from pocketpeft.tokenizer import Tokenizer

    train = json.loads(Path(texts).read_text(encoding="utf-8"))["train"]
    tok = Tokenizer.from_file(Path(folder) / "tokenizer.json")
    x, y = pack_rows(tok, train, SEQ)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    model = peft.get_peft_model(
        hf, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    )
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-3)
    model.train()
    rng = np.random.default_rng(0)
    t0, steps = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        idx = rng.choice(len(x), min(BATCH, len(x)), replace=False)
        logits = model(input_ids=torch.from_numpy(x[idx])).logits
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), torch.from_numpy(y[idx]).reshape(-1), ignore_index=-100
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        steps += 1
    return {"kind": "peft", "steps": steps, "peak_rss_mib": peak_rss_mib(), "torch_imported": True}


class LoopMemory(Suite):
    name = "loop_memory"
    module = "benchmarks.loop_memory"
    description = __doc__
    quick_help = "15-second updates and 20 suggestions instead of 60 s and 200"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--sender", default=None, help="chitchat sender (default: the demo's)")
        parser.add_argument("--kinds", default="device,torch,peft", help="which loops to run")

    def worker(self, argv: list[str]) -> dict[str, Any]:
        if argv[0] == "peft":
            return worker_peft(argv[1], float(argv[2]), argv[3])
        return worker_loop(argv[0], argv[1], argv[2], argv[3], float(argv[4]), int(argv[5]))

    def run(self, args: argparse.Namespace) -> dict[str, Any]:
        import tempfile

        from pocketpeft.apps.demo import default_sender
        from pocketpeft.corpus import sender_split
        from pocketpeft.fsutil import cache_dir

        from .train_speed import hf_folder

        seconds, n = (15.0, 20) if args.quick else (60.0, 200)
        sender = args.sender or default_sender()
        paths = bundles(cache_dir())
        runs: dict[str, dict] = {}
        with tempfile.TemporaryDirectory() as tmp:
            train, test = sender_split(sender)
            texts = Path(tmp) / "texts.json"
            texts.write_text(json.dumps({"train": train, "test": test}), encoding="utf-8")
            for kind in args.kinds.split(","):
                print(f"loop_memory: {kind} ({seconds:g} s update)…", file=sys.stderr)
                if kind == "peft":
                    folder = hf_folder(cache_dir() / "hf-smollm2")
                    runs[kind] = self.run_worker(["peft", str(folder), str(seconds), str(texts)])
                else:
                    bundle = paths["split" if kind == "device" else "whole"]
                    runs[kind] = self.run_worker([kind, str(bundle), f"{tmp}/{kind}", str(texts), str(seconds), str(n)])
        dev = runs.get("device")
        verdict = None if dev is None else dev["peak_rss_mib"] <= TARGET_MIB
        return {
            "sender": sender,
            "update_seconds": seconds,
            "runs": runs,
            "targets": {
                f"device loop peak RSS <= {TARGET_MIB} MiB": verdict,
            },
        }

    def table(self, payload: dict[str, Any], args: argparse.Namespace):
        cols: list[Column] = [
            ("loop", ""),
            ("peak RSS MiB", ".0f"),
            ("steps", "d"),
            ("accepted", ""),
            ("suggest p50 ms", ".1f"),
            ("torch", ""),
        ]
        rows = [
            [
                k,
                r["peak_rss_mib"],
                r["steps"],
                str(r.get("accepted", "-")),
                r.get("suggest_ms_p50"),
                str(r["torch_imported"]),
            ]
            for k, r in payload["runs"].items()
        ]
        return rows, cols

    def summary(self, payload: dict[str, Any], args: argparse.Namespace) -> list[str]:
        lines = [
            f"{k}: {'met' if v else 'NOT met' if v is not None else 'not measured'}"
            for k, v in payload["targets"].items()
        ]
        dev = payload["runs"].get("device")
        if dev:
            lines.append("device RSS by stage (MiB): " + json.dumps(dev["rss_mib_by_stage"]))
        return lines


if __name__ == "__main__":
    main(LoopMemory())
