"""The ``pocketpeft`` command line. Every command takes ``--json`` and then prints exactly one
JSON object on stdout (errors too: ``{"error": ..., "type": ...}``); progress goes to stderr."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

from pocketpeft.errors import PocketPeftError
from pocketpeft.fsutil import cache_dir


def _emit(args: argparse.Namespace, obj: dict[str, Any], text: Callable[[dict[str, Any]], str]) -> None:
    if args.json:
        print(json.dumps(obj, default=str))
    else:
        print(text(obj))


def _progress(args: argparse.Namespace) -> bool:
    return not args.json and not args.quiet and sys.stderr.isatty() or getattr(args, "progress", False)


def _global_summary(bundle) -> dict[str, Any] | None:
    """The bundle's global adapter in a few fields (``None`` without one)."""
    info = bundle.global_info()
    if info is None:
        return None
    return {
        "version": info.version,
        "sha256": info.sha256,
        "source": info.source,
        "rounds": info.rounds,
        "clients": info.clients,
        "aggregation": info.aggregation,
        "dp": info.dp,
        "slot": bundle.manifest.global_slot,
    }


# ---------------------------------------------------------------------------- commands
def cmd_install_global(args: argparse.Namespace) -> None:
    from pocketpeft.global_adapter import install_global
    from pocketpeft.manifest import Bundle

    b = Bundle(args.bundle)
    before = b.global_info()
    info = install_global(b, args.adapter)
    obj = {
        "bundle": str(b.root.resolve()),
        "installed": _global_summary(Bundle(b.root)),
        "previous_version": before.version if before else None,
    }
    _emit(
        args,
        obj,
        lambda o: (
            f"installed global adapter v{info.version} ({info.source}"
            + (f", DP ε={info.dp['epsilon']:.2f} at δ={info.dp['delta']:g}" if info.dp else ", no DP")
            + f") into {o['bundle']}"
            + (f" (replacing v{o['previous_version']})" if o["previous_version"] else "")
        ),
    )


def cmd_fleet(args: argparse.Namespace) -> None:
    from pocketpeft.fleet.cli import run

    run(args)


def default_bundle_dir(base: str, quant: str) -> Path:
    """Where ``pocketpeft export`` writes without ``--out``: ``bundles/<base>-<quant>`` in the
    current directory (``<base>`` a named base, or the model folder's / GGUF file's name)."""
    stem = Path(base).stem if Path(base).suffix.lower() == ".gguf" else Path(base.rstrip("/\\")).name
    return Path("bundles") / f"{stem or 'model'}-{quant}"


def cmd_export(args: argparse.Namespace) -> None:
    from pocketpeft.config import LINEAR_MODULES, LoraConfig
    from pocketpeft.errors import ConfigError
    from pocketpeft.export import GgufOptions, OnnxOptions, export

    if args.onnx_rows is not None and args.onnx_rows < 1:
        raise ConfigError(f"--onnx-rows must be a positive integer (rows per training-graph run), got {args.onnx_rows}")
    # LoRA flags left unset (None) take the preset's value, else the plain defaults;
    # "personal" is pocketpeft.config.personal_lora: all seven linears of the top 8 layers, r=16
    presets = {"personal": {"r": 16, "alpha": 32.0, "target_modules": ",".join(LINEAR_MODULES), "layers": "top8"}}
    preset = presets[args.preset] if args.preset else {}
    plain = {"r": 8, "alpha": 16.0, "target_modules": "q_proj,k_proj,v_proj,o_proj", "layers": None}
    pick = {k: getattr(args, k) if getattr(args, k) is not None else preset.get(k, v) for k, v in plain.items()}
    lora = LoraConfig(
        r=pick["r"], lora_alpha=pick["alpha"], lora_dropout=args.dropout, target_modules=pick["target_modules"]
    )
    onnx = OnnxOptions(rows=args.onnx_rows, q4=args.onnx_q4 or "packed")
    gguf = GgufOptions(linear=args.gguf_linear or "native")
    b = export(
        args.base,
        args.out or default_bundle_dir(args.base, args.quant),
        quant=args.quant,
        lora=lora,
        targets=args.targets,
        seq_len=args.seq_len,
        batch_size=args.batch,
        seed=args.seed,
        progress=_progress(args),
        onnx=onnx,
        gguf=gguf,
        layers=pick["layers"],
        split=False if args.no_split else None,
        global_adapter=args.global_adapter,
        global_slot=args.global_slot,
    )
    m = b.manifest
    obj = {
        "bundle": str(b.root.resolve()),
        "base": m.base_source,
        "base_sha256": m.base_sha256,
        "quant": m.quant.value,
        "targets": b.targets,
        "trainable_tensors": len(m.trainable),
        "trainable_params": sum(int(__import__("math").prod(s)) for s in m.trainable.values()),
        "bytes": sum(f["bytes"] for f in m.files.values()),
        "export_seconds": {t: i.get("export_seconds") for t, i in m.targets.items()},
        "split": m.split.to_dict() if m.split is not None else None,
        "global": _global_summary(b),
    }
    _emit(
        args,
        obj,
        lambda o: (
            f"exported {o['base']} ({o['quant']}) to {o['bundle']}: targets {', '.join(o['targets'])}, "
            f"{o['trainable_params']:,} trainable LoRA parameters, {o['bytes'] / 2**20:.1f} MiB"
            + (
                f"; split at layer {o['split']['layer']} (frozen prefix for inference, "
                f"layers {o['split']['layer']}+ train)"
                if o["split"]
                else ""
            )
        ),
    )


def _open(args: argparse.Namespace, need_train: bool):
    from pocketpeft import runtime

    return runtime.open(
        args.bundle,
        backend=args.backend,
        adapter=getattr(args, "adapter", None),
        need_train=need_train,
        update=getattr(args, "update", "auto"),
    )


def cmd_train(args: argparse.Namespace) -> None:
    from pocketpeft.text import read_text_file

    texts = read_text_file(args.text)
    sess = _open(args, need_train=True)
    rep = sess.train(texts, steps=args.steps, seconds=args.seconds, progress=_progress(args))
    out = args.adapter_out
    if out:
        sess.save_adapter(out)
    obj = {
        **rep.to_dict(),
        "adapter_out": out,
        "first_loss": rep.losses[0] if rep.losses else None,
        "last_loss": rep.losses[-1] if rep.losses else None,
    }
    _emit(
        args,
        obj,
        lambda o: (
            f"trained on {o['backend']}:{o['device']}: {o['steps']} steps in {o['seconds']:.1f}s "
            f"({o['tokens_per_s']:.0f} tokens/s, peak RSS {o['peak_rss_mb']:.0f} MiB), loss {o['first_loss']:.3f} → "
            f"{o['last_loss']:.3f}"
            + (f", {len(o['skipped_steps'])} non-finite steps skipped" if o["skipped_steps"] else "")
            + (
                f"; adapter saved to {o['adapter_out']}"
                if o["adapter_out"]
                else "; adapter NOT saved (use --adapter-out)"
            )
        ),
    )


def cmd_eval(args: argparse.Namespace) -> None:
    from pocketpeft.errors import ConfigError
    from pocketpeft.text import read_text_file

    if args.keystrokes < 0:
        raise ConfigError(f"--keystrokes must be >= 0 (messages to type; 0 skips), got {args.keystrokes}")
    texts = read_text_file(args.text)
    sess = _open(args, need_train=False)
    rep = sess.eval(texts, progress=_progress(args))
    obj = {"backend": sess.backend.name, "adapter": args.adapter, **rep.to_dict()}
    if args.keystrokes:
        obj["keyboard"] = sess.eval_keystrokes(texts, k=3, max_messages=args.keystrokes)

    def text(o):
        line = (
            f"loss {o['loss']:.4f}  perplexity {o['perplexity']:.2f}  next-token top-1 "
            f"{100 * o['top1']:.1f}%  top-3 {100 * o['top3']:.1f}%  over {o['tokens']} tokens"
        )
        kb = o.get("keyboard")
        if kb:
            line += (
                f"\nnext-word top-1 {100 * kb['next_word_top1']:.1f}%  top-3 {100 * kb['next_word_top3']:.1f}%  "
                f"keystroke savings {100 * kb['keystroke_savings']:.1f}% (k=3)  over {kb['words']} words, "
                f"{kb['chars']} characters of the first {kb['messages']} messages"
            )
        return line

    _emit(args, obj, text)


def cmd_suggest(args: argparse.Namespace) -> None:
    import time

    from pocketpeft.errors import ConfigError
    from pocketpeft.text import as_text

    if args.k < 1:
        raise ConfigError(f"-k must be a positive integer, got {args.k}")
    if args.prefix == "-":  # stdin: bytes, so non-UTF-8 input gets the same typed error; one trailing newline dropped
        prefix = as_text(sys.stdin.buffer.read(), "prefix (stdin)").removesuffix("\n").removesuffix("\r")
    else:  # argv: undecodable bytes arrive as lone surrogates, which as_text refuses
        prefix = as_text(args.prefix, "prefix")
    from pocketpeft.runtime.predictor import check_deadline

    deadline = check_deadline(args.deadline_ms)
    t0 = time.perf_counter()
    sess = _open(args, need_train=False)
    pred = sess.predictor  # builds the vocabulary index, once per process
    t1 = time.perf_counter()
    words = sess.suggest(prefix, k=args.k, deadline_ms=deadline)
    t2 = time.perf_counter()
    forwards, trimmed = pred.last_forwards, pred.last_trimmed
    pred.close()  # no background search: this process answers once
    pred.reset()  # the same request again with the KV cache and memo dropped: the model work alone
    t3 = time.perf_counter()
    sess.suggest(prefix, k=args.k)
    uncached = 1000 * (time.perf_counter() - t3)
    obj = {
        "prefix": prefix,
        "k": args.k,
        "suggestions": list(words),
        "complete": words.complete,
        "deadline_ms": deadline,
        "backend": f"{sess.backend.name}:{sess.backend.device}",
        "adapter": args.adapter,
        "open_ms": round(1000 * (t1 - t0), 2),
        "latency_ms": round(1000 * (t2 - t1), 2),
        "uncached_ms": None if uncached is None else round(uncached, 2),
        "forward_passes": forwards,
        "trimmed": trimmed,
        "max_context": getattr(pred, "max_context", None),
    }

    def text(o):
        lines = [
            "  ".join(f"{i + 1}. {w}" for i, w in enumerate(o["suggestions"])) or "(no suggestions)",
            f"{o['latency_ms']:.1f} ms on {o['backend']} (first call: builds the KV cache"
            + (f"; {o['uncached_ms']:.1f} ms again without caches" if o["uncached_ms"] is not None else "")
            + f"; bundle opened in {o['open_ms']:.0f} ms)",
        ]
        if not o["complete"]:
            lines.append(
                f"note: answered within the {o['deadline_ms']:g} ms deadline from what was ready; "
                "the search had not finished (a keyboard gets the rest on the next keystrokes)"
            )
        if o["trimmed"]:
            lines.append(
                f"note: the prefix is longer than the {o['max_context']}-token context; "
                "suggestions used only its last whole words that fit"
            )
        return "\n".join(lines)

    _emit(args, obj, text)


def cmd_backends(args: argparse.Namespace) -> None:
    from dataclasses import asdict

    from pocketpeft.manifest import Bundle
    from pocketpeft.registry import BACKENDS, FAMILY_LIMITS, FAMILY_SUPPORT
    from pocketpeft.runtime.selection import SERVE_ORDER, TRAIN_ORDER, explain, plan

    bundle = Bundle(args.bundle) if args.bundle else None
    rows = explain(need_train=not args.infer_only, update=args.update, bundle=bundle)
    obj = {
        "order": (
            "gpu → npu → cpu; within a tier device runtimes before the torch reference "
            f"(updates: {', '.join(TRAIN_ORDER)}; serving: {', '.join(SERVE_ORDER)})"
        ),
        "need_train": not args.infer_only,
        "update": next((r.update for r in rows if r.picked), ""),
        "bundle": str(bundle.root) if bundle else None,
        "backends": [asdict(r) | {"extra": BACKENDS[r.backend].extra} for r in rows],
        "plan": plan(bundle),
        "families": {"supported": FAMILY_SUPPORT, "limits": FAMILY_LIMITS},
    }

    def at(part):
        return f"{part['backend']}:{part['device']}" if part["backend"] else "nothing here"

    def text(o):
        lines = [f"{'backend':<17} {'device':<8} {'tier':<4} {'train':<5} {'infer':<5} {'picked':<6} why"]
        for r in o["backends"]:
            lines.append(
                f"{r['backend']:<17} {r['device']:<8} {r['tier']:<4} {str(r['train']).lower():<5} "
                f"{str(r['infer']).lower():<5} {'*' if r['picked'] else '':<6} {r['reason']}"
            )
        if o["update"]:
            lines.append(f"training updates: {o['update']} (choose with --update backprop|forward-only)")
        pl = o["plan"]
        up, pre, suf, srv = pl["update"], pl["prefix"], pl["suffix"], pl["serving"]
        fb = up["fallback"]
        prefix_on = f"onnxruntime InferenceSession with {pre['provider']}" if pre["provider"] else at(pre)
        lines += [
            f"plan{' for ' + o['bundle'] if o['bundle'] else ''}:",
            f"  updates ({up['mode'] or 'none'}) on {at(up)}: {up['why']}",
            f"    prefix (frozen layers) on {prefix_on}: {pre['why']}",
            f"    suffix (trained layers) on {at(suf)}: {suf['why']}",
            f"  serving on {at(srv)}: {srv['why']}",
            f"  forward-only fallback when nothing can backpropagate: {at(fb)}",
            f"model families: {o['families']['supported']}",
        ]
        lines += [f"  {name}: {why}" for name, why in o["families"]["limits"].items()]
        return "\n".join(lines)

    _emit(args, obj, text)


def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import demo_quant, run_demo

    if args.interactive:
        from .demo import run_interactive

        reports = run_interactive(
            quant=args.quant or demo_quant(args.base),
            base=args.base,
            out_dir=args.out,
            cache=cache_dir(),
            update_seconds=args.update_seconds,
        )
        if args.json:
            print(json.dumps({"updates": reports}, default=str))
        return
    obj = run_demo(
        sender=args.sender,
        seconds=args.seconds,
        global_seconds=args.global_seconds,
        quant=args.quant or demo_quant(args.base),
        base=args.base,
        out_dir=args.out,
        cache=cache_dir(),
        progress=_progress(args),
        log=None if args.json else print,
    )
    if args.json:
        print(json.dumps(obj, default=str))


def cmd_bench(args: argparse.Namespace) -> None:
    """Runs ``python -m benchmarks.report`` of the source checkout in a child process (the
    package never imports ``benchmarks``); the child writes its summary as JSON, re-emitted here."""
    import subprocess
    import tempfile

    from pocketpeft.errors import MissingDependencyError, PocketPeftError

    root = Path(__file__).resolve().parents[2]
    if not (root / "benchmarks" / "report.py").is_file():
        raise MissingDependencyError(
            "`pocketpeft bench` runs the benchmarks/ folder of a source checkout of pocketpeft "
            "(pip install -e . from a clone, with the 'bench' extra)"
        )
    with tempfile.TemporaryDirectory(prefix="pocketpeft-bench-") as tmp:
        summary = Path(tmp) / "summary.json"
        cmd = [sys.executable, "-m", "benchmarks.report", "--suite", args.suite, "--json-out", str(summary)]
        cmd += ["--quick"] if args.quick else []
        cmd += ["--out", str(Path(args.out).resolve())] if args.out else []
        if args.base:  # the child runs in the checkout: a model path given relative to here is resolved
            cmd += ["--base", str(Path(args.base).resolve()) if Path(args.base).exists() else args.base]
        cmd += ["--targets", args.targets] if args.targets else []
        cmd += ["--report-only"] if args.report_only else []
        # progress (the child's stderr) streams through; its stdout joins it, so ours holds the one JSON object
        p = subprocess.run(cmd, cwd=root, stdout=subprocess.PIPE, text=True)
        if p.stdout:
            print(p.stdout, end="", file=sys.stderr)
        if not summary.is_file():
            raise PocketPeftError(
                f"`python -m benchmarks.report` exited with status {p.returncode} before writing "
                "its summary (see the messages above)"
            )
        obj = json.loads(summary.read_text(encoding="utf-8"))
    _emit(
        args,
        obj,
        lambda o: (
            f"report: {o['report']} ({len(o['results'])} result files, plots: "
            f"{', '.join(o['plots']) or 'none'})" + (f"; FAILED: {', '.join(o['failed'])}" if o["failed"] else "")
        ),
    )
    if obj["failed"]:
        raise SystemExit(1)


# ---------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from pocketpeft import __version__

    p = argparse.ArgumentParser(prog="pocketpeft", description="On-device LoRA personalization of small LMs.")
    p.add_argument("--version", action="version", version=f"pocketpeft {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp):
        sp.add_argument("--json", action="store_true", help="print one JSON object on stdout")
        sp.add_argument("--quiet", action="store_true", help="no progress bars")
        sp.add_argument("--progress", action="store_true", help="progress bars even when stderr is not a terminal")
        return sp

    e = common(sub.add_parser("export", help="quantize a base model and write a bundle"))
    e.add_argument(
        "base",
        help="'smollm2' (embedded default), 'gemma3-270m' (embedded), an HF model folder "
        "(Llama, Qwen2, Qwen3, Gemma 3) or a .gguf file",
    )
    e.add_argument("--out", help="bundle directory to write (replaced atomically; default bundles/<base>-<quant> here)")
    e.add_argument("--quant", default="q4_0", choices=["q4_0", "q8_0", "nf4", "f16", "f32"])
    e.add_argument("--targets", default="torch", help="comma-separated export targets (default: torch)")
    e.add_argument("--r", type=int, help="LoRA rank (default 8; 16 with --preset personal)")
    e.add_argument("--alpha", type=float, help="LoRA alpha (default 16; 32 with --preset personal)")
    e.add_argument("--dropout", type=float, default=0.0)
    e.add_argument(
        "--target-modules",
        help="comma-separated linears to adapt (default q_proj,k_proj,v_proj,o_proj; all seven with --preset personal)",
    )
    e.add_argument(
        "--layers",
        metavar="SPEC",
        help='decoder layers that get LoRA: "all" (default), "top8", "22-29", "0,5,7" (top8 with --preset personal)',
    )
    e.add_argument(
        "--preset",
        choices=["personal"],
        help="personal: r=16, alpha=32, all seven linears of the top 8 layers; explicit flags override it",
    )
    e.add_argument(
        "--no-split",
        action="store_true",
        help="keep whole-model training graphs even when LoRA leaves the lower layers frozen "
        "(by default those layers are exported as a separate inference prefix and only the rest trains)",
    )
    e.add_argument(
        "--global-adapter",
        metavar="DIR",
        help="ship this global adapter (from `pocketpeft fleet`) in the bundle: applied frozen under the "
        "personal adapter by every backend; the onnx and executorch graphs get a global slot a device can refill",
    )
    e.add_argument(
        "--global-slot",
        action="store_true",
        help="give the onnx and executorch graphs an empty global-adapter slot, for a global adapter installed later "
        "(`pocketpeft install-global`)",
    )
    e.add_argument("--seq-len", type=int, default=64)
    e.add_argument("--batch", type=int, default=8)
    e.add_argument("--seed", type=int, default=0, help="seed of the initial LoRA weights")
    e.add_argument(
        "--gguf-linear",
        choices=["native", "f32"],
        help="gguf target: linears as the bundle's own q4_0/q8_0 bytes (native, the default) or their "
        "exact float32 values, so llama.cpp's suggestions match the torch backend's",
    )
    e.add_argument(
        "--onnx-rows",
        type=int,
        metavar="N",
        help="onnx target: rows of the training graph (default --batch); a batch then runs as "
        "micro-batches of N rows, less device memory (1 or 2 for a phone-sized budget)",
    )
    e.add_argument(
        "--onnx-q4",
        choices=["packed", "int8"],
        help="onnx target, q4_0: weights as packed nibbles (default) or one int8 each "
        "(twice the bytes, cheaper to dequantize; pairs with --onnx-rows 1 or 2)",
    )
    e.set_defaults(fn=cmd_export)

    t = common(sub.add_parser("train", help="update the LoRA adapter on text (one message per line)"))
    t.add_argument("bundle")
    t.add_argument("--text", required=True, help="UTF-8 text file, one message per line; '-' for stdin")
    t.add_argument("--backend", default="auto", help="auto, NAME or NAME:DEVICE (see `pocketpeft backends`)")
    t.add_argument("--adapter", help="start from this PEFT adapter directory")
    g = t.add_mutually_exclusive_group()
    g.add_argument("--steps", type=int)
    g.add_argument("--seconds", type=float)
    t.add_argument("--adapter-out", help="write the updated adapter here (PEFT format)")
    t.add_argument(
        "--update",
        default="auto",
        choices=["auto", "backprop", "forward-only"],
        help="backprop, or forward-only (SPSA) updates from forward passes alone (the NPU path); "
        "auto: backprop where the backend can",
    )
    t.set_defaults(fn=cmd_train)

    v = common(sub.add_parser("eval", help="loss, perplexity, next-token/next-word accuracy, keystroke savings"))
    v.add_argument("bundle")
    v.add_argument("--text", "--texts", dest="text", required=True, help="UTF-8 text file, one message per line")
    v.add_argument("--adapter")
    v.add_argument("--backend", default="auto")
    v.add_argument(
        "--keystrokes",
        type=int,
        default=20,
        metavar="N",
        help="type the first N messages with k=3 suggestions for next-word accuracy and keystroke "
        "savings (0 skips; each character is one suggest call)",
    )
    v.set_defaults(fn=cmd_eval)

    s = common(sub.add_parser("suggest", help="the k most likely next words after a prefix, and the latency"))
    s.add_argument("bundle")
    s.add_argument(
        "prefix",
        help="the message typed so far ('' for a new message, '-' to read UTF-8 from stdin); "
        "the text after its last space is the word being completed",
    )
    s.add_argument("-k", type=int, default=3, help="how many words (default 3)")
    s.add_argument(
        "--deadline-ms",
        type=float,
        default=None,
        metavar="MS",
        help="answer within MS milliseconds from what is ready (the output says whether the search finished)",
    )
    s.add_argument("--adapter", help="PEFT adapter directory to apply")
    s.add_argument("--backend", default="auto", help="auto, NAME or NAME:DEVICE (see `pocketpeft backends`)")
    s.set_defaults(fn=cmd_suggest)

    b = common(sub.add_parser("backends", help="what this machine can run, what auto picks, and where each part runs"))
    b.add_argument("--infer-only", action="store_true", help="select for inference rather than training")
    b.add_argument("--bundle", help="select among the backends whose target this bundle directory has")
    b.add_argument(
        "--update",
        default="auto",
        choices=["auto", "backprop", "forward-only"],
        help="how training would update the adapter (see `train --update`)",
    )
    b.set_defaults(fn=cmd_backends)

    d = common(sub.add_parser("demo", help="the main job: personalize an embedded model on one chitchat sender"))
    d.add_argument(
        "--base",
        default="smollm2",
        choices=["smollm2", "gemma3-270m"],
        help="embedded base model: SmolLM2-135M (default) or Gemma 3 270M",
    )
    d.add_argument("--sender", help="chitchat sender id (default: a sender with >= 5k words, see demo.default_sender)")
    d.add_argument("--seconds", type=float, default=60.0, help="update time budget")
    d.add_argument(
        "--global-seconds",
        type=float,
        default=180.0,
        help="host training of the bundle's chat-adapted global adapter on other people's messages "
        "(once; cached with the bundle); 0: no global adapter",
    )
    d.add_argument(
        "--quant",
        choices=["q4_0", "q8_0", "nf4", "f16", "f32"],
        help="frozen weights' format (default: q4_0 for SmolLM2, q8_0 for Gemma 3 270M, whose k-quants lose "
        "~60%% perplexity requantized to q4_0; see benchmarks/results/quant_quality_gemma3-270m*.json)",
    )
    d.add_argument("--out", default="pocketpeft-demo", help="where the report and adapter go")
    d.add_argument("--interactive", action="store_true", help="type messages, see suggestions, learn when you pause")
    d.add_argument(
        "--update-seconds", type=float, default=15.0, help="time box of each background update (--interactive)"
    )
    d.set_defaults(fn=cmd_demo)

    ig = common(
        sub.add_parser(
            "install-global",
            help="put a (newer) global adapter into an existing bundle, checked first; the old one stays on error",
        )
    )
    ig.add_argument("bundle")
    ig.add_argument("adapter", help="global adapter directory (made by `pocketpeft fleet`)")
    ig.set_defaults(fn=cmd_install_global)

    try:  # the fleet extra (flwr) is optional: the command explains itself when it is missing
        from pocketpeft.fleet.cli import add_parser as add_fleet
    except ImportError:
        add_fleet = None
    if add_fleet is not None:
        add_fleet(sub).set_defaults(fn=cmd_fleet)  # it adds --json/--quiet/--progress itself

    bn = common(
        sub.add_parser("bench", help="the benchmark suite (source checkout): runs suites, writes JSON + a report")
    )
    bn.add_argument(
        "--suite",
        default="all",
        choices=["train", "suggest", "quality", "export", "memory", "fleet", "taps", "families", "all"],
    )
    bn.add_argument("--quick", action="store_true", help="sizes that finish in minutes (full sizes otherwise)")
    bn.add_argument("--out", help="results directory (default benchmarks/results; the report goes to OUT/report)")
    bn.add_argument("--base", help="base model for the suites that take one (default: smollm2)")
    bn.add_argument("--targets", help="export targets for the export suite (default: every registered one)")
    bn.add_argument("--report-only", action="store_true", help="rebuild the report from existing results, run nothing")
    bn.set_defaults(fn=cmd_bench)
    return p


#: third-party loggers whose warnings say nothing to a pocketpeft user (torch's exporter listing
#: torchvision ops it skips; executorch importing torchao kernels built for other GPUs and registering
#: a deprecated pytree constant)
_QUIET_LOGGERS = ("torch.onnx._internal.exporter._registration", "torch.utils._pytree", "torch._export", "torchao")


def _quiet_third_party() -> None:
    """Errors only from :data:`_QUIET_LOGGERS` and FutureWarnings from torch's internals on a
    terminal; pocketpeft's own messages are unaffected."""
    import logging
    import warnings

    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(torch|copyreg|transformers)(\.|$)")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``pocketpeft`` console script; returns the exit status."""
    # torch and llama.cpp share one OpenMP runtime in a process (demo, bench): spinning workers of
    # one starve the other on few cores. Must be set before torch is imported; a user value wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    _quiet_third_party()
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except PocketPeftError as e:
        if getattr(args, "json", False):
            print(json.dumps({"error": str(e), "type": type(e).__name__}))
        else:
            print(f"pocketpeft {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
