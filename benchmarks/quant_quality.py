"""What quantizing the frozen linears costs: perplexity and next-token accuracy of SmolLM2 at
f32, f16, q8_0, q4_0 and nf4 on held-out chitchat text (no adapter).

The f32 reference is the embedded GGUF dequantized (its linears are Q4_1 at source: the original
bf16 weights are not available offline), so each format's cost is measured relative to it.

    python -m benchmarks.quant_quality [--quick]
"""

from __future__ import annotations

import argparse
import math
import time

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


class QuantQuality(Suite):
    name, module, description = "quant_quality", "benchmarks.quant_quality", __doc__
    quick_help = "150 messages instead of 600"

    def run(self, args: argparse.Namespace) -> dict:
        from pocketpeft.corpus import general_texts
        from pocketpeft.reference.loading import load_base
        from pocketpeft.reference.model import build_from_float
        from pocketpeft.reference.quant import storage_bytes
        from pocketpeft.text import pack_rows

        base = load_base("smollm2")
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
        ref = results["f32"]
        for r in results.values():
            r["perplexity_vs_f32"] = r["perplexity"] / ref["perplexity"] - 1
            r["top3_points_vs_f32"] = 100 * (r["top3"] - ref["top3"])
        return {
            "settings": {
                "texts": "chitchat, other people's messages (general_texts seed=1)",
                "messages": len(texts),
                "seq_len": 64,
                "reference": "embedded SmolLM2 GGUF (Q4_1 linears) dequantized to f32",
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
