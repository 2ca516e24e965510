"""What quantizing the frozen linears costs: perplexity and next-token accuracy of an embedded
base (SmolLM2 by default, ``--base gemma3-270m``) at f32, f16, q8_0, q4_0 and nf4 on held-out
chitchat text (no adapter), and llama.cpp running the source GGUF itself on the same rows.

The f32 reference is the embedded GGUF dequantized (SmolLM2's linears are Q4_1 at source,
Gemma 3 270M's Q4_K / Q6_K / Q5_0 / Q8_0: the original bf16 weights are not available offline),
so f32 holds exactly the source file's values and each bundle format's cost is what requantizing
them costs. The ``llama.cpp source`` row is the source file as llama.cpp runs it (its own
k-quant kernels, activations quantized to 8 bits for the quantized matmuls).

    python -m benchmarks.quant_quality [--quick] [--base gemma3-270m]
"""

from __future__ import annotations

import argparse
import math
import time
from collections import Counter

from benchmarks.common import Suite, main


def evaluate(model, inputs, labels, batch: int = 8) -> dict:
    import torch
    import torch.nn.functional as F

    loss = n = top1 = top3 = 0
    with torch.no_grad():
        for s in range(0, len(inputs), batch):
            ids, lab = torch.from_numpy(inputs[s : s + batch]), torch.from_numpy(labels[s : s + batch])
            lg = model(ids)
            valid = lab != -100
            lg, tg = lg[valid], lab[valid]
            loss += float(F.cross_entropy(lg, tg, reduction="sum"))
            top = lg.topk(3, -1).indices
            top1 += int((top[:, 0] == tg).sum())
            top3 += int((top == tg[:, None]).any(-1).sum())
            n += tg.numel()
    return {"loss": loss / n, "perplexity": math.exp(loss / n), "top1": top1 / n, "top3": top3 / n, "tokens": n}


def llamacpp_source(path: str, inputs, labels) -> dict:
    """The same metrics from llama.cpp running the GGUF at ``path`` on each row (a fresh context
    per row, every position's logits)."""
    import llama_cpp
    import numpy as np
    import torch

    from pocketpeft.runtime.backends.llamacpp_log import llama_log

    with llama_log():
        llm = llama_cpp.Llama(path, n_ctx=inputs.shape[1] + 8, n_batch=inputs.shape[1], logits_all=True, verbose=False)

    class Rows:
        def __call__(self, ids):
            out = []
            for row in ids.numpy():
                llm.reset()
                llm.eval(row.tolist())
                out.append(np.array(llm.scores[: len(row)], dtype=np.float32))
            return torch.from_numpy(np.stack(out))

    return evaluate(Rows(), inputs, labels)


class QuantQuality(Suite):
    name, module, description = "quant_quality", "benchmarks.quant_quality", __doc__
    quick_help = "150 messages instead of 600"

    def add_arguments(self, ap: argparse.ArgumentParser) -> None:
        ap.add_argument(
            "--base", default="smollm2", help="smollm2 (default), gemma3-270m, a .gguf file or an HF model folder"
        )
        ap.add_argument("--no-llamacpp", action="store_true", help="skip the llama.cpp row")

    def result_name(self, args: argparse.Namespace, payload: dict) -> str:
        from pathlib import Path

        name = self.name if args.base == "smollm2" else f"{self.name}_{Path(args.base).stem}"
        return f"{name}_quick" if args.quick else name

    def run(self, args: argparse.Namespace) -> dict:
        from pocketpeft.corpus import general_texts
        from pocketpeft.reference.loading import load_base
        from pocketpeft.reference.model import build_from_float
        from pocketpeft.reference.quant import storage_bytes
        from pocketpeft.text import pack_rows

        base = load_base(args.base)
        texts = general_texts(n=150 if args.quick else 600, seed=1)
        inputs, labels = pack_rows(base.tokenizer, texts, 64)
        results = {}
        for fmt in ("f32", "f16", "q8_0", "q4_0", "nf4"):
            t0 = time.perf_counter()
            model = build_from_float(base.config, base.state_dict, fmt)
            lin_bytes = sum(
                storage_bytes(fmt, (m.out_features, m.in_features))
                for m in model.modules()
                if hasattr(m, "in_features") and hasattr(m, "fmt")
            )
            r = evaluate(model, inputs, labels)
            r["linear_weight_mib"] = lin_bytes / 2**20
            r["seconds"] = time.perf_counter() - t0
            results[fmt] = r
            print(f"{fmt}: done in {r['seconds']:.0f} s", flush=True)
            del model
        if not args.no_llamacpp and (args.base in ("smollm2", "gemma3-270m") or args.base.endswith(".gguf")):
            import gguf

            from pocketpeft.modelpkg import gemma3_270m_path
            from pocketpeft.reference.loading import default_model_path

            named = {"smollm2": default_model_path, "gemma3-270m": gemma3_270m_path}
            path = str(named[args.base]() if args.base in named else args.base)
            t0 = time.perf_counter()
            r = llamacpp_source(path, inputs, labels)
            linears = ("attn_q.", "attn_k.", "attn_v.", "attn_output.", "ffn_gate.", "ffn_up.", "ffn_down.")
            r["linear_weight_mib"] = (
                sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors if any(k in t.name for k in linears)) / 2**20
            )
            r["seconds"] = time.perf_counter() - t0
            results["llama.cpp source"] = r
            print(f"llama.cpp on the source file: done in {r['seconds']:.0f} s", flush=True)
        ref = results["f32"]
        for r in results.values():
            r["perplexity_vs_f32"] = r["perplexity"] / ref["perplexity"] - 1
            r["top3_points_vs_f32"] = 100 * (r["top3"] - ref["top3"])
        return {
            "settings": {
                "texts": "chitchat, other people's messages (general_texts seed=1)",
                "messages": len(texts),
                "seq_len": 64,
                "base": args.base,
                "source_types": dict(sorted(Counter(base.source_quant.values()).items())),
                "reference": f"embedded {args.base} GGUF dequantized to f32 (the source file's exact values)",
            },
            "results": results,
        }

    def table(self, payload: dict, args: argparse.Namespace):
        rows = [
            [fmt, r["perplexity"], 100 * r["top1"], 100 * r["top3"], r["linear_weight_mib"]]
            for fmt, r in payload["results"].items()
        ]
        return rows, [("format", ""), ("ppl", ".3f"), ("top-1 %", ".2f"), ("top-3 %", ".2f"), ("linears MiB", ".0f")]


if __name__ == "__main__":
    main(QuantQuality())
