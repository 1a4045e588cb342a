"""One LLM fed by several request streams at once, each from a thread of its own.

A worker that runs two shards at a time keeps one engine's batches full across the
boundary between them: while one shard's last long rows run, the other's rows fill the
batch. Each stream is a `SharedClient` with the LLM's streaming API over its own
requests: `add_request`, `abort_request`, and `step()`, which runs one engine step for
every stream (whichever client steps, steps for all) and returns only the caller's
finished requests; the others' wait in their clients until they step.

Each step's wall time is shared out by the tokens each stream had in it, so the streams'
`busy_seconds` add up to the engine's time, not to more. A step that fails (out of
memory, say) fails for every stream that had requests in it: each is told when it next
steps, and takes its own requests back.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

import torch

from engine.engine_config import EngineConfig
from engine.llm import LLM
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams


class SharedLLM:
    """An LLM behind a lock, with the requests of each client routed back to it."""

    def __init__(self, llm: LLM) -> None:
        self.llm = llm
        self._lock = threading.Lock()
        self._owners: dict[str, SharedClient] = {}  # request id -> its client

    def client(self) -> SharedClient:
        return SharedClient(self)

    def _step(self, caller: SharedClient) -> None:
        """One engine step for everyone (the caller holds the lock, and is told of a
        failure at once; the others when they next step)."""
        start = time.monotonic()
        try:
            finished = self.llm.step()
        except Exception as failure:
            requests_of = Counter(self._owners.values())
            for owner, mine in requests_of.items():
                owner.others_in_failed_step = len(self._owners) - mine
                if owner is not caller:
                    owner._failure = failure
            raise
        seconds = time.monotonic() - start
        tokens = self.llm.last_step_tokens
        total = sum(tokens.values())
        for request_id, count in tokens.items():
            owner = self._owners.get(request_id)
            if owner is not None:
                owner.busy_seconds += seconds * count / total
        for output in finished:
            owner = self._owners.pop(output.request_id, None)
            if owner is not None:
                owner._finished.append(output)


class SharedClient:
    """One stream of requests into a SharedLLM: the LLM's streaming API over its own."""

    def __init__(self, shared: SharedLLM) -> None:
        self._shared = shared
        self._finished: list[RequestOutput] = []
        self._failure: Exception | None = None
        self.busy_seconds = 0.0  # this stream's share of the engine's step time
        # The other streams' requests in the engine at the last step that failed for this
        # one (with many, its own few requests alone may not be what ran out of memory).
        self.others_in_failed_step = 0

    @property
    def llm(self) -> LLM:
        return self._shared.llm

    # What a shard's runner reads of its engine (jobs/runner.py), the shared LLM's.
    @property
    def tokenizer(self) -> Any:
        return self._shared.llm.tokenizer

    @property
    def engine_config(self) -> EngineConfig:
        return self._shared.llm.engine_config

    @property
    def quantization(self) -> str | None:
        return self._shared.llm.quantization

    @property
    def device(self) -> torch.device:
        return self._shared.llm.device

    def stats(self) -> dict[str, Any]:
        with self._shared._lock:
            return self._shared.llm.stats()

    def add_request(self, request_id: str, prompt: str | list[int],
                    params: SamplingParams | None = None) -> None:
        """As LLM.add_request; request ids are the engine's, so unique across clients."""
        with self._shared._lock:
            self._shared.llm.add_request(request_id, prompt, params)
            self._shared._owners[request_id] = self

    def abort_request(self, request_id: str) -> None:
        """As LLM.abort_request, but the aborted output is this client's at once: its next
        step() returns it without an engine step (which would run the other streams'
        requests too: after running out of memory, say, that step could fail again)."""
        with self._shared._lock:
            if self._shared._owners.get(request_id) is not self:
                return
            del self._shared._owners[request_id]
            self._shared.llm.abort_request(request_id)
            aborted = self._shared.llm.take_aborted(request_id)
            if aborted is not None:
                self._finished.append(aborted)

    def step(self) -> list[RequestOutput]:
        """Run one engine step (unless finished requests of this client are waiting) and
        return this client's finished requests; raise the failure of a step that had this
        client's requests in it."""
        with self._shared._lock:
            if self._failure is not None:
                failure, self._failure = self._failure, None
                raise failure
            if not self._finished:
                self._shared._step(self)
            finished, self._finished = self._finished, []
            return finished
