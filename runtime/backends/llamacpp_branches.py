"""The llamacpp backend's K/V cache: sequence 0 for logits and decoding, and branches.

The cache is unified over :data:`~.llamacpp_context.N_SEQ` sequences. Sequence 0 remembers which
tokens it holds (:attr:`KVCache.kv`), so a request reuses the longest common prefix and
re-evaluates the rest. :meth:`KVCache.branch_logits` evaluates many continuations of shared
prefixes in one ``llama_decode``, each on its own sequence that shares the prefix's cells.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import Callable

import numpy as np

from pocketpeft.errors import InputTextError, SequenceTooLongError

from .llamacpp_context import N_BATCH, N_SEQ, LlamaContext

BRANCH_KEEP = 16  # a branch is kept while at most this many of its tokens are not shared


def common(a: "list[int]", b: "list[int]") -> int:
    """Length of the common prefix of two token lists."""
    n, lim = 0, min(len(a), len(b))
    while n < lim and a[n] == b[n]:
        n += 1
    return n


class KVCache:
    """The K/V sequences of one :class:`LlamaContext` and the tokens each holds."""

    def __init__(self, llm: LlamaContext) -> None:
        import llama_cpp

        self.llm = llm
        self.n_ctx, self.vocab = llm.n_ctx(), llm.n_vocab()
        self.mem = llama_cpp.llama_get_memory(llm.ctx)
        self.batch = llama_cpp.llama_batch_init(N_BATCH, 0, 1)
        self._batch_free = weakref.finalize(self, llama_cpp.llama_batch_free, self.batch)
        self.kv: list[int] = []  # tokens whose K/V sequence 0 of the cache holds
        self.branches: OrderedDict[int, list[int]] = OrderedDict()  # sequence id -> its tokens, LRU first
        self.last_branch_tokens = 0  # tokens the last branch_logits call evaluated

    def close(self) -> None:
        """Free the batch now (else when garbage-collected); the context is the caller's."""
        self._batch_free()
        self.batch, self.kv, self.branches = None, [], OrderedDict()

    def check_ids(self, ids: list[int], start: int = 0) -> None:
        if start + len(ids) > self.n_ctx:
            raise SequenceTooLongError(
                f"sequence of {start + len(ids)} tokens exceeds the llama.cpp context of {self.n_ctx} "
                "(raise POCKETPEFT_LLAMACPP_N_CTX, up to the model's context)"
            )
        bad = [i for i in ids if not 0 <= i < self.vocab]
        if bad:
            raise InputTextError(f"token id {bad[0]} is not in [0, {self.vocab})")

    # ---- sequence 0 ----------------------------------------------------------------------------
    def decode(self, ids: list[int], start: int, outputs: bool) -> np.ndarray | None:
        """Evaluate ``ids`` at positions ``start``.. on sequence 0 (cache must hold exactly the
        ``start`` tokens before); logits [len, vocab] for all of them when ``outputs``."""
        import llama_cpp

        out = []
        b = self.batch
        for c in range(0, len(ids), N_BATCH):
            chunk = ids[c : c + N_BATCH]
            n = len(chunk)
            b.n_tokens = n
            for i, tok in enumerate(chunk):
                b.token[i], b.pos[i], b.n_seq_id[i] = tok, start + c + i, 1
                b.seq_id[i][0] = 0
                b.logits[i] = outputs
            b.logits[n - 1] = True
            rc = llama_cpp.llama_decode(self.llm.ctx, b)
            if rc != 0:
                self.reset(0)
                self.drop_branches(lambda toks: True)
                raise RuntimeError(f"llama_decode failed with code {rc}")
            self.kv.extend(chunk)
            if outputs:
                ptr = llama_cpp.llama_get_logits(self.llm.ctx)
                out.append(np.ctypeslib.as_array(ptr, shape=(n * self.vocab,)).reshape(n, self.vocab).copy())
        return np.concatenate(out) if outputs else None

    def reset(self, keep: int = 0) -> int:
        """Drop sequence 0's tokens from position ``keep`` on; returns how many are kept (0 when
        llama.cpp cannot cut this cache partially and it had to be cleared, branches too)."""
        import llama_cpp

        keep = max(keep, 0)
        if not llama_cpp.llama_memory_seq_rm(self.mem, 0, keep if keep else -1, -1):
            llama_cpp.llama_memory_clear(self.mem, True)
            self.branches.clear()
            keep = 0
        del self.kv[max(keep, 0) :]
        return len(self.kv)

    def evaluate(self, ids: list[int], prefix: list[int]) -> np.ndarray:
        """Logits of ``ids`` appended to ``prefix`` (which the caller holds as context): the cache
        keeps the longest common prefix it already has and evaluates the rest."""
        self.check_ids(ids, len(prefix))
        n = common(self.kv, prefix)
        n = self.reset(n)
        if n < len(prefix):
            self.decode(prefix[n:], n, outputs=False)
        return self.decode(ids, len(prefix), outputs=True)

    # ---- branches: many continuations of a shared context in one forward pass -----------------
    def branch_logits(self, seqs: "list[list[int]]") -> np.ndarray:
        """float32 logits [len(seqs), vocab] after the last token of each (checked, non-empty)
        token sequence; see :meth:`~.llamacpp_backend.LlamaCppBackend.branch_logits`."""
        self.drop_branches(lambda toks: len(toks) - common(toks, seqs[0]) > BRANCH_KEEP)
        out = np.empty((len(seqs), self.vocab), np.float32)
        self.last_branch_tokens = 0
        group: list[int] = []
        for i in range(len(seqs) + 1):
            full = (
                i == len(seqs)
                or len(group) == (N_SEQ - 1) // 2
                or sum(len(seqs[j]) for j in group) + len(seqs[i]) > N_BATCH
            )
            if group and full:
                todo = [seqs[j] for j in group]
                shared = todo[0][: min(map(len, todo)) - 1]
                for s in todo[1:]:
                    shared = shared[: common(shared, s)]
                if len(todo) > 1 and shared and self._longest_held(shared)[1] < len(shared):
                    self._branch_group([shared])  # evaluate the shared part once, then branch off it
                out[group] = self._branch_group(todo)
                group = []
            if i < len(seqs):
                group.append(i)
        return out

    def _longest_held(self, s: "list[int]") -> tuple[int, int]:
        """(the K/V sequence holding the longest prefix of ``s``, that prefix's length)."""
        held = [(0, self.kv)] + list(self.branches.items())
        return max(((sid, common(toks, s)) for sid, toks in held), key=lambda x: x[1])

    def _branch_group(self, seqs: "list[list[int]]", retry: bool = True) -> np.ndarray:
        import llama_cpp

        mem, b = self.mem, self.batch
        # (source sequence, shared length) per request; at least its last token is evaluated
        plan = [(src, min(m, len(s) - 1)) for s, (src, m) in zip(seqs, map(self._longest_held, seqs))]
        sources = {src for src, _ in plan}
        free = [sid for sid in range(1, N_SEQ) if sid not in self.branches]
        free += [sid for sid in self.branches if sid not in sources]  # then LRU first
        n = 0
        dests = free[: len(seqs)]
        for (src, m), dst, s in zip(plan, dests, seqs):
            llama_cpp.llama_memory_seq_rm(mem, dst, -1, -1)
            if m:
                llama_cpp.llama_memory_seq_cp(mem, src, dst, 0, m)
            for j in range(m, len(s)):
                b.token[n], b.pos[n], b.n_seq_id[n], b.logits[n] = s[j], j, 1, j == len(s) - 1
                b.seq_id[n][0] = dst
                n += 1
        for dst in dests:
            self.branches.pop(dst, None)
        b.n_tokens = n
        rc = llama_cpp.llama_decode(self.llm.ctx, b)
        if rc != 0:
            self.drop_branches(lambda toks: True)
            if rc == 1 and retry:  # no room in the cache: retry from sequence 0 alone
                return self._branch_group(seqs, retry=False)
            raise RuntimeError(f"llama_decode failed with code {rc}")
        for dst, s in zip(dests, seqs):
            self.branches[dst] = s
        self.last_branch_tokens += n
        ptr = llama_cpp.llama_get_logits(self.llm.ctx)
        return np.ctypeslib.as_array(ptr, shape=(len(seqs) * self.vocab,)).reshape(len(seqs), self.vocab).copy()

    def drop_branches(self, which: Callable[[list[int]], bool]) -> None:
        """Remove the branches whose tokens ``which`` accepts from the cache."""
        import llama_cpp

        for sid in [sid for sid, toks in self.branches.items() if which(toks)]:
            llama_cpp.llama_memory_seq_rm(self.mem, sid, -1, -1)
            del self.branches[sid]
