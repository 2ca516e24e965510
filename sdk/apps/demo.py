"""``pocketpeft demo``: personalize an embedded model (SmolLM2 by default, ``--base gemma3-270m``
for Gemma 3 270M) on one chitchat sender with the
:class:`~pocketpeft.runtime.Personalizer` and compare base vs personalized on the sender's later,
held-out messages (loss, next-word top-3 accuracy, keystroke savings, example suggestions).
``pocketpeft demo --interactive`` is a terminal keyboard that learns from what you type."""

from __future__ import annotations

import json
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from pocketpeft.fsutil import cache_dir, write_bytes_atomic

Log = Callable[[str], None]


#: the embedded bases the demo runs: name -> (display name, decoder layers, default quant).
#: Gemma 3 270M ships as k-quants (Q4_K / Q5_0 / Q6_K / Q8_0): requantized to q4_0 it loses ~60%
#: perplexity on chat text, to q8_0 0.4% (benchmarks/quant_quality.py --base gemma3-270m)
DEMO_BASES = {"smollm2": ("SmolLM2-135M", 30, "q4_0"), "gemma3-270m": ("Gemma 3 270M", 18, "q8_0")}


def demo_quant(base: str) -> str:
    """The demo's default frozen-weight format for ``base``."""
    return DEMO_BASES[base][2] if base in DEMO_BASES else "q4_0"


def demo_base(base: str) -> tuple[str, int, str]:
    """(display name, layer count, default quant) of a demo base; :class:`ConfigError` naming the choices."""
    from pocketpeft.errors import ConfigError

    if base not in DEMO_BASES:
        raise ConfigError(f"demo base {base!r} is not embedded; choose one of: {', '.join(DEMO_BASES)}")
    return DEMO_BASES[base]


def demo_lora(base: str = "smollm2"):
    """The demo's LoRA config, the personalization preset (:func:`pocketpeft.config.personal_lora`:
    r=16 on all seven linears of the top 8 layers: of SmolLM2's 30, of Gemma 3 270M's 18). The
    layers below stay frozen, so the bundle is split: the device trains only the top layers and
    caches the frozen prefix's outputs. The one place to change it; the cached bundle's name
    follows it."""
    from pocketpeft.config import personal_lora

    return personal_lora(demo_base(base)[1])


def serve_backend() -> str | None:
    """``llamacpp`` when it runs here (what ``auto`` then serves from: one token costs a fraction of
    any other decoder's, and the keystroke metrics type every character of the held-out messages);
    otherwise ``None`` (the demo's bundle then has no gguf target and ``auto`` serves from what
    else runs)."""
    from pocketpeft.runtime.selection import probe

    return "llamacpp" if probe("llamacpp").available else None


def cached_bundle(
    cache: Path,
    quant: str,
    progress: bool,
    log: Log | None,
    gguf: bool = False,
    onnx: bool = False,
    base: str = "smollm2",
):
    """The demo bundle (``base``, ``quant``, :func:`demo_lora`), exported once and cached: the torch
    target (the reference) always, llama.cpp's with ``gguf``, ONNX Runtime's with ``onnx`` (2-row
    micro-batches and int8 4-bit storage: ORT training then needs ~0.7 GB). The cache path names
    the targets and options."""
    import hashlib
    from dataclasses import asdict

    from pocketpeft.errors import PocketPeftError
    from pocketpeft.export import OnnxOptions, export
    from pocketpeft.manifest import Bundle

    lora = demo_lora(base)
    title = demo_base(base)[0]
    targets = ["torch"] + (["gguf"] if gguf else []) + (["onnx"] if onnx else [])
    onnx_opts = OnnxOptions(rows=2, q4="int8") if onnx else None
    digest = hashlib.sha256(json.dumps(asdict(lora), sort_keys=True, default=str).encode()).hexdigest()[:8]
    name = f"{base}-{quant}-r{lora.r}-{digest}"
    # -gslot: an empty global-adapter slot; -wl: the training graph takes per-token loss weights
    name += ("-gguf" if gguf else "") + (
        f"-onnx-rows{onnx_opts.rows}-{onnx_opts.q4.value}-gslot-wl" if onnx_opts else ""
    )
    path = cache / "bundles" / name
    try:
        b = Bundle(path)
        b.verify()
        return b, 0.0
    except PocketPeftError:
        pass
    if log:
        log(f"exporting {title} ({quant}; targets {', '.join(targets)}) to {path} (once; cached for the next run)…")
    t0 = time.perf_counter()
    # onnx graphs with an empty global slot: the chat-adapted global adapter is installed next,
    # as a device installs a newer one (no re-export)
    b = export(base, path, quant=quant, lora=lora, targets=targets, progress=progress, onnx=onnx_opts, global_slot=onnx)
    return b, time.perf_counter() - t0


#: the demo's global adapter: host training on other people's chitchat messages (never the
#: held-out senders'), this many messages, this seed; the cached adapter's notes name them
GLOBAL_TEXTS = {"n": 6000, "seed": 11}


def demo_global(bundle, seconds: float, progress: bool, log: Log | None) -> tuple[Any, float]:
    """Install the demo's chat-adapted global adapter into ``bundle`` (once; kept in the cached
    bundle): ``seconds`` of host training (:func:`pocketpeft.fleet.run.host_train`) on other
    people's messages — what a fleet would learn, without one. Returns (its info, seconds spent)."""
    import tempfile

    from pocketpeft.corpus import general_texts, held_out_senders
    from pocketpeft.fleet.run import host_train
    from pocketpeft.global_adapter import install_global

    recipe = {**GLOBAL_TEXTS, "seconds": seconds}
    info = bundle.global_info()
    if info is not None and info.notes.get("demo_recipe") == recipe:
        return info, 0.0
    texts = general_texts(exclude=held_out_senders(), **GLOBAL_TEXTS)
    if log:
        log(f"learning a global chat adapter on {len(texts)} messages of other people for {seconds:g}s (once; cached)…")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="pocketpeft-global-") as tmp:
        summary = host_train(
            bundle.root, tmp, texts, seconds=seconds, backend="auto", progress=progress, notes={"demo_recipe": recipe}
        )
        info = install_global(bundle, summary["global"])
    from pocketpeft.fleet.client import close_sessions

    close_sessions()  # the training session host_train kept: its memory is not the demo's
    return info, time.perf_counter() - t0


def demo_personalizer(sess, store: str | Path, sender: str, serve_session=None, word_weight: float | None = None):
    """The demo's :class:`~pocketpeft.runtime.Personalizer` for ``sender``: training on ``sess``,
    serving from ``serve_session`` (``sess`` when None), with the demo's quality gate. The gate's
    held-out and general-text evaluations run inside the update's time box, before and after
    training: 40 messages each (other people's, ``seed=7``) keep them to a small share of a
    one-minute update on 2 cores."""
    from pocketpeft import runtime
    from pocketpeft.corpus import general_texts

    extra = {} if word_weight is None else {"word_weight": word_weight}
    return runtime.Personalizer(
        sess,
        store,
        serve_session=serve_session,
        holdout_max=40,
        general=general_texts(exclude=[sender], n=40, seed=7),
        **extra,
    )


def evaluate_personalization(
    serve, words, test: list[str], keystroke_texts: list[str], word_weight: float, general: list[str] | None = None
) -> dict[str, Any]:
    """One side (base or personalized) of the demo's comparison, from the serving session
    ``serve`` as it is now: the held-out evaluation of ``test`` (``heldout``: loss, perplexity,
    next-token accuracy), the keystroke metrics of typing ``keystroke_texts`` scored from the same
    model passes by the model alone (``model``) and mixed with the sender's word counts ``words``
    at ``word_weight`` (``with_words``; what a Personalizer serves), and, given ``general`` (other
    people's messages), their loss (``general_loss``).

    Before an update ``model`` is the base model and ``with_words`` the base with word counts;
    after it, LoRA alone and both. The demo and ``benchmarks.personalize`` score with this."""
    from pocketpeft.runtime.keyboard.wordcounts import keystrokes_with_words

    model_ks, words_ks = keystrokes_with_words(serve.predictor, words, keystroke_texts, word_weight)
    out = {"heldout": serve.eval(test).to_dict(), "model": model_ks, "with_words": words_ks}
    if general is not None:
        out["general_loss"] = serve.eval(general).loss
    return out


def default_sender() -> str:
    """A sender with >= 5k words whose history is long but quick to load: the 6th most prolific."""
    from pocketpeft.corpus import top_senders

    senders = top_senders()
    return senders[min(5, len(senders) - 1)]


def _example_prefixes(texts: list[str], n: int) -> list[str]:
    """Prefixes of ``n`` held-out messages with at least 4 words: their first half of words."""
    out = []
    for t in texts:
        words = t.split()
        if len(words) >= 4:
            out.append(" ".join(words[: len(words) // 2]) + " ")
        if len(out) == n:
            break
    return out


def _plot(path: Path, report: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    names = ["next-word top-3", "keystroke savings"]
    before = [100 * report["before"]["next_word_top3"], 100 * report["before"]["keystroke_savings"]]
    after = [100 * report["after"]["next_word_top3"], 100 * report["after"]["keystroke_savings"]]
    x = range(len(names))
    a.bar([i - 0.2 for i in x], before, 0.4, label="base")
    a.bar([i + 0.2 for i in x], after, 0.4, label="personalized")
    a.set_xticks(list(x), names)
    a.set_ylabel("% (held-out messages)")
    a.set_title(f"sender {report['sender'][:8]}…")
    a.legend()
    losses = report["update"]["losses"]
    b.plot(range(1, len(losses) + 1), losses)
    b.set_xlabel("update step")
    b.set_ylabel("training loss")
    b.set_title(
        f"{report['update']['steps']} steps in {report['update']['train_seconds']:.0f}s "
        f"({'accepted' if report['update']['accepted'] else 'rejected'})"
    )
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    write_bytes_atomic(path, tmp.read_bytes())
    tmp.unlink()


def run_demo(
    sender: str | None = None,
    seconds: float = 60.0,
    quant: str = "q4_0",
    base: str = "smollm2",
    out_dir: str | Path = "pocketpeft-demo",
    cache: Path | None = None,
    progress: bool = False,
    max_test_messages: int = 60,
    keystroke_messages: int = 20,
    keystroke_seconds: float = 15.0,
    examples: int = 3,
    log: Log | None = print,
    global_seconds: float = 180.0,
) -> dict[str, Any]:
    """Run the demo; returns (and writes to ``out_dir/report.json``, plot in ``out_dir/report.png``)
    the before/after report. The user's store lives in ``out_dir/store`` and is started afresh.

    Typing the held-out messages keystroke by keystroke costs a model search per character: at
    most ``keystroke_messages`` are typed, fewer when the first one shows that they would take
    more than ``keystroke_seconds`` per pass (a torch-served demo on 2 cores types a few, a
    llama.cpp-served one several times more; ``python -m benchmarks.personalize`` types hundreds
    of words); before and after type the same messages.

    ``global_seconds``: host training of the bundle's chat-adapted global adapter (once; cached with
    the bundle; 0: none). With one, the report compares the base model, the global adapter
    (``before``) and global + personal (``after``)."""
    from pocketpeft import runtime
    from pocketpeft.corpus import sender_split
    from pocketpeft.procinfo import peak_rss_mib
    from pocketpeft.runtime.keyboard.wordcounts import WordCounts, keystrokes_with_words

    t_start = time.perf_counter()
    say = log or (lambda s: None)
    cache = cache or cache_dir()
    from pocketpeft.runtime.selection import probe

    # the device path where it is installed: updates on ONNX Runtime, suggestions from llama.cpp
    gguf, onnx = serve_backend() is not None, probe("onnxruntime").available
    bundle, export_s = cached_bundle(Path(cache), quant, progress, log, gguf=gguf, onnx=onnx, base=base)
    ginfo, global_s = demo_global(bundle, global_seconds, progress, log) if global_seconds else (None, 0.0)
    sender = sender or default_sender()
    train, test = sender_split(sender)
    test = test[:max_test_messages]
    ks_texts = test[:keystroke_messages]
    out = Path(out_dir)
    shutil.rmtree(out / "store", ignore_errors=True)
    sess = runtime.open(bundle)  # auto: ONNX Runtime > ExecuTorch > torch, among the bundle's targets
    serving = runtime.open(bundle, need_train=False)  # auto: llama.cpp first
    p = demo_personalizer(sess, out / "store", sender, serve_session=serving)
    serve = p.serve_session
    split = bundle.manifest.split
    say(
        f"sender {sender}: {len(train)} earlier messages to learn from, {len(test)} later ones held out; "
        f"training on {sess.backend.name}:{sess.backend.device}"
        + (f" (layers {split.layer}+ only; the frozen layers' outputs are cached)" if split else "")
        + f", suggestions from {serve.backend.name}:{serve.backend.device}"
    )
    prefixes = _example_prefixes(test, examples)
    base_sugg = [p.suggest(x, 3) for x in prefixes]  # nothing observed yet: the base model alone
    words = WordCounts(train)  # what p counts once it has observed `train`
    t_first = time.perf_counter()
    keystrokes_with_words(serve.predictor, words, ks_texts[:1], p.word_weight)
    per_message = max(time.perf_counter() - t_first, 1e-3)
    ks_texts = ks_texts[: max(1, min(len(ks_texts), int(keystroke_seconds / per_message)))]
    ev = evaluate_personalization(serve, words, test, ks_texts, p.word_weight, general=p.general)
    before, with_words, general_before = {**ev["heldout"], **ev["model"]}, ev["with_words"], ev["general_loss"]
    raw = None
    if ginfo is not None:  # the base without the global adapter, for the three-way comparison
        serve.set_global_tensors(None)
        ev0 = evaluate_personalization(serve, words, test, ks_texts, p.word_weight, general=p.general)
        raw = {**ev0["heldout"], **ev0["model"], "general_loss": ev0["general_loss"]}
        serve.apply_global()
    p.observe(train)
    say(f"learning for up to {seconds:g}s …")
    upd = p.update(max_seconds=seconds, progress=progress)
    say(f"update {'accepted' if upd.accepted else 'REJECTED'}: {upd.reason}")
    ev = evaluate_personalization(serve, words, test, ks_texts, p.word_weight, general=p.general)
    lora_alone, both, general_after = ev["model"], ev["with_words"], ev["general_loss"]
    after = {**ev["heldout"], **both}
    pers_sugg = [p.suggest(x, 3) for x in prefixes]
    report = {
        "base_model": {"name": base, "model": demo_base(base)[0], "quant": quant},
        "sender": sender,
        "quant": quant,
        "backend": f"{sess.backend.name}:{sess.backend.device}",
        "serving_backend": f"{serve.backend.name}:{serve.backend.device}",
        "export_seconds": round(export_s, 1),
        "seconds_budget": seconds,
        "train_messages": len(train),
        "test_messages": len(test),
        "keystroke_messages": len(ks_texts),
        "update": upd.to_dict(),
        "version": p.version,
        "before": before,
        "after": after,
        "breakdown": {"base_with_word_counts": with_words, "lora_alone": lora_alone, "word_weight": p.word_weight},
        "general_loss": {"base": general_before, "personalized": general_after},
        "examples": [{"prefix": x, "base": b, "personalized": s} for x, b, s in zip(prefixes, base_sugg, pers_sugg)],
        "peak_rss_mb": round(peak_rss_mib(), 1),
        "adapter": str(out / "store" / "adapters"),
        "split": split.to_dict() if split else None,
        # two-level adapters: "before" is the bundle's global adapter (chat-adapted, frozen),
        # "after" global + personal; "base" is the model with neither
        "global": None
        if ginfo is None
        else {
            "version": ginfo.version,
            "source": ginfo.source,
            "sha256": ginfo.sha256,
            "train_seconds": round(global_s, 1),
            "steps": ginfo.notes.get("steps"),
            "texts": ginfo.notes.get("texts"),
        },
        "base": raw,
        # the device path needs no torch: it is loaded only to export the bundle the first time
        "torch_loaded": "torch" in sys.modules,
    }
    report["total_seconds"] = round(time.perf_counter() - t_start, 1)
    out.mkdir(parents=True, exist_ok=True)
    _plot(out / "report.png", report)
    write_bytes_atomic(out / "report.json", (json.dumps(report, indent=2, default=float) + "\n").encode())
    if log:
        _print_report(report, out, log)
    p.close()
    return report


def _print_report(r: dict[str, Any], out: Path, log: Log) -> None:
    log("")
    raw = r.get("base")
    if raw:
        g = r["global"]
        log(
            f"global adapter v{g['version']} ({g['source']}: {g['steps']} steps on {g['texts']} messages of other "
            "people) is applied frozen; the personal adapter trains on top of it"
        )
    log(
        f"{'held-out metric':<26}"
        + (f"{'base':>10}{'global':>10}{'+personal':>12}" if raw else f"{'base':>10}{'personalized':>14}")
    )
    rows = (
        ("next_word_top3", "next-word top-3", True),
        ("keystroke_savings", "keystroke savings", True),
        ("next_word_top1", "next-word top-1", True),
        ("top3", "next-token top-3", True),
        ("loss", "loss", False),
        ("perplexity", "perplexity", False),
    )
    for k, label, pct in rows:
        a, b = r["before"][k], r["after"][k]
        fmt = (lambda x: f"{100 * x:.1f}%") if pct else (lambda x: f"{x:.3f}")
        if raw:
            log(f"{label:<26}{fmt(raw[k]):>10}{fmt(a):>10}{fmt(b):>12}")
        else:
            log(f"{label:<26}{fmt(a):>10}{fmt(b):>14}")
    g = r["general_loss"]
    if raw:
        log(f"{'other people: loss':<26}{raw['general_loss']:>10.3f}{g['base']:>10.3f}{g['personalized']:>12.3f}")
    else:
        log(f"{'other people: loss':<26}{g['base']:>10.3f}{g['personalized']:>14.3f}")
    bd = r["breakdown"]
    log(
        f"personalized = the LoRA update + the sender's word counts (weight {bd['word_weight']:g}); next-word top-3 "
        f"with LoRA alone {100 * bd['lora_alone']['next_word_top3']:.1f}%, word counts alone "
        f"{100 * bd['base_with_word_counts']['next_word_top3']:.1f}%"
    )
    log("")
    for e in r["examples"]:
        log(f"  {e['prefix']!r:<40} base {', '.join(e['base']):<30} personalized {', '.join(e['personalized'])}")
    u = r["update"]
    log("")
    log(
        f"update: {u['steps']} steps, {u['tokens']} tokens, {u['train_seconds']:.1f}s training / {u['seconds']:.1f}s "
        f"with the quality gate; peak RSS {r['peak_rss_mb']:.0f} MiB; whole demo {r['total_seconds']:.0f}s "
        f"(export {r['export_seconds']:.0f}s); torch {'loaded' if r['torch_loaded'] else 'not loaded'}"
    )
    log(f"report: {out / 'report.json'}, plot: {out / 'report.png'}, adapter versions: {r['adapter']}")


# ------------------------------------------------------------------------- interactive
#: the interactive keyboard's suggestion deadline: one frame of a 60 Hz screen
DEADLINE_MS = 16.0


def interactive_loop(
    personalizer, read_line: Callable[[], str | None], log: Log = print, update_seconds: float = 15.0
) -> list[dict]:
    """A line-based keyboard over ``personalizer``: each submitted message is replayed keystroke
    by keystroke with :data:`DEADLINE_MS` suggestions, as a phone keyboard would show them; a word
    counts as tapped at the first keystroke where it was on the bar (``✓``, shown with that bar;
    otherwise the bar before the word), and each is recorded with :meth:`Personalizer.feedback`
    (tapped, or all ignored). Then the message is stored and learned from in a background thread
    (one update at a time), and the next word's suggestions are shown.

    ``read_line`` returns the next line or ``None`` at the end. Commands: ``:versions``,
    ``:restore N``, ``:wipe``, ``:quit``. Returns the reports of the updates run (after waiting
    for the last one).
    """
    from pocketpeft.errors import PocketPeftError
    from pocketpeft.runtime.keystrokes import message_words, simulate_typing

    reports: list[dict] = []
    worker: threading.Thread | None = None

    def learn() -> None:
        r = personalizer.update(max_seconds=update_seconds)
        reports.append(r.to_dict())
        log(
            f"  [learned: {'new version ' + str(r.version) if r.accepted else 'kept version ' + str(r.version)}"
            f" — {r.reason}]"
        )

    while (line := read_line()) is not None:
        line = line.strip()
        if not line:
            continue
        if line in (":q", ":quit"):
            break
        try:
            if line == ":versions":
                for v in personalizer.versions():
                    log(f"  version {v.version}: {json.dumps(v.metrics)}")
                log(f"  serving version {personalizer.version}")
                continue
            if line.startswith(":restore"):
                log(f"  restored version {personalizer.restore(int(line.split()[1])).version}")
                continue
            if line == ":wipe":
                log(f"  wiped {personalizer.wipe()}")
                continue
            msg = " ".join(line.split())
            taps: list[tuple] = []
            simulate_typing(
                lambda p, n: personalizer.suggest(p, n, deadline_ms=DEADLINE_MS),
                [msg],
                3,
                on_word=lambda *t, into=taps: into.append(t),
            )
            words = [w for _, w, _ in message_words(msg)]
            log("  " + " ".join(f"{w}{'✓' if t else ''}[{'|'.join(bar)}]" for w, (_, bar, t) in zip(words, taps)))
            personalizer.observe(msg)
            for prefix, bar, tapped in taps:
                if bar:
                    personalizer.feedback(prefix, bar, tapped)
            log(f"  next: {', '.join(personalizer.suggest(msg + ' ', 3, deadline_ms=DEADLINE_MS))}")
        except (PocketPeftError, ValueError, IndexError) as e:
            log(f"  error: {e}")
            continue
        if worker is None or not worker.is_alive():
            worker = threading.Thread(target=learn, daemon=True)
            worker.start()
    if worker is not None:
        worker.join()
    return reports


def run_interactive(
    quant: str = "q4_0",
    base: str = "smollm2",
    out_dir: str | Path = "pocketpeft-demo",
    cache: Path | None = None,
    update_seconds: float = 15.0,
    progress: bool = False,
    log: Log = print,
) -> list[dict]:
    """``pocketpeft demo --interactive``: type messages, see suggestions, and the model learns from
    them in the background (stored in ``out_dir/interactive-store``, kept between runs)."""
    from pocketpeft import runtime

    cache = cache or cache_dir()
    bundle, _ = cached_bundle(Path(cache), quant, progress, log, base=base)
    # the taps it records are learned from too (DPO, see Personalizer.feedback)
    p = runtime.Personalizer(runtime.open(bundle), Path(out_dir) / "interactive-store", preference_weight=1.0)
    log(f"serving version {p.version}. Type a message and press enter (:versions, :restore N, :wipe, :quit).")

    def read() -> str | None:
        try:
            return input("> ")
        except EOFError:
            return None

    try:
        return interactive_loop(p, read, log, update_seconds)
    finally:
        p.close()
