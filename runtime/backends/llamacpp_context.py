"""A llama.cpp model and one context for the llamacpp backend, through llama.cpp's C API."""

from __future__ import annotations

N_BATCH = 512  # tokens per llama_decode batch (n_batch = n_ubatch)
N_SEQ = 32  # K/V sequences in the (unified) cache: 0 for decoding, the rest for branches


class LlamaContext:
    """A llama.cpp model and one context, through the C API (llama-cpp-python's ``Llama`` does
    not expose the unified multi-sequence K/V cache that
    :meth:`~.llamacpp_backend.LlamaCppBackend.branch_logits` needs). ``exact``: keep the K/V
    cache in float32 and flash attention off (for an f32 base that is there to compute as torch
    does)."""

    def __init__(self, path, n_ctx: int, threads: int, exact: bool) -> None:
        import llama_cpp

        llama_cpp.llama_backend_init()
        try:  # as Llama(verbose=False) does, unless the application set the level itself
            from llama_cpp._logger import logger, set_verbose

            if logger.level == 0:
                set_verbose(False)
        except ImportError:  # pragma: no cover - a future llama-cpp-python without it
            pass
        mp = llama_cpp.llama_model_default_params()
        mp.n_gpu_layers = 0
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode("utf-8"), mp)
        if not self.model:
            raise ValueError("llama_model_load_from_file failed")
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch = n_ctx, N_BATCH, N_BATCH
        cp.n_threads = cp.n_threads_batch = threads
        cp.n_seq_max, cp.kv_unified = N_SEQ, True
        # sliding-window layers (Gemma 3) keep every position, not just the window: the backend
        # cuts sequences at any position and copies prefixes into branches
        cp.swa_full = True
        cp.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        if exact:
            cp.type_k = cp.type_v = 0  # GGML_TYPE_F32
        self.ctx = llama_cpp.llama_init_from_model(self.model, cp)
        if not self.ctx:
            llama_cpp.llama_model_free(self.model)
            raise ValueError("llama_init_from_model failed")
        self._vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))

    def n_ctx(self) -> int:
        import llama_cpp

        return llama_cpp.llama_n_ctx(self.ctx)

    def n_vocab(self) -> int:
        return self._vocab

    def close(self) -> None:
        import llama_cpp

        if self.ctx:
            llama_cpp.llama_free(self.ctx)
        if self.model:
            llama_cpp.llama_model_free(self.model)
        self.ctx = self.model = None
