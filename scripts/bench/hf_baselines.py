"""The Hugging Face baselines, each run in a child: naive `generate` over fixed batches,
and transformers' continuous batching under the engine's batch and KV limits."""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from engine import EngineConfig
from engine.config import ModelConfig, load_model_config
from engine.device import resolve_device, resolve_dtype
from scripts.bench.child import Skip, synchronize, task_settings
from scripts.bench.sizes import kv_budget, kv_bytes_per_token
from scripts.bench.workload import Workload, warmup_prompts


def load_hf_model(settings: EngineConfig) -> Any:
    from transformers import AutoModelForCausalLM

    device = resolve_device(settings.device)
    model = AutoModelForCausalLM.from_pretrained(
        settings.model, dtype=resolve_dtype(settings.dtype, device)
    )
    return model.to(device).eval()


def task_naive(task: dict[str, Any]) -> dict[str, Any]:
    """HF generate over fixed batches in input order: what a first hand-written job does."""
    device = task["device"]
    model = load_hf_model(task_settings(task))
    work = Workload.read(task["workload_file"])
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0

    def generate(prompts: list[list[int]], new_tokens: int) -> int:
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts],
                            device=device)
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 pad_token_id=pad)
        return out.shape[1] - width

    generate(warmup_prompts(model.config.vocab_size), 2)
    batch, useful, computed, steps = task["naive_batch"], 0, 0, 0
    synchronize(device)
    started = time.perf_counter()
    for start in range(0, len(work.prompts), batch):
        rows = slice(start, start + batch)
        longest = max(work.max_tokens[rows])
        made = generate(work.prompts[rows], longest)
        if made != longest:
            raise RuntimeError(f"generate made {made} tokens, asked for {longest}")
        useful += sum(work.max_tokens[rows])
        computed += made * len(work.prompts[rows])
        steps += made  # one prefill step (which yields the first token) + made-1 decode steps
    synchronize(device)
    return {"status": "ok", "wall_s": time.perf_counter() - started, "useful_tokens": useful,
            "generated_tokens_computed": computed, "steps": steps}


def task_hf_cb(task: dict[str, Any]) -> dict[str, Any]:
    """transformers' continuous batching. `generate_batch` takes one max_new_tokens for all
    rows, so we drive the manager it wraps, whose add_request takes it per row."""
    settings = task_settings(task)
    model = load_hf_model(settings)
    if not hasattr(model, "continuous_batching_context_manager"):
        raise Skip("this transformers has no continuous batching (generate_batch)")
    import transformers
    from transformers import GenerationConfig

    config_cls = getattr(transformers, "ContinuousBatchingConfig", None)
    if config_cls is None:
        try:
            from transformers.generation.configuration_utils import ContinuousBatchingConfig
        except ImportError as exc:
            raise Skip(f"this transformers has no ContinuousBatchingConfig: {exc}") from exc
        config_cls = ContinuousBatchingConfig
    quiet_psutil_complaint()
    work = Workload.read(task["workload_file"])
    shape = load_model_config(settings.model)
    cb_config = config_cls(
        max_batch_tokens=settings.max_num_batched_tokens,
        max_requests_per_batch=settings.max_num_seqs,
        allow_block_sharing=settings.enable_prefix_caching,
    )
    # Without a size, HF sizes the cache from free memory: on CPU ~90% of all RAM.
    cb_config.num_blocks = hf_cb_blocks(settings, shape, getattr(cb_config, "page_size", 256))
    gen_config = GenerationConfig(do_sample=False, max_new_tokens=max(work.max_tokens),
                                  eos_token_id=-1, pad_token_id=model.config.pad_token_id)
    with model.continuous_batching_context_manager(
        generation_config=gen_config, continuous_batching_config=cb_config, block=True,
        timeout=30,
    ) as manager:
        # First request outside the timing: the manager builds its cache on first use.
        collect(manager, [manager.add_request(p, max_new_tokens=2, eos_token_id=-1)
                          for p in warmup_prompts(shape.vocab_size)])
        synchronize(task["device"])
        started = time.perf_counter()
        ids = [manager.add_request(p, max_new_tokens=n, eos_token_id=-1)
               for p, n in zip(work.prompts, work.max_tokens, strict=True)]
        results = collect(manager, ids)
        synchronize(task["device"])
        wall = time.perf_counter() - started
    errors = [r.error for r in results.values() if r.error]
    if errors or len(results) != len(ids):
        raise RuntimeError(f"{len(ids) - len(results)} requests missing, errors: {errors[:3]}")
    useful = sum(min(len(results[i].generated_tokens), n)
                 for i, n in zip(ids, work.max_tokens, strict=True))
    return {"status": "ok", "wall_s": wall, "useful_tokens": useful,
            "note": "manager of generate_batch, per-row max_new_tokens, eos_token_id=-1"}


def hf_cb_blocks(settings: EngineConfig, shape: ModelConfig, page_tokens: int) -> int | None:
    """HF's num_blocks for the KV budget we give every system (None: HF's own auto sizing)."""
    budget = kv_budget(settings)
    if budget is None:
        return None
    block_bytes = page_tokens * kv_bytes_per_token(shape, settings.dtype)
    return max(1, budget // block_bytes)


def collect(manager: Any, ids: list[str]) -> dict[str, Any]:
    """Wait for every request in ids to finish; return them by id."""
    wanted, done = set(ids), {}
    while wanted - done.keys():
        result = manager.get_result(timeout=1)
        if result is None:
            if not manager.is_running():
                break
            continue
        if result.request_id in wanted and result.is_finished():
            done[result.request_id] = result
    return done


def quiet_psutil_complaint() -> None:
    """HF CB logs an ERROR on CPU without psutil even when num_blocks makes memory moot."""
    logging.getLogger("ContinuousBatchingLogger").addFilter(
        lambda record: "without psutil" not in record.getMessage()
        and "psutil is not available" not in record.getMessage()
    )
