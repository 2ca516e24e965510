"""Per-keystroke suggestion latency: ``Session.suggest`` per backend against transformers eager
and raw llama-cpp-python, on SmolLM2 at q4_0 with a LoRA adapter.

Held-out chitchat messages (the latest messages of the most prolific senders) are typed
character by character; before every keystroke the backend is asked for 3 next-word
suggestions. Every configuration runs in its own process (its peak RSS is the serving memory),
interleaved over repetitions, in one run:

- ``pocketpeft <backend>``: ``Session.suggest(prefix, 3)`` (KV cache kept across keystrokes);
  the decoder's forward time is measured inside, so model time and the predictor's Python
  overhead are told apart, with the number of forward passes per keystroke;
- ``transformers eager``: HF ``LlamaForCausalLM`` + the same adapter through ``peft``, one
  forward of the whole prefix per keystroke (next *token* only, no cache);
- ``llama-cpp-python raw``: ``Llama.eval`` of the tokens not yet in its KV cache, one forward per
  keystroke (next token only), the adapter converted to GGUF LoRA;
- ``pocketpeft llamacpp, f32 GGUF``: llama.cpp over a GGUF holding the exact float32 values of
  the same q4_0 weights (``GgufOptions(linear="f32")``), so it multiplies in float32 as torch
  does instead of against 8-bit-quantized activations, at several times the bytes per token
  (``--no-f32-gguf`` skips it), with and without prefetch;
- ``pocketpeft <backend> + prefetch``: the same keystrokes typed with an idle gap between them
  (``--typing-gap-ms``, default 150 ms: a brisk phone typist), spent in ``Session.prefetch`` as
  a keyboard's idle loop would. A prefetch forward pass still running when the next key arrives
  is charged to that keystroke's latency, so the figure is what the user would wait.

The top-3 words of every backend are compared with the torch backend's (the reference) on the
same keystrokes. Target (issue 4): p50 <= 10 ms on the best backend, top-3 equal to torch's on
>= 95% of keystrokes.

**The keyboard, judged by the user** (``--keyboard``, on by default where llama.cpp runs): a
simulated user types the same messages in real time and taps a suggestion as soon as it is the
word being typed (:func:`pocketpeft.runtime.keystrokes.simulate_typing`, suggestions before
every keystroke); each configuration reports next-word top-1/top-3 accuracy and keystroke
savings against the text the user actually typed, next to the latency of every keystroke (the
agreement with torch stays, as a diagnostic, on the keystrokes both typed). Configurations, on the
q4_0 GGUF and on the f32 GGUF, both with the adapter:

- ``unbounded``: ``Session.suggest`` with no deadline, keystrokes back to back;
- ``unbounded + prefetch``: the same with ``Session.prefetch`` in a 100 ms typing gap;
- ``deadline D ms, G ms gap``: ``Session.suggest(prefix, 3, deadline_ms=D)`` with the predictor's
  background search working in the G ms between keystrokes (D in 16, 8; G in 150, 100);
- ``deadline D ms, no idle``: a keystroke every D ms, each answered within its D ms: the device
  has no time but the keystrokes' own (the background search runs in it; a pass it starts runs
  on while the next keystrokes are answered from the memo).

Target (issue 19): on the q4_0 GGUF at a 16 ms deadline and a 100 ms gap, p99 <= 16 ms and
keystroke savings within 1 point of the unbounded search on the same file.

    python -m benchmarks.suggest_latency [--quick] [--backends torch,llamacpp,executorch,onnxruntime]
                                         [--adapter DIR] [--base smollm2] [--out DIR] [--no-keyboard]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # torch and llama.cpp share libgomp: no spinning
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from benchmarks.common import Suite, main, peak_rss_mib, summarize  # noqa: E402

RANK = 8
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]
#: backends this suite serves suggestions from
SERVING = ("torch", "executorch", "onnxruntime", "onnxruntime-infer", "llamacpp")
WARMUP = "see you at the game tonight"
F32_GGUF = "pocketpeft llamacpp, f32 GGUF (exact weights)"


def keystroke_prefixes(messages: list[str]) -> list[str]:
    """Every prefix a user sees before a keystroke: for each message (whitespace collapsed), its
    first 0, 1, ..., len-1 characters."""
    out = []
    for m in messages:
        msg = " ".join(m.split())
        out += [msg[:i] for i in range(len(msg))]
    return out


def held_out_messages(n_messages: int, max_chars: int = 80, n_senders: int = 4) -> list[str]:
    """The latest (test-split) messages of the most prolific chitchat senders, round robin,
    those of 8..``max_chars`` characters."""
    from pocketpeft.corpus import sender_split, top_senders

    pools = []
    for s in top_senders()[:n_senders]:
        _, test = sender_split(s)
        pools.append([t for t in test if 8 <= len(" ".join(t.split())) <= max_chars])
    out: list[str] = []
    i = 0
    while len(out) < n_messages and any(i < len(p) for p in pools):
        out += [p[i] for p in pools if i < len(p)]
        i += 1
    return out[:n_messages]


def random_adapter(bundle_path: Path, out: Path, seed: int = 0, std: float = 0.02) -> Path:
    """A LoRA adapter for the bundle with its initial ``lora_A`` and random, nonzero ``lora_B``
    (so every backend really applies it), saved in PEFT format at ``out`` (kept if present)."""
    if (out / "adapter_model.safetensors").is_file():
        return out
    import torch

    from pocketpeft.adapter import Adapter, save_adapter
    from pocketpeft.manifest import Bundle

    b = Bundle(bundle_path)
    gen = torch.Generator().manual_seed(seed)
    tensors = {
        k: (torch.randn(v.shape, generator=gen) * std if ".lora_B" in k else torch.from_numpy(v.copy()))
        for k, v in b.initial_adapter().tensors.items()
    }
    m = b.manifest
    save_adapter(Adapter(m.lora, tensors, m.base_sha256, {"pocketpeft.bench": f"random lora_B seed {seed}"}), out)
    return out


# ---------------------------------------------------------------------------- workers
class _Timed:
    """Wraps a decoder (or the backend's ``logits``) to add up the seconds spent in the model."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def wrap(self, fn):
        def timed(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.seconds += time.perf_counter() - t

        return timed


def worker_session(bundle: str, backend: str, adapter: str, prefixes: list[str], gap_ms: float = 0.0) -> dict:
    import pocketpeft as pp

    t0 = time.perf_counter()
    sess = pp.runtime.open(bundle, backend=backend, adapter=adapter, need_train=False)
    load_s = time.perf_counter() - t0
    be, clock = sess.backend, _Timed()
    make = getattr(be, "decoder", None)
    if make is not None:

        def decoder():
            d = make()
            d.extend = clock.wrap(d.extend)
            if hasattr(d, "branch_logits"):
                d.branch_logits = clock.wrap(d.branch_logits)
            return d

        be.decoder = decoder
    be.logits = clock.wrap(be.logits)
    t0 = time.perf_counter()
    sess.suggest(WARMUP[:10], 3)  # builds the predictor's vocabulary tables once
    first_s = time.perf_counter() - t0
    for i in range(len(WARMUP)):
        sess.suggest(WARMUP[:i], 3)
    pred = sess.predictor
    ms, model_ms, forwards, tokens, top3, prefetched = [], [], [], [], [], []
    late = 0.0  # ms the idle-time prefetch ran past the next keystroke: the user waits for it
    for p in prefixes:
        clock.seconds = 0.0
        t = time.perf_counter()
        words = sess.suggest(p, 3)
        ms.append(1000 * (time.perf_counter() - t) + late)
        model_ms.append(1000 * clock.seconds + late)
        forwards.append(pred.last_forwards)
        tokens.append(pred.last_forward_tokens)
        top3.append(words)
        if gap_ms > 0:
            t = time.perf_counter()
            prefetched.append(sess.prefetch(p, 3, seconds=gap_ms / 1000))
            late = max(0.0, 1000 * (time.perf_counter() - t) - gap_ms)
    return {
        "ms": ms,
        "model_ms": model_ms,
        "forwards": forwards,
        "forward_tokens": tokens,
        "top3": top3,
        "prefetch_forwards": prefetched,
        "typing_gap_ms": gap_ms,
        "load_seconds": load_s,
        "first_suggest_seconds": first_s,
        "peak_rss_mib": peak_rss_mib(),
    }


def worker_typist(bundle: str, adapter: str, messages: list[str], gap_ms: float, deadline_ms: float, mode: str) -> dict:
    """A user typing ``messages`` in real time on llama.cpp (see the module docstring): a keystroke
    every ``gap_ms`` (0: back to back), suggestions with ``deadline_ms`` (0: none), ``mode``
    ``background`` (the predictor's background search), ``prefetch`` (``Session.prefetch`` in
    the gap; a pass running past the next keystroke is charged to it) or ``none``."""
    import pocketpeft as pp
    from pocketpeft.runtime.keystrokes import simulate_typing

    t0 = time.perf_counter()
    sess = pp.runtime.open(bundle, backend="llamacpp", adapter=adapter, need_train=False)
    load_s = time.perf_counter() - t0
    pred = sess.predictor
    pred.background = mode == "background"
    for i in range(len(WARMUP)):  # the vocabulary tables, the cost model, the KV cache
        sess.suggest(WARMUP[:i], 3)
    pred.reset()
    gap, deadline = gap_ms / 1000, (deadline_ms or None)
    ms, complete, forwards, visited = [], [], [], []
    state = {"next": time.perf_counter(), "late": 0.0}

    def suggest(prefix: str, k: int) -> list[str]:
        wait = state["next"] - time.perf_counter()
        if wait > 0:
            time.sleep(wait)  # the user's typing gap: the background search works meanwhile
        t = time.perf_counter()
        words = sess.suggest(prefix, k, deadline_ms=deadline)
        ms.append(1000 * (time.perf_counter() - t) + state["late"])
        complete.append(words.complete)
        forwards.append(words.forwards)
        visited.append([prefix, list(words)])
        state["next"], state["late"] = t + gap, 0.0
        if mode == "prefetch" and gap > 0:
            t1 = time.perf_counter()
            sess.prefetch(prefix, 3, seconds=max(0.0, state["next"] - t1))
            state["late"] = max(0.0, 1000 * (time.perf_counter() - state["next"]))
        return words

    metrics = simulate_typing(suggest, messages, 3, every_key=True)
    pred.close()
    return {
        "ms": ms,
        "complete": complete,
        "forwards": forwards,
        "visited": visited,
        "metrics": metrics,
        "background_forwards": pred.background_forwards,
        "typing_gap_ms": gap_ms,
        "deadline_ms": deadline_ms,
        "mode": mode,
        "load_seconds": load_s,
        "peak_rss_mib": peak_rss_mib(),
    }


def keyboard_configs(q4: Path, f32: Path | None, adapter: Path, quick: bool) -> list[tuple[str, list[str]]]:
    """(name, worker args) of the keyboard configurations (see the module docstring)."""
    files = [("q4_0 GGUF", q4)] + ([("f32 GGUF", f32)] if f32 is not None else [])
    out = []
    for label, path in files:
        rows = [("unbounded", 0, 0, "none"), ("unbounded + prefetch, 100 ms gap", 100, 0, "prefetch")]
        for d in (16, 8):
            rows += [(f"deadline {d} ms, {g} ms gap", g, d, "background") for g in (150, 100)]
            rows.append((f"deadline {d} ms, no idle", d, d, "background"))
        if quick:
            rows = [r for r in rows if r[0] in ("unbounded", "deadline 16 ms, 100 ms gap", "deadline 16 ms, no idle")]
        out += [
            (f"keyboard {label}: {name}", ["typist", str(path), str(adapter), str(g), str(d), mode])
            for name, g, d, mode in rows
        ]
    return out


def summarize_keyboard(runs: dict[str, list[dict]], reference: dict[str, list[str]] | None) -> dict:
    """Per keyboard configuration: latency over all keystrokes of all repetitions, the user's
    metrics (mean over repetitions; the first one's too), how often the answer was complete, and
    the agreement with torch on the keystrokes both typed."""
    out = {}
    for name, rs in runs.items():
        all_ms = [x for r in rs for x in r["ms"]]
        mean = {
            k: float(np.mean([r["metrics"][k] for r in rs]))
            for k in ("next_word_top1", "next_word_top3", "keystroke_savings")
        }
        res = {
            "latency_ms": percentiles(all_ms),
            "p50_per_rep_ms": summarize([float(np.median(r["ms"])) for r in rs]),
            "p99_per_rep_ms": summarize([float(np.percentile(r["ms"], 99)) for r in rs]),
            "peak_rss_mib": summarize([r["peak_rss_mib"] for r in rs]),
            "load_seconds": summarize([r["load_seconds"] for r in rs]),
            "ms_first_rep": rs[0]["ms"],
            "user": {**mean, "words": rs[0]["metrics"]["words"], "chars": rs[0]["metrics"]["chars"]},
            "user_per_rep": [r["metrics"] for r in rs],
            "complete_share": float(np.mean([c for r in rs for c in r["complete"]])),
            "forwards_per_keystroke_mean": float(np.mean([f for r in rs for f in r["forwards"]])),
            "background_forwards_per_keystroke": float(
                np.sum([r["background_forwards"] for r in rs]) / max(sum(len(r["ms"]) for r in rs), 1)
            ),
            "typing_gap_ms": rs[0]["typing_gap_ms"],
            "deadline_ms": rs[0]["deadline_ms"],
            "mode": rs[0]["mode"],
        }
        if reference:
            both = [(w, reference[p]) for r in rs[:1] for p, w in r["visited"] if p in reference]
            res["top3_equal_to_torch"] = float(np.mean([a == b for a, b in both])) if both else None
        out[name] = res
    return out


def keyboard_targets(kb: dict) -> dict:
    """Issue 19's targets on the q4_0 GGUF: at a 16 ms deadline and a 100 ms typing gap, p99 <= 16
    ms and keystroke savings within 1 point of the unbounded search; and how close the no-idle
    configuration gets."""

    def get(name):
        return kb.get(f"keyboard q4_0 GGUF: {name}")

    bounded, unbounded, no_idle = get("deadline 16 ms, 100 ms gap"), get("unbounded"), get("deadline 16 ms, no idle")
    if bounded is None or unbounded is None:
        return {}
    ksr_gap = 100 * (unbounded["user"]["keystroke_savings"] - bounded["user"]["keystroke_savings"])
    out = {
        "p99_le_16ms": bounded["latency_ms"]["p99"] <= 16.0,
        "p99_ms": bounded["latency_ms"]["p99"],
        "ksr_within_1pt_of_unbounded": ksr_gap <= 1.0,
        "ksr_points_below_unbounded": ksr_gap,
    }
    if no_idle is not None:
        out["no_idle"] = {
            "p99_ms": no_idle["latency_ms"]["p99"],
            "ksr_points_below_unbounded": 100
            * (unbounded["user"]["keystroke_savings"] - no_idle["user"]["keystroke_savings"]),
            "complete_share": no_idle["complete_share"],
        }
    return out


def _time_keystrokes(next_tokens, prefixes: list[str]) -> dict:
    """Warm up on a fixed phrase, then time ``next_tokens(prefix)`` per keystroke (ms)."""
    for i in range(len(WARMUP)):
        next_tokens(WARMUP[:i])
    ms, top3 = [], []
    for p in prefixes:
        t = time.perf_counter()
        top3.append(next_tokens(p))
        ms.append(1000 * (time.perf_counter() - t))
    return {"ms": ms, "top3_tokens": top3}


def worker_hf(folder: str, adapter: str, prefixes: list[str]) -> dict:
    import peft
    import torch
    import transformers

    from pocketpeft.tokenizer import Tokenizer

    torch.set_num_threads(int(os.environ.get("POCKETPEFT_THREADS", "2")))
    t0 = time.perf_counter()
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    model = peft.PeftModel.from_pretrained(hf, adapter).eval()
    tok = Tokenizer.from_file(Path(folder) / "tokenizer.json")
    load_s = time.perf_counter() - t0
    sep = tok.eos_id if tok.eos_id is not None else 0

    def next_tokens(prefix: str) -> list[int]:
        ids = torch.tensor([[sep, *tok.encode(prefix)]])
        with torch.no_grad():
            return model(input_ids=ids).logits[0, -1].topk(3).indices.tolist()

    return {**_time_keystrokes(next_tokens, prefixes), "load_seconds": load_s, "peak_rss_mib": peak_rss_mib()}


def worker_llama_raw(bundle: str, adapter: str, prefixes: list[str]) -> dict:
    import tempfile

    import llama_cpp

    from pocketpeft.formats.gguf_lora import adapter_to_gguf
    from pocketpeft.manifest import Bundle
    from pocketpeft.runtime.backends.llamacpp_backend import base_gguf_path

    b = Bundle(bundle)
    threads = int(os.environ.get("POCKETPEFT_THREADS", "2"))
    with tempfile.TemporaryDirectory() as tmp:
        lora = Path(tmp) / "adapter.gguf"
        adapter_to_gguf(adapter, lora, b.manifest)
        t0 = time.perf_counter()
        llm = llama_cpp.Llama(
            model_path=str(base_gguf_path(b)),
            n_ctx=512,
            n_threads=threads,
            n_threads_batch=threads,
            lora_path=str(lora),
            verbose=False,
        )
        load_s = time.perf_counter() - t0
    sep = llm.token_eos()
    n_vocab = llm.n_vocab()

    def next_tokens(prefix: str) -> list[int]:
        ids = [sep, *llm.tokenize(prefix.encode("utf-8"), add_bos=False, special=False)] if prefix else [sep]
        n, have = 0, llm.n_tokens
        while n < min(have, len(ids) - 1) and llm.input_ids[n] == ids[n]:
            n += 1
        llm.n_tokens = n  # eval() drops the cache from here and evaluates the rest
        llm.eval(ids[n:])
        logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))
        top = np.argpartition(-logits, 3)[:3]
        return top[np.argsort(-logits[top])].tolist()

    return {**_time_keystrokes(next_tokens, prefixes), "load_seconds": load_s, "peak_rss_mib": peak_rss_mib()}


# ---------------------------------------------------------------------------- driver
def percentiles(ms: list[float]) -> dict[str, float]:
    """p50/p95/p99/mean/max of latencies in ms."""
    a = np.asarray(ms, dtype=np.float64)
    return {
        "p50": float(np.percentile(a, 50)),
        "p95": float(np.percentile(a, 95)),
        "p99": float(np.percentile(a, 99)),
        "mean": float(a.mean()),
        "max": float(a.max()),
        "n": int(a.size),
    }


def ensure_bundle(base: str, backends: list[str], root: Path, gguf_linear: str = "native") -> Path:
    """A q4_0 bundle of ``base`` with every target ``backends`` need (cached under ``root``);
    ``gguf_linear="f32"`` writes its GGUF with the exact float32 weights (see the gguf target)."""
    import pocketpeft as pp
    from pocketpeft.export import GgufOptions
    from pocketpeft.registry import backend_target

    targets = ["torch"] + sorted({backend_target(b) for b in backends} - {"torch"})
    tag = base if base == "smollm2" else f"{Path(base).name}"
    path = root / f"{tag}-q4_0-r{RANK}-{'-'.join(targets)}{'' if gguf_linear == 'native' else '-gguf' + gguf_linear}"
    try:
        pp.Bundle(path).verify()
    except pp.PocketPeftError:
        print(f"exporting {path.name} …", flush=True)
        pp.export(
            base,
            path,
            quant="q4_0",
            targets=targets,
            gguf=GgufOptions(linear=gguf_linear),
            lora=pp.LoraConfig(r=RANK, lora_alpha=16, target_modules=MODULES),
        )
    return path


def summarize_runs(runs: dict[str, list[dict]], prefixes: list[str]) -> dict:
    """Per configuration: latency percentiles over all keystrokes of all repetitions, the spread
    of per-repetition p50s, model/overhead split, forwards per keystroke, agreement with torch."""
    ref = runs.get("pocketpeft torch", [{}])[0].get("top3")
    out = {}
    for name, rs in runs.items():
        all_ms = [x for r in rs for x in r["ms"]]
        r0 = rs[0]
        res = {
            "latency_ms": percentiles(all_ms),
            "p50_per_rep_ms": summarize([float(np.median(r["ms"])) for r in rs]),
            "peak_rss_mib": summarize([r["peak_rss_mib"] for r in rs]),
            "load_seconds": summarize([r["load_seconds"] for r in rs]),
            "ms_first_rep": r0["ms"],
        }
        if "model_ms" in r0:
            model = [x for r in rs for x in r["model_ms"]]
            fw = [x for r in rs for x in r["forwards"]]
            tk = [x for r in rs for x in r["forward_tokens"]]
            res["profile"] = {
                "model_ms_mean": float(np.mean(model)),
                "overhead_ms_mean": float(np.mean(all_ms) - np.mean(model)),
                "model_share": float(np.sum(model) / max(np.sum(all_ms), 1e-9)),
                "forwards_per_keystroke_mean": float(np.mean(fw)),
                "forwards_per_keystroke_p95": float(np.percentile(fw, 95)),
                "forward_tokens_per_keystroke_mean": float(np.mean(tk)),
                "keystrokes_without_forward": float(np.mean(np.asarray(fw) == 0)),
                "model_ms_per_forward": float(np.sum(model) / max(np.sum(fw), 1)),
                "model_ms_per_token": float(np.sum(model) / max(np.sum(tk), 1)),
                "first_suggest_seconds": summarize([r["first_suggest_seconds"] for r in rs]),
            }
            if ref is not None:
                same = [a == b for a, b in zip(r0["top3"], ref)]
                res["top3_equal_to_torch"] = float(np.mean(same))
                res["top3_same_words_any_order"] = float(np.mean([set(a) == set(b) for a, b in zip(r0["top3"], ref)]))
                res["top1_equal_to_torch"] = float(np.mean([a[:1] == b[:1] for a, b in zip(r0["top3"], ref)]))
                res["top3_first_rep"] = r0["top3"]
                res["top3_differs_examples"] = [
                    {"prefix": prefixes[i], "torch": ref[i], "this": r0["top3"][i]} for i, s in enumerate(same) if not s
                ][:5]
        out[name] = res
    return out


def best_config(results: dict) -> tuple[str, dict]:
    """The targets hold together on one configuration: the best is the fastest (p50) pocketpeft
    configuration whose top-3 equals torch's on >= 95% of keystrokes (the fastest of all when none
    does); returns its name and which targets it meets."""
    ours = [n for n in results if n.startswith("pocketpeft") and n != "pocketpeft torch"] or [
        n for n in results if n.startswith("pocketpeft")
    ]
    agreeing = [n for n in ours if results[n].get("top3_equal_to_torch", 0.0) >= 0.95]
    best = min(agreeing or ours, key=lambda n: results[n]["latency_ms"]["p50"])
    return best, {
        "p50_le_10ms": results[best]["latency_ms"]["p50"] <= 10.0,
        "top3_agreement_ge_95": results[best].get("top3_equal_to_torch", 0.0) >= 0.95,
    }


class SuggestLatency(Suite):
    name, module, description = "suggest_latency", "benchmarks.suggest_latency", __doc__
    quick_help = "3 short messages, 2 repetitions"

    def add_arguments(self, ap: argparse.ArgumentParser) -> None:
        ap.add_argument(
            "--messages", type=int, default=None, help="held-out messages to type (default 3 quick, 16 full)"
        )
        ap.add_argument("--reps", type=int, default=None, help="repetitions (default 2 quick, 3 full)")
        ap.add_argument("--backends", default="torch,llamacpp", help="pocketpeft backends (torch always runs)")
        ap.add_argument(
            "--prefetch-backends",
            default="llamacpp",
            help="backends also measured with idle-time prefetch between keystrokes ('' for none)",
        )
        ap.add_argument(
            "--no-f32-gguf",
            action="store_true",
            help="skip llama.cpp over the exact float32 GGUF of the same base (run when llamacpp is)",
        )
        ap.add_argument("--typing-gap-ms", type=float, default=150.0, help="idle time between keystrokes for prefetch")
        ap.add_argument(
            "--baselines",
            default=None,
            help="hf (transformers eager + peft), llama_raw; '' for none "
            "(default: both for smollm2, llama_raw for another base)",
        )
        ap.add_argument(
            "--adapter", type=Path, default=None, help="a PEFT adapter for the bundle (default: random nonzero lora_B)"
        )
        ap.add_argument("--base", default="smollm2", help="base model (default the embedded SmolLM2)")
        ap.add_argument(
            "--configs",
            default="",
            help="run only the configurations whose name contains this text (torch, the reference, always runs)",
        )
        ap.add_argument(
            "--no-keyboard",
            action="store_true",
            help="skip the keyboard configurations (a user typing in real time with deadlines, judged by the user's text)",
        )

    def worker(self, argv: list[str]) -> dict:
        if argv[0] == "typist":
            _, bundle, adapter, gap, deadline, mode, msg_file = argv
            msgs = json.loads(Path(msg_file).read_text(encoding="utf-8"))
            return worker_typist(bundle, adapter, msgs, float(gap), float(deadline), mode)
        kind, a, b, c, prefix_file, *gap = argv
        prefixes = json.loads(Path(prefix_file).read_text(encoding="utf-8"))
        if kind == "session":
            return worker_session(a, b, c, prefixes, float(gap[0]) if gap else 0.0)
        return {"hf": lambda: worker_hf(a, c, prefixes), "llama_raw": lambda: worker_llama_raw(a, c, prefixes)}[kind]()

    def run(self, args: argparse.Namespace) -> dict:
        return _run(self, args)

    def table(self, payload: dict, args: argparse.Namespace):
        rows = []

        def pct(x):
            return None if x is None else f"{100 * x:.1f}%"

        for name, r in {**payload["results"], **payload.get("keyboard", {})}.items():
            lat, user = r["latency_ms"], r.get("user", {})
            rows.append(
                [
                    name,
                    lat["p50"],
                    lat["p99"],
                    r["peak_rss_mib"]["median"],
                    pct(user.get("next_word_top1")),
                    pct(user.get("next_word_top3")),
                    pct(user.get("keystroke_savings")),
                    pct(r.get("complete_share")),
                    pct(r.get("top3_equal_to_torch")),
                ]
            )
        return rows, [
            ("config", ""),
            ("p50", ".1f"),
            ("p99", ".1f"),
            ("RSS MiB", ".0f"),
            ("top-1", ""),
            ("top-3", ""),
            ("KSR", ""),
            ("complete", ""),
            ("top3=torch", ""),
        ]

    def summary(self, payload: dict, args: argparse.Namespace) -> list[str]:
        lines = []
        for name, r in payload["results"].items():
            if "profile" in r:
                pr = r["profile"]
                lines.append(
                    f"{name}: model {pr['model_ms_mean']:.1f} ms + overhead "
                    f"{pr['overhead_ms_mean']:.1f} ms per keystroke; "
                    f"{pr['forwards_per_keystroke_mean']:.2f} forwards "
                    f"({pr['forward_tokens_per_keystroke_mean']:.2f} tokens) per keystroke, "
                    f"{pr['model_ms_per_forward']:.1f} ms per forward"
                )
        kt = payload.get("keyboard_targets") or {}
        if kt:
            lines.append(
                f"target (q4_0, 16 ms deadline, 100 ms gap): p99 {kt['p99_ms']:.1f} ms <= 16 ms: "
                f"{'met' if kt['p99_le_16ms'] else 'NOT met'}; keystroke savings "
                f"{kt['ksr_points_below_unbounded']:+.2f} points below unbounded (<= 1): "
                f"{'met' if kt['ksr_within_1pt_of_unbounded'] else 'NOT met'}"
            )
            if "no_idle" in kt:
                n = kt["no_idle"]
                lines.append(
                    f"no idle time (16 ms deadline): p99 {n['p99_ms']:.1f} ms, keystroke savings "
                    f"{n['ksr_points_below_unbounded']:+.2f} points below unbounded, "
                    f"{100 * n['complete_share']:.0f}% of answers complete"
                )
        lines += [f"skipped {b}: {why}" for b, why in payload["settings"]["skipped"].items()]
        return lines


def _run(suite: Suite, args: argparse.Namespace) -> dict:
    import tempfile

    from pocketpeft.errors import ConfigError
    from pocketpeft.fsutil import cache_dir
    from pocketpeft.runtime.selection import probe

    n_msgs = args.messages or (3 if args.quick else 16)
    reps = args.reps or (2 if args.quick else 3)
    backends = ["torch"] + [b for b in dict.fromkeys(args.backends.split(",")) if b and b != "torch"]
    unknown = [b for b in backends if b not in SERVING]
    if unknown:
        raise ConfigError(f"--backends: unknown backend {unknown[0]!r}; expected some of {', '.join(SERVING)}")
    skipped = {b: probe(b).reason for b in backends if not probe(b).available}
    backends = [b for b in backends if b not in skipped]
    chosen = (
        args.baselines if args.baselines is not None else ("hf,llama_raw" if args.base == "smollm2" else "llama_raw")
    )
    baselines = [x for x in chosen.split(",") if x]
    if "llama_raw" in baselines and not probe("llamacpp").available:
        skipped["llama_raw"] = probe("llamacpp").reason
        baselines.remove("llama_raw")
    root = cache_dir() / "bench"
    bundle = ensure_bundle(args.base, backends + (["llamacpp"] if "llama_raw" in baselines else []), root)
    adapter = args.adapter or random_adapter(bundle, bundle.parent / f"{bundle.name}-random-adapter")
    configs: list[tuple[str, list[str]]] = [
        (f"pocketpeft {b}", ["session", str(bundle), b, str(adapter)]) for b in backends
    ]
    gap = args.typing_gap_ms
    configs += [
        (f"pocketpeft {b} + prefetch ({gap:g} ms typing gap)", ["session", str(bundle), b, str(adapter)])
        for b in dict.fromkeys(args.prefetch_backends.split(","))
        if b in backends and gap > 0
    ]
    if "hf" in baselines:
        from benchmarks.train_speed import hf_folder

        if args.base != "smollm2":
            raise ConfigError("--baselines hf needs --base smollm2 (it loads SmolLM2 as an HF folder)")
        folder = hf_folder(root / "smollm2-hf-f32")
        configs.append(
            ("transformers eager + peft (full prefix per keystroke)", ["hf", str(folder), "-", str(adapter)])
        )
    if "llamacpp" in backends and not args.no_f32_gguf:
        exact = ensure_bundle(args.base, ["llamacpp"], root, gguf_linear="f32")
        configs.append((F32_GGUF, ["session", str(exact), "llamacpp", str(adapter)]))
        if "llamacpp" in args.prefetch_backends.split(",") and gap > 0:
            configs.append(
                (f"{F32_GGUF} + prefetch ({gap:g} ms typing gap)", ["session", str(exact), "llamacpp", str(adapter)])
            )
    if "llama_raw" in baselines:
        configs.append(("llama-cpp-python raw eval (next token)", ["llama_raw", str(bundle), "-", str(adapter)]))
    messages = held_out_messages(n_msgs, max_chars=48 if args.quick else 80)
    prefixes = keystroke_prefixes(messages)
    if "llamacpp" in backends and not args.no_keyboard:
        exact = None if args.no_f32_gguf else ensure_bundle(args.base, ["llamacpp"], root, gguf_linear="f32")
        configs += keyboard_configs(bundle, exact, adapter, args.quick)
    if args.configs:
        configs = [(n, w) for n, w in configs if args.configs in n or n == "pocketpeft torch"]
    runs: dict[str, list[dict]] = {name: [] for name, _ in configs}
    with tempfile.TemporaryDirectory() as tmp:
        pfile, mfile = Path(tmp) / "prefixes.json", Path(tmp) / "messages.json"
        pfile.write_text(json.dumps(prefixes), encoding="utf-8")
        mfile.write_text(json.dumps(messages), encoding="utf-8")
        for rep in range(reps):
            order = configs[rep % len(configs) :] + configs[: rep % len(configs)]  # rotate who goes first
            for name, wargs in order:
                print(f"[{rep + 1}/{reps}] {name}", flush=True)
                if wargs[0] == "typist":
                    runs[name].append(suite.run_worker([*wargs, str(mfile)]))
                    continue
                extra = [str(gap)] if "+ prefetch" in name else []
                runs[name].append(suite.run_worker([*wargs, str(pfile), *extra]))
    typed = {n: r for n, r in runs.items() if n.startswith("keyboard ")}
    results = summarize_runs({n: r for n, r in runs.items() if n not in typed}, prefixes)
    reference = None
    if runs.get("pocketpeft torch"):
        from pocketpeft.runtime.keystrokes import keystroke_metrics

        reference = dict(zip(prefixes, runs["pocketpeft torch"][0]["top3"]))
        results["pocketpeft torch"]["user"] = keystroke_metrics(lambda p, k: reference[p][:k], messages, 3)
    keyboard = summarize_keyboard(typed, reference)
    best, met = best_config(results)
    payload = {
        "settings": {
            "model": f"{args.base} q4_0",
            "lora_r": RANK,
            "target_modules": MODULES,
            "adapter": "given" if args.adapter else "random nonzero lora_B (std 0.02, seed 0)",
            "messages": messages,
            "keystrokes": len(prefixes),
            "repetitions": reps,
            "k": 3,
            "threads": int(os.environ.get("POCKETPEFT_THREADS", "2")),
            "quick": args.quick,
            "typing_gap_ms_for_prefetch": gap,
            "configs": args.configs or "all",
            "skipped": skipped,
        },
        "results": results,
        "keyboard": keyboard,
        "best_backend": best,
        "targets": {
            "p50_ms_best_backend": 10.0,
            "top3_equal_to_torch": 0.95,
            "keyboard_q4_0_deadline16_gap100_p99_ms": 16.0,
            "keyboard_q4_0_deadline16_gap100_ksr_points_below_unbounded": 1.0,
        },
        "targets_met": met,
        "keyboard_targets": keyboard_targets(keyboard),
    }
    return payload


if __name__ == "__main__":
    main(SuggestLatency())
