"""The engine's public entry point: LLM, with vLLM's offline API and a streaming form."""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Sequence as SequenceOf
from dataclasses import replace
from typing import Any

import torch
from transformers import AutoTokenizer

from engine.allocator import keep_freed_memory
from engine.block_manager import BlockManager
from engine.config import load_model_config
from engine.device import auto_kv_cache_bytes, parse_memory_size, resolve_device, resolve_dtype
from engine.engine_config import EngineConfig
from engine.fetch import local_model_dir
from engine.loader import load_model
from engine.logprobs import TokenTexts
from engine.model_runner import ModelRunner, kv_cache_bytes_per_block
from engine.outputs import CompletionOutput, FinishReason, RequestOutput
from engine.quant.linear import QuantLinear
from engine.quant.scheme import resolve_quantization
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Sequence
from engine.stopping import IncrementalDetokenizer, check_finished
from engine.structured.decoding import ConstrainedDecoding


class LLM:
    """An engine over one model, with vLLM's offline API and a streaming form.

    Public attributes, to read (not to set):
      engine_config  the EngineConfig it runs with, every value resolved (see there)
      config         the model's ModelConfig (engine/config.py)
      tokenizer      the model's own transformers tokenizer
      model          the CausalLM (engine/model.py)
      quant_scheme   how its projections are held: a QuantScheme, or None (float weights)
      device, dtype, quantization, max_model_len: engine_config's, for short
    """

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
        """As vLLM's LLM; each setting is described in engine/engine_config.py."""
        requested = EngineConfig(
            model=str(model), dtype=dtype, device=device, quantization=quantization,
            block_size=block_size, max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens, kv_cache_memory=kv_cache_memory,
            enable_prefix_caching=enable_prefix_caching, seed=seed,
            max_model_len=max_model_len, enforce_eager=enforce_eager,
        )
        loaded = self._load(requested)
        block_bytes = kv_cache_bytes_per_block(self.model, loaded.block_size, loaded.dtype)
        num_blocks = self._num_kv_blocks(loaded, block_bytes)
        self.engine_config = replace(loaded, kv_cache_memory=num_blocks * block_bytes)
        self._build_pipeline(num_blocks)
        self._requests: dict[str, _Request] = {}
        self._undelivered: list[RequestOutput] = []  # finished outside step(): aborts
        # The tokens each request had in the last step (engine/shared.py shares its time).
        self.last_step_tokens: dict[str, int] = {}
        self._generate_ids = itertools.count()
        self._counters = dict.fromkeys(
            ("steps", "prompt_tokens", "generated_tokens", "scheduled_tokens", "scheduled_seqs",
             "kv_blocks_peak"),
            0,
        )

    @property
    def device(self) -> torch.device:
        return self.engine_config.device

    @property
    def dtype(self) -> torch.dtype:
        return self.engine_config.dtype

    @property
    def quantization(self) -> str | None:
        return self.engine_config.quantization

    @property
    def max_model_len(self) -> int:
        return self.engine_config.max_model_len

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
        samples = [self._sample(request_id, prompt_ids, params, i) for i in range(params.n)]
        for fork in samples[1:]:
            fork.prompt_logprobs = None  # the first sample scores the prompt for all
        self._requests[request_id] = _Request(samples)
        self.scheduler.add(samples[0], samples[1:])
        self._counters["prompt_tokens"] += len(prompt_ids)

    def step(self) -> list[RequestOutput]:
        """Run one engine step; return the requests that finished in it (and any aborted)."""
        finished, self._undelivered = self._undelivered, []
        self.last_step_tokens = {}
        if not self.scheduler.has_unfinished():
            return finished
        batch = self.scheduler.schedule()
        if not batch.seqs:
            raise RuntimeError("scheduler made no progress with requests pending")
        output = self.runner.run(batch, self._token_text, self._constrained)
        for seq, num_new in zip(batch.seqs, batch.num_new_tokens, strict=True):
            seq.num_computed_tokens += num_new
            self.block_manager.register_full_blocks(seq)
            self.last_step_tokens[seq.request_id] = (
                self.last_step_tokens.get(seq.request_id, 0) + num_new)
        for seq, scored in output.prompt_logprobs.items():
            seq.prompt_logprobs.extend(scored)
        for seq, token_id in output.tokens.items():
            if seq.logprobs is not None:
                seq.logprobs.append(output.logprobs[seq])
            reason = (self._constrained.advance(seq.structured, token_id)
                      if seq.structured is not None else None)
            reason = reason or check_finished(seq, token_id, self._eos_token_ids,
                                              self._max_seq_len)
            if reason is None and seq.structured is not None and seq.structured.is_terminated():
                reason = FinishReason.STOP  # complete, and only EOS could follow
            if reason is not None and (done := self._finish(seq, reason)) is not None:
                finished.append(done)
        self._counters["steps"] += 1
        self._counters["scheduled_tokens"] += batch.num_tokens
        self._counters["scheduled_seqs"] += len(batch.seqs)
        self._counters["generated_tokens"] += len(output.tokens)
        self._counters["kv_blocks_peak"] = max(
            self._counters["kv_blocks_peak"], self.block_manager.num_used_blocks
        )
        return finished

    def abort_request(self, request_id: str) -> None:
        """Stop a request; its output (finish_reason "aborted") comes with the next step()."""
        request = self._requests.get(request_id)
        if request is not None:
            # Only the last sample's _finish returns the request's output.
            ended = [self._finish(seq, FinishReason.ABORTED) for seq in request.unfinished_samples()]
            self._undelivered.append(ended[-1])

    def take_aborted(self, request_id: str) -> RequestOutput | None:
        """The aborted request's output, now rather than with the next step() (which then
        leaves it out); None if it is not waiting there. engine/shared.py hands it to the
        request's own stream this way, so taking it back runs no one else's requests."""
        for position, output in enumerate(self._undelivered):
            if output.request_id == request_id:
                return self._undelivered.pop(position)
        return None

    def has_unfinished_requests(self) -> bool:
        return self.num_unfinished_requests() > 0

    def num_unfinished_requests(self) -> int:
        """Requests whose final output step() has not returned yet."""
        return len(self._requests) + len(self._undelivered)

    def stats(self) -> dict[str, Any]:
        """Cumulative counters and what they say about the batches so far.

        occupancy (sequences per step / max_num_seqs) and mean_tokens_per_step answer "is
        the device kept busy"; token_budget_fill (tokens per step / max_num_batched_tokens)
        is the share of the token budget used, which decode steps never fill (one token per
        sequence) however full the batch.
        """
        counters, config = self._counters, self.engine_config
        steps = counters["steps"] or 1
        return {
            **counters,
            "max_num_seqs": config.max_num_seqs,
            "token_budget": config.max_num_batched_tokens,
            "occupancy": counters["scheduled_seqs"] / (steps * config.max_num_seqs),
            "mean_tokens_per_step": counters["scheduled_tokens"] / steps,
            "token_budget_fill": counters["scheduled_tokens"] / (steps * config.max_num_batched_tokens),
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

    def _sample(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                index: int) -> Sequence:
        """Sample `index` of a request: its own generator, detokenizer and grammar state."""
        generator = None
        if params.seed is not None:
            seed = sample_seed(params.seed, index)
            generator = torch.Generator(device=self.device).manual_seed(seed)
        detokenizer = IncrementalDetokenizer(self.tokenizer, prompt_ids)
        seq = Sequence(request_id, prompt_ids, params, generator, detokenizer, index)
        seq.structured = self._constrained.matcher(params.structured_outputs)
        return seq

    def _finish(self, seq: Sequence, reason: FinishReason) -> RequestOutput | None:
        """End one sample; the request's output once its last sample has ended."""
        self.scheduler.finish(seq)
        request = self._requests[seq.request_id]
        request.outputs[seq.sample_index] = seq.completion_output(reason)
        if request.unfinished_samples():
            return None
        del self._requests[seq.request_id]
        first = request.samples[0]
        return RequestOutput(
            request_id=seq.request_id,
            prompt_token_ids=first.prompt_token_ids,
            outputs=[output for output in request.outputs if output is not None],
            error=None,
            prompt_tokens=first.num_prompt_tokens,
            cached_tokens=first.cached_tokens or 0,
            prompt_logprobs=first.prompt_logprobs,
        )

    def _load(self, requested: EngineConfig) -> EngineConfig:
        """Fetch the model and load its config, tokenizer and weights; return the settings
        resolved for them."""
        model_dir = local_model_dir(requested.model)  # a local folder, s3:// or a hub name
        self.config = load_model_config(model_dir)
        self.quant_scheme = resolve_quantization(requested.quantization, model_dir)
        resolved = self._resolve(requested)
        if resolved.device.type == "cpu":
            keep_freed_memory()
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self._token_text = TokenTexts(self.tokenizer)  # Logprob.decoded_token
        self.model = load_model(
            self.config, model_dir, resolved.dtype, resolved.device, self.quant_scheme
        )
        tokenizer_eos = self.tokenizer.eos_token_id
        self._eos_token_ids = frozenset(
            self.config.eos_token_ids + (() if tokenizer_eos is None else (tokenizer_eos,))
        )
        return resolved

    def _resolve(self, requested: EngineConfig) -> EngineConfig:
        """requested, with what the model and the machine decide filled in: all but
        kv_cache_memory, which is sized once the weights are in place."""
        context = self.config.max_position_embeddings
        max_model_len = requested.max_model_len or context
        if max_model_len > context:
            raise ValueError(
                f"max_model_len must be in 1..{context} (the model's max_position_embeddings), "
                f"got {max_model_len}"
            )
        device = resolve_device(requested.device)
        return replace(
            requested, device=device, dtype=resolve_dtype(requested.dtype, device),
            quantization=None if self.quant_scheme is None else self.quant_scheme.name,
            max_model_len=max_model_len,
        )

    def _num_kv_blocks(self, config: EngineConfig, block_bytes: int) -> int:
        """The KV pool's size: kv_cache_memory's bytes, or for "auto" the memory left beside
        the weights and one step's activations (and no more than max_num_seqs can use)."""
        if config.kv_cache_memory == "auto":
            shape = self.config
            per_token = 4 * shape.hidden_size + 3 * shape.intermediate_size
            per_token += 2 * (shape.num_heads + 2 * shape.num_kv_heads) * shape.head_dim
            # float32 logits, probabilities, sort order and sampling noise per sequence
            sampling = 4 * 4 * config.max_num_seqs * shape.vocab_size
            reserved = config.max_num_batched_tokens * per_token * config.dtype.itemsize
            reserved += sampling
            # Portable decode attention gathers one layer's K and V blocks of the running
            # sequences into a reused buffer (engine/attention_metadata.py Workspace): room for it
            # beside the pool (the CPU kernel reads in place and leaves this spare).
            gather_fraction = 1.25 / shape.num_layers
            memory = auto_kv_cache_bytes(config.device, reserved, gather_fraction)
            # More than every sequence at full length could use is wasted.
            blocks_per_seq = -(-config.max_model_len // config.block_size)
            num_blocks = min(memory // block_bytes, config.max_num_seqs * blocks_per_seq)
        else:
            num_blocks = parse_memory_size(config.kv_cache_memory) // block_bytes
        if num_blocks < 1:
            raise ValueError(
                f"kv_cache_memory {config.kv_cache_memory!r} is too small for one KV block "
                f"({block_bytes} bytes)"
            )
        return num_blocks

    def _build_pipeline(self, num_blocks: int) -> None:
        """The KV pool's block manager, the scheduler and the model runner."""
        config = self.engine_config
        self.block_manager = BlockManager(
            num_blocks, config.block_size, config.enable_prefix_caching
        )
        self.scheduler = Scheduler(
            self.block_manager, config.max_num_seqs, config.max_num_batched_tokens
        )
        # A sequence may grow only as long as both the context and the whole pool allow.
        self._max_seq_len = min(config.max_model_len, num_blocks * config.block_size)
        self.runner = ModelRunner(
            self.model, config, num_blocks,
            decode_graphs=config.device.type == "cuda" and not config.enforce_eager,
        )
        self._constrained = ConstrainedDecoding(
            self.tokenizer, self.config.vocab_size, self._eos_token_ids, config.max_num_seqs
        )

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


class _Request:
    """A request's samples and the outputs of those that have ended."""

    def __init__(self, samples: list[Sequence]) -> None:
        self.samples = samples
        self.outputs: list[CompletionOutput | None] = [None] * len(samples)

    def unfinished_samples(self) -> list[Sequence]:
        return [seq for seq, out in zip(self.samples, self.outputs, strict=True) if out is None]


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample `index` of a request seeded with `seed`: the seed itself for the
    first sample (so n=1 draws as before), a hash of (seed, index) for the others, so each
    sample is reproducible whatever else runs beside it."""
    if index == 0:
        return seed
    digest = hashlib.blake2b(f"{seed}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # manual_seed takes up to 2**63 - 1
