"""LLMEngine: requests in; each `step()` schedules a batch, runs the model once, samples, reports."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import torch

from qwenkit.engine.block_manager import BlockManager
from qwenkit.engine.model_runner import ModelRunner
from qwenkit.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from qwenkit.engine.paged_attention import PagedKVCache
from qwenkit.engine.sampler import SamplingRow, sample
from qwenkit.engine.sampling_params import SamplingParams
from qwenkit.engine.scheduler import Scheduler
from qwenkit.engine.sequence import Sequence
from qwenkit.engine.text_output import TextOutput
from qwenkit.errors import QwenkitError
from qwenkit.tokenizer.reasoning import THINK_CLOSE, THINK_OPEN, prompt_opens_thinking
from qwenkit.weights.loader import LoadedModel, LoadPlan

THINKING_BUDGET_CLOSE = "\n" + THINK_CLOSE + "\n\n"


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = 16
    kv_cache_memory: int = 1 << 30  # bytes for the KV pool
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512  # per step; longer prompts are prefilled in chunks
    enable_prefix_caching: bool = True
    max_model_len: int | None = None  # default: the model's context
    kv_cache_dtype: str = "auto"  # "auto": the loader's choice (LoadPlan.kv_cache_dtype)


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    texts: list[TextOutput]
    metrics: RequestMetrics
    thinking_open: bool
    new_tokens: list[list[int]] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return len(self.seqs) == self.params.n and all(s.is_finished for s in self.seqs)


KV_CACHE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def kv_cache_dtype(name: str, plan: LoadPlan) -> torch.dtype:
    """The cache dtype `name` ("auto" or one of KV_CACHE_DTYPES) means for a model loaded by `plan`."""
    if name == "auto":
        return plan.kv_cache_dtype
    if name not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be auto or one of {', '.join(KV_CACHE_DTYPES)}, not {name!r}")
    return KV_CACHE_DTYPES[name]


class LLMEngine:
    def __init__(self, loaded: LoadedModel, config: EngineConfig = EngineConfig()):
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.config = config
        model_cfg = loaded.config
        context = loaded.plan.max_model_len
        self.max_model_len = min(config.max_model_len or context, context)
        kv_dtype = kv_cache_dtype(config.kv_cache_dtype, loaded.plan)
        per_token = PagedKVCache.bytes_per_token(
            model_cfg.num_hidden_layers, model_cfg.num_key_value_heads, model_cfg.head_dim, kv_dtype
        )
        num_blocks = max(2, config.kv_cache_memory // (per_token * config.block_size))
        self.cache = PagedKVCache(
            model_cfg.num_hidden_layers, num_blocks, config.block_size,
            model_cfg.num_key_value_heads, model_cfg.head_dim, kv_dtype,
        )
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens)
        self.runner = ModelRunner(loaded.model, self.cache)
        self.lora_adapters: dict[str, str] = {}  # name -> directory
        self.requests: dict[str, Request] = {}
        self._seq_ids = itertools.count()
        self._request_ids = itertools.count()
        self.think_open_id = self.tokenizer.token_to_id(THINK_OPEN)
        self.think_close_id = self.tokenizer.token_to_id(THINK_CLOSE)
        self.num_computed_tokens = 0  # tokens that went through the model (prefix-cache hits excluded)

    # ---- requests -------------------------------------------------------------------------------

    def default_sampling_params(self, **overrides) -> SamplingParams:
        return SamplingParams.from_generation_config(self.loaded.generation_config, **overrides)

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        lora_name: str | None = None,
    ) -> str:
        """Queue a request; `lora_name` runs it with an adapter added by `add_lora`."""
        params = params or self.default_sampling_params()
        if lora_name is not None and lora_name not in self.lora_adapters:
            raise QwenkitError(f"unknown LoRA adapter {lora_name!r}; loaded: {', '.join(self.lora_adapters) or 'none'}")
        request_id = request_id or f"req-{next(self._request_ids)}"
        if request_id in self.requests:
            raise QwenkitError(f"request id {request_id!r} is already in use")
        prompt_text = prompt if isinstance(prompt, str) else None
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self.validate_prompt(ids, params)
        now = time.monotonic()
        opens = prompt_opens_thinking(prompt_text if prompt_text is not None else self.tokenizer.decode(ids[-64:]))
        first = self._new_sequence(request_id, 0, ids, params, now, opens, lora_name)
        self.requests[request_id] = Request(
            request_id, prompt_text, ids, params, [first], [TextOutput(self.tokenizer, params)],
            RequestMetrics(now), opens, [[]],
        )
        self.scheduler.add(first)
        return request_id

    def validate_prompt(self, ids: list[int], params: SamplingParams) -> None:
        n = len(ids)
        if n == 0:
            raise QwenkitError("the prompt is empty")
        vocab = self.loaded.config.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:  # caught here, not as an index error inside a batch
            raise QwenkitError(f"prompt token ids must be in [0, {vocab}); got {min(ids)}..{max(ids)}")
        if n >= self.max_model_len:
            raise QwenkitError(
                f"the prompt has {n} tokens; the model's context holds {self.max_model_len} (prompt + output)"
            )
        worst = min(n + params.max_tokens, self.max_model_len)
        if self.block_manager.blocks_needed(worst) > self.block_manager.num_blocks:
            raise QwenkitError(
                f"prompt ({n} tokens) plus max_tokens ({params.max_tokens}) exceeds the KV cache "
                f"({self.block_manager.num_blocks * self.config.block_size} tokens); raise the KV cache memory"
            )

    def add_lora(self, name: str, directory) -> None:
        """Load a PEFT-format adapter; requests choose it by name, and batch with base-model requests."""
        from qwenkit.lora.attach import load_adapter

        if name in self.lora_adapters:
            raise QwenkitError(f"a LoRA adapter named {name!r} is already loaded")
        load_adapter(self.loaded.model, name, directory)
        self.lora_adapters[name] = str(directory)

    def _new_sequence(self, request_id, index, ids, params, now, thinking_open, lora_name=None) -> Sequence:
        generator = None
        if params.seed is not None:
            generator = torch.Generator().manual_seed(params.seed + index)
        seq = Sequence(next(self._seq_ids), request_id, index, list(ids), len(ids), params, now, generator=generator,
                       lora_name=lora_name)
        seq.in_thinking = thinking_open and params.thinking_budget is not None
        return seq

    def abort_request(self, request_id: str) -> RequestOutput | None:
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        for seq in request.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq)
                seq.finish_reason = "abort"
        request.metrics.finished_time = time.monotonic()
        return self._output(request)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # ---- one step -------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        if not batch:
            return []
        logits = self.runner.run(batch)
        self.num_computed_tokens += sum(item.num_tokens for item in batch)
        sampling: list[Sequence] = []
        for item in batch:
            if item.completes_prompt:  # the same rows the runner returned logits for, in order
                sampling.append(item.seq)
            item.seq.num_computed_tokens += item.num_tokens
            self.block_manager.register_computed_blocks(item.seq)
        rows = self._fork_samples(sampling, logits)
        seqs = [seq for seq, _ in rows]
        if not seqs:
            return []
        row_logits = logits[torch.tensor([r for _, r in rows])]
        tokens, logprobs = sample(row_logits, [self._sampling_row(s) for s in seqs])
        now = time.monotonic()
        touched: dict[str, Request] = {}
        for seq, token, lp in zip(seqs, tokens, logprobs):
            request = self.requests[seq.request_id]
            touched[request.request_id] = request
            if seq.forced_tokens:
                token, lp = seq.forced_tokens.pop(0), None
            self._append(request, seq, token, lp, now)
        outputs = []
        for request in touched.values():
            outputs.append(self._output(request))
            if request.finished:
                request.metrics.finished_time = now
                del self.requests[request.request_id]
        return outputs

    def _fork_samples(self, sampling: list[Sequence], logits: torch.Tensor) -> list[tuple[Sequence, int]]:
        """(sequence, logits row) pairs; a request with n > 1 gets its other samples at its first token."""
        rows = []
        for row, seq in enumerate(sampling):
            rows.append((seq, row))
            request = self.requests[seq.request_id]
            if seq.num_output_tokens == 0 and len(request.seqs) < request.params.n:
                for index in range(1, request.params.n):
                    child = self._new_sequence(
                        seq.request_id, index, seq.token_ids, request.params, seq.arrival_time, request.thinking_open,
                        seq.lora_name,
                    )
                    copy_from = self.block_manager.fork(seq, child)
                    if copy_from is not None:
                        self.cache.copy_block(copy_from, child.block_table[-1])
                    request.seqs.append(child)
                    request.texts.append(TextOutput(self.tokenizer, request.params))
                    request.new_tokens.append([])
                    self.scheduler.add_running(child)
                    rows.append((child, row))
        return rows

    def _sampling_row(self, seq: Sequence) -> SamplingRow:
        p = seq.params
        blocked = set(p.stop_token_ids)
        if not p.ignore_eos:
            blocked |= self.tokenizer.stop_token_ids
        return SamplingRow(p, seq.token_ids, seq.num_prompt_tokens, seq.generator, frozenset(blocked))

    def _append(self, request: Request, seq: Sequence, token: int, lp, now: float) -> None:
        seq.append_token(token, now)
        if lp is not None:
            seq.logprobs.append(lp)
        if request.metrics.first_token_time is None:
            request.metrics.first_token_time = now
            request.metrics.num_cached_tokens = seq.num_cached_tokens
        request.new_tokens[seq.index].append(token)
        self._track_thinking(seq, token)
        text = request.texts[seq.index]
        p = seq.params
        if token in p.stop_token_ids:
            return self._finish(seq, text, "stop", token)
        if token in self.tokenizer.stop_token_ids and not p.ignore_eos:
            return self._finish(seq, text, "stop", None)
        stop = text.add_token(token)
        if stop is not None:
            return self._finish(seq, text, "stop", stop, flush=False)
        if seq.num_output_tokens >= p.max_tokens or len(seq) >= self.max_model_len:
            return self._finish(seq, text, "length", None)

    def _track_thinking(self, seq: Sequence, token: int) -> None:
        if seq.params.thinking_budget is None:
            return
        if token == self.think_open_id:
            seq.in_thinking, seq.thinking_tokens = True, 0
            return
        if token == self.think_close_id:  # sampled, or the forced close (whose "\n\n" still follows)
            seq.in_thinking = False
            return
        if seq.in_thinking:
            seq.thinking_tokens += 1
            if seq.thinking_tokens >= seq.params.thinking_budget and not seq.forced_tokens:
                seq.forced_tokens = self.tokenizer.encode(THINKING_BUDGET_CLOSE, add_special_tokens=False)

    def _finish(self, seq: Sequence, text: TextOutput, reason: str, stop_reason, flush: bool = True) -> None:
        if flush:
            stop = text.finish()
            if stop is not None:
                stop_reason = stop
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        self.scheduler.finish(seq)

    def _output(self, request: Request) -> RequestOutput:
        completions = []
        for seq, text, new in zip(request.seqs, request.texts, request.new_tokens):
            delta = text.take_new_text(finished=seq.finish_reason is not None)
            completions.append(
                CompletionOutput(
                    index=seq.index,
                    text=text.text[: text.sent],  # always the concatenation of the deltas sent so far
                    token_ids=list(seq.output_token_ids),
                    delta_text=delta,
                    delta_token_ids=list(new),
                    finish_reason=seq.finish_reason,
                    stop_reason=seq.stop_reason,
                    logprobs=list(seq.logprobs) if seq.params.logprobs is not None else None,
                    thinking_open=request.thinking_open,
                )
            )
            new.clear()
        return RequestOutput(
            request.request_id, request.prompt, request.prompt_token_ids, completions, request.finished,
            request.metrics, [list(s.token_times) for s in request.seqs],
        )
