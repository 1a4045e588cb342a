"""Greedy batched generation on llama.cpp through llama-cpp-python's low-level API, batched
the way llama-batched-bench batches: many sequences per llama_decode call.

Up to n_seq_max rows run at once, each its own sequence id with its own KV. A step either
feeds prompt chunks (of as many rows as fit n_batch tokens; new rows are admitted while a
sequence id is free) or, when no prompt is pending, one token for every running row.
Keeping the two apart lets llama.cpp split a step into even micro-batches per sequence. A
row stops after its own max tokens (EOS is not looked at); its KV is then dropped and its
sequence id taken by the next waiting row: continuous batching when rows > n_seq_max.
"""

from __future__ import annotations

import ctypes
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# llama.cpp's LLAMA_MAX_SEQ (src/llama-cparams.h): the most sequence ids a context takes.
MAX_SEQUENCES = 256
GGML_LOG_LEVEL_ERROR = 4


@dataclass
class Row:
    index: int
    prompt: list[int]
    max_tokens: int
    seq: int
    fed: int = 0  # tokens of this row already in its KV (prompt, then generated)
    out: list[int] = field(default_factory=list)


def quiet_logs() -> None:
    """Forward only llama.cpp's errors: its load and quantize logs are hundreds of lines."""
    import llama_cpp

    global _LOG_CALLBACK  # ctypes must keep the callback alive for as long as llama.cpp may call it

    @llama_cpp.llama_log_callback
    def callback(level: int, text: bytes, _user: Any) -> None:
        if level == GGML_LOG_LEVEL_ERROR:
            print(text.decode(errors="replace"), end="", flush=True)

    _LOG_CALLBACK = callback
    llama_cpp.llama_log_set(callback, ctypes.c_void_p())


_LOG_CALLBACK: Any = None


class LlamaCppRunner:
    """One llama.cpp model and context sized for a workload; close() frees them."""

    def __init__(self, model_path: Path, *, n_seq_max: int, n_ctx_seq: int, n_batch: int,
                 threads: int) -> None:
        import llama_cpp

        self.lib = llama_cpp
        quiet_logs()
        llama_cpp.llama_backend_init()
        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = 0
        self.model = llama_cpp.llama_model_load_from_file(str(model_path).encode(), model_params)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {model_path}")
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        self.n_seq_max = min(n_seq_max, MAX_SEQUENCES)
        params = llama_cpp.llama_context_default_params()
        # A KV stream per sequence (kv_unified off, llama-batched-bench's default): a token
        # attends to its own sequence's cells only, not to every running sequence's.
        params.kv_unified = False
        params.n_seq_max = self.n_seq_max
        params.n_ctx = self.n_seq_max * n_ctx_seq  # llama.cpp gives each stream n_ctx / n_seq_max
        params.n_batch = n_batch
        params.n_threads = params.n_threads_batch = threads
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        params.no_perf = True
        self.ctx = llama_cpp.llama_init_from_model(self.model, params)
        if not self.ctx:
            llama_cpp.llama_model_free(self.model)
            raise RuntimeError("llama.cpp could not create a context (KV cache too big?)")
        self.n_batch = llama_cpp.llama_n_batch(self.ctx)
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self.steps = 0

    def close(self) -> None:
        self.lib.llama_batch_free(self.batch)
        self.lib.llama_free(self.ctx)
        self.lib.llama_model_free(self.model)

    def __enter__(self) -> LlamaCppRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def generate(self, prompts: list[list[int]], max_tokens: list[int]) -> list[list[int]]:
        """Greedy tokens for every row, exactly max_tokens[i] of them for row i."""
        waiting = deque(range(len(prompts)))
        free = list(range(self.n_seq_max - 1, -1, -1))
        running: list[Row] = []
        outputs: list[list[int]] = [[] for _ in prompts]
        while waiting or running:
            while waiting and free:
                i = waiting.popleft()
                running.append(Row(i, prompts[i], max_tokens[i], free.pop()))
            feeds = self.prompt_chunks(running) or [
                (row, [row.out[-1]], True) for row in running]
            for row, token in zip([r for r, _, wants in feeds if wants],
                                  self.decode(feeds), strict=True):
                row.out.append(int(token))
            for row, tokens, _ in feeds:
                row.fed += len(tokens)
            for row in [r for r in running if len(r.out) >= r.max_tokens]:
                outputs[row.index] = row.out
                self.lib.llama_memory_seq_rm(self.memory, row.seq, -1, -1)
                free.append(row.seq)
                running.remove(row)
        return outputs

    def prompt_chunks(self, running: list[Row]) -> list[tuple[Row, list[int], bool]]:
        """The next prompt tokens of rows still prefilling, at most n_batch in all; a row
        wants logits when its chunk ends its prompt (they give its first token)."""
        feeds, room = [], self.n_batch
        for row in running:
            left = len(row.prompt) - row.fed
            if left > 0 and room > 0:
                take = min(left, room)
                feeds.append((row, row.prompt[row.fed:row.fed + take], take == left))
                room -= take
        return feeds

    def decode(self, feeds: list[tuple[Row, list[int], bool]]) -> np.ndarray:
        """One llama_decode of the feeds; the argmax token of each logits row, in order."""
        batch, n = self.batch, 0
        for row, tokens, wants_logits in feeds:
            for offset, token in enumerate(tokens):
                batch.token[n] = token
                batch.pos[n] = row.fed + offset
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = row.seq
                batch.logits[n] = wants_logits and offset == len(tokens) - 1
                n += 1
        batch.n_tokens = n
        status = self.lib.llama_decode(self.ctx, batch)
        if status != 0:
            raise RuntimeError(f"llama_decode returned {status} for {n} tokens")
        self.steps += 1
        # Logits rows are stored contiguously in the order the batch asked for them.
        outputs = sum(wants for _, _, wants in feeds)
        logits = np.ctypeslib.as_array(self.lib.llama_get_logits(self.ctx),
                                       shape=(outputs, self.n_vocab))
        return logits.argmax(axis=1)
