"""The engine's public entry point: LLM, with vLLM's offline API and a streaming form."""

from __future__ import annotations

import itertools
from collections.abc import Sequence as SequenceOf
from typing import Any

import torch
from transformers import AutoTokenizer

from engine.block_manager import BlockManager
from engine.config import load_model_config
from engine.device import auto_kv_cache_bytes, parse_memory_size, resolve_device, resolve_dtype
from engine.fetch import local_model_dir
from engine.loader import load_model
from engine.model_runner import ModelRunner, kv_cache_bytes_per_block
from engine.outputs import RequestOutput
from engine.quant.linear import QuantLinear
from engine.quant.scheme import resolve_quantization
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Sequence
from engine.stopping import IncrementalDetokenizer, check_finished


class LLM:
    def __init__(
        self,
        model: str,
        dtype: str | torch.dtype = "auto",
        device: str | torch.device = "auto",
        quantization: str | None = None,
        block_size: int = 16,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 4096,
        kv_cache_memory: int | str = "auto",
        enable_prefix_caching: bool = True,
        seed: int = 0,
        max_model_len: int | None = None,
        enforce_eager: bool = False,
    ) -> None:
        """As vLLM's LLM. enforce_eager: never replay decode steps from CUDA graphs
        (engine/cuda_graphs.py; on CUDA they are captured at start-up by default)."""
        for name, value in (
            ("block_size", block_size),
            ("max_num_seqs", max_num_seqs),
            ("max_num_batched_tokens", max_num_batched_tokens),
        ):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        model_dir = local_model_dir(str(model))  # a local folder, s3:// or a hub name
        self.model_path = str(model)
        self.config = load_model_config(model_dir)
        # None: as the checkpoint is (GPTQ or float); "int8" / "int4[-gN]": rounded at load.
        self.quant_scheme = resolve_quantization(quantization, model_dir)
        self.quantization = None if self.quant_scheme is None else self.quant_scheme.name

        if max_model_len is None:
            max_model_len = self.config.max_position_embeddings
        if not 0 < max_model_len <= self.config.max_position_embeddings:
            raise ValueError(
                f"max_model_len must be in 1..{self.config.max_position_embeddings} "
                f"(the model's max_position_embeddings), got {max_model_len}"
            )
        self.max_model_len = max_model_len
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = load_model(
            self.config, model_dir, self.dtype, self.device, self.quant_scheme
        )

        num_blocks = self._num_kv_blocks(
            kv_cache_memory, block_size, max_num_seqs, max_num_batched_tokens
        )
        self.block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs, max_num_batched_tokens)
        # A sequence may grow only as long as both the context and the whole pool allow.
        self._max_seq_len = min(max_model_len, num_blocks * block_size)
        self.runner = ModelRunner(
            self.model, num_blocks, block_size, self.dtype, self.device, seed,
            decode_graphs=self.device.type == "cuda" and not enforce_eager,
            max_num_seqs=max_num_seqs, max_seq_len=self._max_seq_len,
        )
        tokenizer_eos = self.tokenizer.eos_token_id
        self._eos_token_ids = frozenset(
            self.config.eos_token_ids + (() if tokenizer_eos is None else (tokenizer_eos,))
        )
        self._requests: dict[str, Sequence] = {}
        self._undelivered: list[RequestOutput] = []  # finished outside step(): aborts
        self._generate_ids = itertools.count()
        self._counters = dict.fromkeys(
            ("steps", "prompt_tokens", "generated_tokens", "scheduled_tokens", "kv_blocks_peak"),
            0,
        )

    # -- offline API ---------------------------------------------------------------------

    def generate(
        self,
        prompts: list[str] | list[list[int]],
        params: SamplingParams | SequenceOf[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; outputs in prompt order.

        A prompt that cannot run (empty, longer than the context or the KV pool) comes
        back with finish_reason "error" instead of failing the whole call.
        """
        if not isinstance(prompts, list) or not prompts:
            raise ValueError("prompts must be a non-empty list of strings or token id lists")
        if params is None or isinstance(params, SamplingParams):
            params_list = [params or SamplingParams()] * len(prompts)
        else:
            params_list = list(params)
            if len(params_list) != len(prompts):
                raise ValueError(
                    f"got {len(params_list)} SamplingParams for {len(prompts)} prompts"
                )
        results: dict[str, RequestOutput] = {}
        order = []
        for prompt, request_params in zip(prompts, params_list, strict=True):
            request_id = f"generate-{next(self._generate_ids)}"
            order.append(request_id)
            prompt_ids: list[int] = []
            try:
                prompt_ids = self._tokenize(prompt)
                self.add_request(request_id, prompt_ids, request_params)
            except ValueError as exc:
                results[request_id] = RequestOutput.failed(request_id, prompt_ids, str(exc))
        pending = set(order) - set(results)
        while pending:
            for output in self.step():
                if output.request_id in pending:
                    pending.discard(output.request_id)
                    results[output.request_id] = output
                else:  # a streaming request's: hand it out with the next step()
                    self._undelivered.append(output)
        return [results[request_id] for request_id in order]

    # -- streaming API -------------------------------------------------------------------

    def add_request(
        self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None
    ) -> None:
        """Queue a request; ValueError at once for one that can never run."""
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be SamplingParams, got {type(params).__name__}")
        prompt_ids = self._tokenize(prompt)
        self._check_prompt(prompt_ids)
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        detokenizer = IncrementalDetokenizer(self.tokenizer, prompt_ids)
        seq = Sequence(request_id, prompt_ids, params, generator, detokenizer)
        self._requests[request_id] = seq
        self.scheduler.add(seq)
        self._counters["prompt_tokens"] += len(prompt_ids)

    def step(self) -> list[RequestOutput]:
        """Run one engine step; return the requests that finished in it (and any aborted)."""
        finished, self._undelivered = self._undelivered, []
        if not self.scheduler.has_unfinished():
            return finished
        batch = self.scheduler.schedule()
        if not batch.seqs:
            raise RuntimeError("scheduler made no progress with requests pending")
        sampled = self.runner.run(batch)
        for seq, num_new in zip(batch.seqs, batch.num_new_tokens, strict=True):
            seq.num_computed_tokens += num_new
            self.block_manager.register_full_blocks(seq)
        for seq, token_id in sampled.items():
            reason = check_finished(seq, token_id, self._eos_token_ids, self._max_seq_len)
            if reason is not None:
                finished.append(self._finish(seq, reason))
        self._counters["steps"] += 1
        self._counters["scheduled_tokens"] += batch.num_tokens
        self._counters["generated_tokens"] += len(sampled)
        self._counters["kv_blocks_peak"] = max(
            self._counters["kv_blocks_peak"], self.block_manager.num_used_blocks
        )
        return finished

    def abort_request(self, request_id: str) -> None:
        """Stop a request; its output (finish_reason "aborted") comes with the next step()."""
        seq = self._requests.get(request_id)
        if seq is not None:
            self._undelivered.append(self._finish(seq, "aborted"))

    def has_unfinished_requests(self) -> bool:
        return self.num_unfinished_requests() > 0

    def num_unfinished_requests(self) -> int:
        """Requests whose final output step() has not returned yet."""
        return len(self._requests) + len(self._undelivered)

    def stats(self) -> dict[str, Any]:
        counters = self._counters
        budget = self.scheduler.max_num_batched_tokens
        return {
            **counters,
            "token_budget": budget,
            "mean_batch_fill": counters["scheduled_tokens"] / (counters["steps"] * budget)
            if counters["steps"]
            else 0.0,
            "kv_blocks_used": self.block_manager.num_used_blocks,
            "kv_blocks_total": self.block_manager.num_blocks,
            "preemptions": self.scheduler.num_preemptions,
            "prefix_cache_hit_tokens": self.scheduler.num_cache_hit_tokens,
            "weight_bytes": self._weight_bytes(),
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "quantization": self.quantization,
        }

    # -- internals -----------------------------------------------------------------------

    def _tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer(prompt)["input_ids"] if prompt else []
        if isinstance(prompt, list) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt
        ):
            return list(prompt)
        raise ValueError("a prompt must be a string or a list of token ids")

    def _check_prompt(self, token_ids: list[int]) -> None:
        if not token_ids:
            raise ValueError("prompt is empty")
        vocab = self.config.vocab_size
        if any(not 0 <= t < vocab for t in token_ids):
            raise ValueError(f"prompt has token ids outside the vocabulary [0, {vocab})")
        if len(token_ids) > self.max_model_len:
            raise ValueError(
                f"prompt has {len(token_ids)} tokens, more than the context length "
                f"{self.max_model_len}"
            )
        if len(token_ids) > self._max_seq_len:
            raise ValueError(
                f"prompt has {len(token_ids)} tokens, more than the KV cache holds "
                f"({self._max_seq_len} tokens)"
            )

    def _finish(self, seq: Sequence, reason: str) -> RequestOutput:
        self.scheduler.finish(seq)
        del self._requests[seq.request_id]
        text = seq.stop_string_text
        if text is None:
            seq.detokenizer.flush()
            text = seq.detokenizer.text
        return RequestOutput(
            request_id=seq.request_id,
            prompt_token_ids=seq.prompt_token_ids,
            token_ids=seq.output_token_ids,
            text=text,
            finish_reason=reason,
            error=None,
            prompt_tokens=seq.num_prompt_tokens,
            completion_tokens=seq.num_output_tokens,
            cached_tokens=seq.cached_tokens or 0,
        )

    def _num_kv_blocks(
        self,
        kv_cache_memory: int | str,
        block_size: int,
        max_num_seqs: int,
        max_num_batched_tokens: int,
    ) -> int:
        block_bytes = kv_cache_bytes_per_block(self.model, block_size, self.dtype)
        if kv_cache_memory == "auto":
            config = self.config
            itemsize = self.dtype.itemsize
            per_token = 4 * config.hidden_size + 3 * config.intermediate_size
            per_token += 2 * (config.num_heads + 2 * config.num_kv_heads) * config.head_dim
            # float32 logits, probabilities, sort order and sampling noise per sequence
            sampling = 4 * 4 * max_num_seqs * config.vocab_size
            reserved = max_num_batched_tokens * per_token * itemsize + sampling
            # Portable decode attention gathers one layer's K and V blocks of the running
            # sequences into a reused buffer (engine/attention.py Workspace): room for it
            # beside the pool (the CPU kernel reads in place and leaves this spare).
            gather_fraction = 1.25 / config.num_layers
            memory = auto_kv_cache_bytes(self.device, reserved, gather_fraction)
            # More than every sequence at full length could use is wasted.
            blocks_per_seq = -(-self.max_model_len // block_size)
            num_blocks = min(memory // block_bytes, max_num_seqs * blocks_per_seq)
        else:
            num_blocks = parse_memory_size(kv_cache_memory) // block_bytes
        if num_blocks < 1:
            raise ValueError(
                f"kv_cache_memory {kv_cache_memory!r} is too small for one KV block "
                f"({block_bytes} bytes)"
            )
        return num_blocks

    def _weight_bytes(self) -> int:
        """Bytes the weights take where they live: packed layers count what they hold."""
        tensors = itertools.chain(self.model.parameters(), self.model.buffers())
        # Non-persistent buffers (the RoPE table) are derived state, not weights.
        derived = {id(b) for b in self.model.model.rotary_emb.buffers()}
        total = sum(t.numel() * t.element_size() for t in tensors if id(t) not in derived)
        # QuantLinear keeps its packed tensors outside parameters() and buffers().
        return total + sum(
            m.weight_bytes() for m in self.model.modules() if isinstance(m, QuantLinear)
        )
