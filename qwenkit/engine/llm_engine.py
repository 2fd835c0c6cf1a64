"""LLMEngine: requests in; each `step()` schedules a batch, runs the model once, samples, reports."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import torch

from qwenkit.distributed import ProcessGroup
from qwenkit.engine.block_manager import BlockManager
from qwenkit.engine.draft_model import DraftModelDrafter
from qwenkit.engine.logits_process import ProcessorContext, make_processors
from qwenkit.engine.media_inputs import EncoderCache, MediaItem, MultimodalInputs, placeholder_ids, prepare_multimodal
from qwenkit.engine.model_runner import ModelRunner
from qwenkit.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from qwenkit.engine.paged_attention import PagedKVCache
from qwenkit.engine.sampler import RowSamplingError, SamplingRow, sample
from qwenkit.engine.sampling_params import SamplingParams
from qwenkit.engine.scheduler import ScheduledSequence, Scheduler
from qwenkit.engine.sequence import SamplingState, Sequence
from qwenkit.engine.speculative import NgramDrafter, Speculator, num_accepted
from qwenkit.engine.step_threads import StepThreads
from qwenkit.engine.tensor_parallel import TensorParallelRunner, WorkerRunner, serve
from qwenkit.engine.text_output import TextOutput
from qwenkit.errors import QwenkitError
from qwenkit.kernels import default_prefill_chunk
from qwenkit.model.tensor_parallel import local_heads, shard_model
from qwenkit.tokenizer.reasoning import prompt_opens_thinking
from qwenkit.weights.context import check_kv_pool
from qwenkit.weights.loader import LoadedModel, LoadPlan, load_model


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = 16
    kv_cache_memory: int = 1 << 30  # bytes for the KV pool
    max_num_seqs: int = 64
    # Per step; longer prompts are prefilled in chunks. Without fast bf16 256, not 512: on 2 Zen 3
    # cores a prompt's steps of the default model ran 1.08-1.10x faster in 256-token chunks (1000
    # tokens: 271-281 vs 248-253 tok/s; 2000: 228-229 vs 206-213), every part of the step a little
    # faster as its [tokens, 4864] intermediates stay in cache; 128-token chunks gained less
    # (255-271). With it, 512 (kernels.default_prefill_chunk: each chunk dequantizes the weights once).
    max_num_batched_tokens: int = field(default_factory=default_prefill_chunk)
    enable_prefix_caching: bool = True
    max_model_len: int | None = None  # default: the model's context
    kv_cache_dtype: str = "auto"  # "auto": the loader's choice (LoadPlan.kv_cache_dtype)
    encoder_cache_bytes: int = 256 << 20  # multimodal models: encoder outputs kept by content key
    # Speculative decoding (engine/speculative.py): None, "ngram" (prompt lookup) or "draft:PATH"
    # (a smaller model with the same tokenizer, engine/draft_model.py); at most
    # num_speculative_tokens drafts per sequence and step, looked up by the last n tokens, n from
    # prompt_lookup_max down to prompt_lookup_min.
    speculative: str | None = None
    num_speculative_tokens: int = 8
    prompt_lookup_min: int = 2
    prompt_lookup_max: int = 4
    # Jump-forward: tokens a logits processor forces (a grammar's fixed text) are drafted and
    # verified in one step, with or without `speculative` (at most num_speculative_tokens a step).
    jump_forward: bool = True


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
    media: MultimodalInputs | None = None  # every sample's prompt media (see engine/media_inputs.py)
    error: str | None = None  # why the request failed (its own fault, or the batch's)
    ended: bool = False  # aborted or failed before every sample finished

    @property
    def finished(self) -> bool:
        return self.ended or (len(self.seqs) == self.params.n and all(s.is_finished for s in self.seqs))


KV_CACHE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def kv_cache_dtype(name: str, plan: LoadPlan) -> torch.dtype:
    """The cache dtype `name` ("auto" or one of KV_CACHE_DTYPES) means for a model loaded by `plan`."""
    if name == "auto":
        return plan.kv_cache_dtype
    if name not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be auto or one of {', '.join(KV_CACHE_DTYPES)}, not {name!r}")
    return KV_CACHE_DTYPES[name]


def make_speculator(config: EngineConfig, target: LoadedModel, kv_dtype: torch.dtype) -> Speculator | None:
    """The speculator `config.speculative` asks for; without one, a speculator that drafts only
    forced tokens (jump-forward), or None when that is off too."""
    method = config.speculative
    if method is None:
        return Speculator(None, config.num_speculative_tokens) if config.jump_forward else None
    if method == "ngram":
        return Speculator(NgramDrafter(config.prompt_lookup_min, config.prompt_lookup_max), config.num_speculative_tokens)
    if method.startswith("draft:") and len(method) > len("draft:"):
        draft = load_model(method[len("draft:") :])
        drafter = DraftModelDrafter(draft, target, config.kv_cache_memory, config.block_size, kv_dtype)
        return Speculator(drafter, config.num_speculative_tokens)
    raise QwenkitError(f"speculative must be 'ngram' or 'draft:PATH', not {method!r}")


def max_model_len(loaded: LoadedModel, config: EngineConfig) -> int:
    context = loaded.plan.max_model_len
    return min(config.max_model_len or context, context)


def kv_cache(loaded: LoadedModel, config: EngineConfig, group: ProcessGroup) -> PagedKVCache:
    """The KV pool `config` asks for, of this process's key/value heads (all of them without tensor
    parallelism): every rank of a group gets the same number of blocks."""
    model_cfg = loaded.config
    kv_heads = local_heads(model_cfg, group.world_size).key_value
    kv_dtype = kv_cache_dtype(config.kv_cache_dtype, loaded.plan)
    per_token = PagedKVCache.bytes_per_token(model_cfg.num_hidden_layers, kv_heads, model_cfg.head_dim, kv_dtype)
    num_blocks = max(2, config.kv_cache_memory // (per_token * config.block_size))
    if loaded.plan.context_requested or config.max_model_len is not None:  # an asked-for context must fit one sequence
        check_kv_pool(max_model_len(loaded, config), num_blocks * config.block_size, per_token, kv_dtype)
    return PagedKVCache(model_cfg.num_hidden_layers, num_blocks, config.block_size, kv_heads, model_cfg.head_dim, kv_dtype)


def tensor_parallel_worker(loaded: LoadedModel, config: EngineConfig, group: ProcessGroup) -> None:
    """Ranks > 0 of a tensor parallel group: shard the model as rank 0's engine does, hold a cache
    like its own, and run rank 0's steps until it closes."""
    group.wait_for_everyone()  # rank 0's engine meets us here once every process has loaded its shard
    shard_model(loaded.model, group)
    serve(WorkerRunner(loaded.model, kv_cache(loaded, config, group)), group)


class PromptTooLong(QwenkitError):
    """The prompt leaves no room in the context; says both numbers."""

    def __init__(self, prompt_tokens: int, max_model_len: int):
        super().__init__(f"the prompt has {prompt_tokens} tokens; the model's context holds {max_model_len} (prompt + output)")
        self.prompt_tokens, self.max_model_len = prompt_tokens, max_model_len


class LLMEngine:
    def __init__(self, loaded: LoadedModel, config: EngineConfig = EngineConfig(), group: ProcessGroup = ProcessGroup()):
        """`group`: tensor parallel over torchrun's processes (engine/tensor_parallel.py); this is
        rank 0's engine, the other ranks run `tensor_parallel_worker`."""
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.config = config
        model_cfg = loaded.config
        self.max_model_len = max_model_len(loaded, config)
        kv_dtype = kv_cache_dtype(config.kv_cache_dtype, loaded.plan)
        group.wait_for_everyone()  # however long the slowest process took to load: the collectives after are time-limited
        shard_model(loaded.model, group)
        self.cache = kv_cache(loaded, config, group)
        self.block_manager = BlockManager(self.cache.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens)
        self.encoder_cache = EncoderCache(config.encoder_cache_bytes)
        self.group = group
        if group.world_size > 1:
            self.runner = TensorParallelRunner(loaded.model, self.cache, group, self.encoder_cache)
        else:
            self.runner = ModelRunner(loaded.model, self.cache, self.encoder_cache)
        self.step_threads = StepThreads(loaded.model)
        self._placeholders = placeholder_ids(model_cfg)
        self.speculator = make_speculator(config, loaded, kv_dtype)
        self.lora_adapters: dict[str, str] = {}  # name -> directory
        self.requests: dict[str, Request] = {}
        self._seq_ids = itertools.count()
        self._request_ids = itertools.count()
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
        media: list[MediaItem] | None = None,
    ) -> str:
        """Queue a request; `lora_name` runs it with an adapter added by `add_lora`. `media` are the
        prompt's images/videos/audio in prompt order, each at one placeholder token (or already at
        one per encoder output) of the prompt."""
        params = params or self.default_sampling_params()
        if lora_name is not None and lora_name not in self.lora_adapters:
            raise QwenkitError(f"unknown LoRA adapter {lora_name!r}; loaded: {', '.join(self.lora_adapters) or 'none'}")
        request_id = request_id or f"req-{next(self._request_ids)}"
        if request_id in self.requests:
            raise QwenkitError(f"request id {request_id!r} is already in use")
        prompt_text = prompt if isinstance(prompt, str) else None
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        mm = None
        if media or (self._placeholders and not self._placeholders.isdisjoint(ids)):
            ids, mm = prepare_multimodal(ids, media or [], self.loaded.config)
        self.validate_request(ids, params)
        now = time.monotonic()
        opens = prompt_opens_thinking(prompt_text if prompt_text is not None else self.tokenizer.decode(ids[-64:]))
        request = Request(request_id, prompt_text, ids, params, [], [], RequestMetrics(now), opens, media=mm)
        first = self._new_sequence(request, 0, ids, now, lora_name)  # may raise (a request's own factory): nothing is queued yet
        self.requests[request_id] = request
        self.scheduler.add(first)
        return request_id

    def validate_request(self, ids: list[int], params: SamplingParams) -> None:
        """Everything about a request that could otherwise fail inside a shared batch: checked once, here."""
        n = len(ids)
        if n == 0:
            raise QwenkitError("the prompt is empty")
        vocab = self.loaded.config.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise QwenkitError(f"prompt token ids must be in [0, {vocab}); got {min(ids)}..{max(ids)}")
        for what, token_ids in (("stop_token_ids", params.stop_token_ids), ("logit_bias", params.logit_bias)):
            if any(t >= vocab for t in token_ids):
                raise QwenkitError(f"{what} has token ids outside the vocabulary [0, {vocab})")
        if n >= self.max_model_len:
            raise PromptTooLong(n, self.max_model_len)
        worst = min(n + params.max_tokens, self.max_model_len)
        if self.block_manager.blocks_needed(worst) > self.block_manager.num_blocks:
            raise QwenkitError(
                f"prompt ({n} tokens) plus max_tokens ({params.max_tokens}) exceeds the KV cache "
                f"({self.block_manager.num_blocks * self.config.block_size} tokens); raise the KV cache memory"
            )

    def add_lora(self, name: str, directory) -> None:
        """Load a PEFT-format adapter; requests choose it by name, and batch with base-model requests."""
        from qwenkit.lora.attach import load_adapter

        if self.group.world_size > 1:
            raise QwenkitError("LoRA adapters are not supported with tensor parallelism")
        if name in self.lora_adapters:
            raise QwenkitError(f"a LoRA adapter named {name!r} is already loaded")
        load_adapter(self.loaded.model, name, directory)
        self.lora_adapters[name] = str(directory)

    def _new_sequence(self, request: Request, index: int, ids: list[int], now: float, lora_name: str | None) -> Sequence:
        """Sample `index` of `request`, with its own generator and logits processors, added to the request."""
        params = request.params
        generator = None if params.seed is None else torch.Generator().manual_seed(params.seed + index)
        context = ProcessorContext(self.tokenizer, params, request.prompt_token_ids, request.thinking_open)
        seq = Sequence(next(self._seq_ids), request.request_id, index, list(ids), len(request.prompt_token_ids), params,
                       now, lora_name, SamplingState(generator, make_processors(context)), media=request.media)
        if self.speculator is not None:
            seq.speculation = self.speculator.new_state(seq)
        request.seqs.append(seq)
        request.texts.append(TextOutput(self.tokenizer, params))
        request.new_tokens.append([])
        return seq

    def abort_request(self, request_id: str) -> RequestOutput | None:
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        self._end_request(request, "abort")
        return self._output(request)

    def fail_all(self, exc: BaseException) -> list[RequestOutput]:
        """The shared step failed: end every request in flight, each with the error as its final output."""
        outputs = []
        for request in list(self.requests.values()):
            del self.requests[request.request_id]
            request.error = f"generation failed: {type(exc).__name__}: {exc}"
            self._end_request(request, "error")
            outputs.append(self._output(request))
        return outputs

    def _end_request(self, request: Request, reason: str) -> None:
        for seq in request.seqs:
            if not seq.is_finished:
                self._finish_sequence(seq)
                seq.finish_reason = reason
        request.ended = True
        request.metrics.finished_time = time.monotonic()

    def close(self) -> None:
        """Release the other ranks of a tensor parallel group, once (nothing to do without one);
        also done when the engine is collected or the process exits."""
        if isinstance(self.runner, TensorParallelRunner):
            self.runner.close()

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # ---- one step -------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one batch. Raises only if the batch's shared forward pass fails (see fail_all); a
        failure that belongs to one request (its sampling, its processors, its text) ends that
        request alone, with `error` set on its final output."""
        started = time.perf_counter()
        if self.speculator is not None:
            self.speculator.propose(self.scheduler.running, self.max_model_len)
        batch = self.scheduler.schedule()
        if not batch:
            return []
        with self.step_threads.step(sum(item.num_tokens + len(item.draft_token_ids) for item in batch)):
            return self._run(batch, started)

    def _run(self, batch: list[ScheduledSequence], started: float) -> list[RequestOutput]:
        logits = self.runner.run(batch)
        if self.speculator is not None and all(item.num_tokens == 1 for item in batch):  # what drafts cost (decodes only)
            self.speculator.costs.observe(sum(1 + len(item.draft_token_ids) for item in batch), time.perf_counter() - started)
        self.num_computed_tokens += sum(item.num_tokens + len(item.draft_token_ids) for item in batch)
        sampling: list[tuple[Sequence, int]] = []  # (sequence, its first logits row)
        drafts: dict[int, list[int]] = {}  # seq_id -> the drafted tokens its next logits rows verify
        next_row = 0
        for item in batch:
            if item.completes_prompt:  # the same rows the runner returned logits for, in order
                sampling.append((item.seq, next_row))
                next_row += 1 + len(item.draft_token_ids)
                if item.draft_token_ids:
                    drafts[item.seq.seq_id] = item.draft_token_ids
            item.seq.num_computed_tokens += item.num_tokens  # drafts count once accepted
            self.block_manager.register_computed_blocks(item.seq)
        failed: dict[str, Exception] = {}
        rows = self._fork_samples(sampling, failed)
        rows = [(seq, row) for seq, row in rows if seq.request_id not in failed]
        # Each drafted token adds a row: the model's choice at that position, sampled as if the
        # drafts before it were the sequence's tokens (see engine/speculative.py).
        positions = [
            (seq, row + i, self._sampling_row(seq, d[:i], bool(d)))
            for seq, row in rows
            for d in (drafts.get(seq.seq_id, []),)
            for i in range(len(d) + 1)
        ]
        tokens = self._sample(positions, logits, failed)
        now = time.monotonic()
        touched: dict[str, Request] = {}
        start = 0
        for seq, _ in rows:
            d = drafts.get(seq.seq_id, [])
            first, start = start, start + len(d) + 1
            sampled = tokens[first:start]
            if seq.request_id in failed or any(token is None for token, _ in sampled):
                continue
            request = self.requests[seq.request_id]
            touched[request.request_id] = request
            accepted = num_accepted(d, [token for token, _ in sampled])
            if accepted < len(d) and positions[first + accepted][2].generator_state is not None:
                # Undo the draws of the positions after the model's own token: a seed draws as without drafts.
                seq.sampling.generator.set_state(positions[first + accepted][2].generator_state)
            try:
                for i, (token, lp) in enumerate(sampled[: accepted + 1]):  # the kept drafts, then the model's own token
                    if seq.is_finished:  # a stop inside the accepted run: the rest is discarded
                        break
                    if i:
                        seq.num_computed_tokens += 1  # the kept draft before this token has its K/V
                    self._append(request, seq, token, lp, now)
            except Exception as exc:
                failed[request.request_id] = exc
            if d:
                self.speculator.record(seq, len(d), accepted)
                if not seq.is_finished:
                    self.block_manager.register_computed_blocks(seq)
                    self.block_manager.release_unused(seq)  # the rejected drafts' slots
        outputs = []
        for request_id, exc in failed.items():
            request = self.requests.pop(request_id)
            touched.pop(request_id, None)
            request.error = f"generation failed: {type(exc).__name__}: {exc}"
            self._end_request(request, "error")
            outputs.append(self._output(request))
        for request in touched.values():
            outputs.append(self._output(request))
            if request.finished:
                request.metrics.finished_time = now
                del self.requests[request.request_id]
        return outputs

    def _sample(self, rows: list[tuple[Sequence, int, SamplingRow]], logits: torch.Tensor, failed: dict[str, Exception]) -> list[tuple]:
        """(token, logprobs) per (sequence, logits row, sampling row), batched; a row whose own
        sampling fails gets (None, None) and fails its request."""
        if not rows:
            return []
        sampling_rows = [sampling_row for _, _, sampling_row in rows]
        indices = [r for _, r, _ in rows]
        # Every row in order (a decode step): the logits themselves, not a 16 x 151936 copy.
        row_logits = logits if indices == list(range(logits.shape[0])) else logits[torch.tensor(indices)]
        try:
            return list(zip(*sample(row_logits, sampling_rows)))
        except RowSamplingError as exc:
            culprits = {exc.row: exc.cause}
        except Exception:
            culprits = {}
        # Find the rows at fault one by one; the others sample as they would have.
        tokens: list[tuple] = []
        for i, (seq, _, _) in enumerate(rows):
            if i in culprits:
                failed.setdefault(seq.request_id, culprits[i])
                tokens.append((None, None))
                continue
            try:
                token, lp = sample(row_logits[i : i + 1], [sampling_rows[i]])
                tokens.append((token[0], lp[0]))
            except RowSamplingError as exc:
                failed.setdefault(seq.request_id, exc.cause)
                tokens.append((None, None))
            except Exception as exc:
                failed.setdefault(seq.request_id, exc)
                tokens.append((None, None))
        return tokens

    def _fork_samples(self, sampling: list[tuple[Sequence, int]], failed: dict[str, Exception]) -> list[tuple[Sequence, int]]:
        """(sequence, logits row) pairs; a request with n > 1 gets its other samples at its first token.

        A sample shares the first one's full KV blocks; its partial last block is copied when the
        pool has a free block, else it waits in the queue and recomputes that tail (at most one
        block of tokens, found through the prefix cache), so a full pool never fails a fork.
        """
        rows = []
        for seq, row in sampling:
            rows.append((seq, row))
            request = self.requests[seq.request_id]
            if seq.num_output_tokens or len(request.seqs) >= request.params.n:
                continue
            try:
                for index in range(1, request.params.n):
                    child = self._new_sequence(request, index, seq.token_ids, seq.arrival_time, seq.lora_name)
                    if self.block_manager.num_free_blocks:
                        copy_from = self.block_manager.fork(seq, child)
                        if copy_from is not None:
                            self.runner.copy_block(copy_from, child.block_table[-1])
                        self.scheduler.add_running(child)
                    else:
                        self.scheduler.add(child)
                    rows.append((child, row))
            except Exception as exc:
                failed[seq.request_id] = exc
        return rows

    def _sampling_row(self, seq: Sequence, drafted: list[int], verifies: bool) -> SamplingRow:
        """How `seq` samples its next token, or, in verification, the token after `drafted` (the
        drafts before this position)."""
        p = seq.params
        blocked = set(p.stop_token_ids)
        if not p.ignore_eos:
            blocked |= self.tokenizer.stop_token_ids
        processors = [q.after_draft(drafted) for q in seq.sampling.processors] if drafted else seq.sampling.processors
        return SamplingRow(p, seq.token_ids + drafted if drafted else seq.token_ids, seq.num_prompt_tokens,
                           seq.sampling.generator, frozenset(blocked), processors, verifies)

    def _append(self, request: Request, seq: Sequence, token: int, lp, now: float) -> None:
        seq.append_token(token, now)
        if lp is not None:
            seq.sampling.logprobs.append(lp)
        if request.metrics.first_token_time is None:
            request.metrics.first_token_time = now
            request.metrics.num_cached_tokens = seq.num_cached_tokens
        request.new_tokens[seq.index].append(token)
        for processor in seq.sampling.processors:
            processor.accept(token)
        text = request.texts[seq.index]
        p = seq.params
        if token in p.stop_token_ids:
            return self._finish(seq, text, "stop", token)
        if token in self.tokenizer.stop_token_ids and not p.ignore_eos:
            return self._finish(seq, text, "stop", None)
        stop = text.add_token(token)
        if stop is not None:
            return self._finish(seq, text, "stop", stop, flush=False)
        if any(processor.is_finished() for processor in seq.sampling.processors):
            return self._finish(seq, text, "stop", None)
        if seq.num_output_tokens >= p.max_tokens or len(seq) >= self.max_model_len:
            return self._finish(seq, text, "length", None)

    def _finish(self, seq: Sequence, text: TextOutput, reason: str, stop_reason, flush: bool = True) -> None:
        if flush:
            stop = text.finish()
            if stop is not None:
                stop_reason = stop
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        self._finish_sequence(seq)

    def _finish_sequence(self, seq: Sequence) -> None:
        """Its blocks back to the pool, and the drafter's (a draft model's cache) to the drafter's."""
        self.scheduler.finish(seq)
        if self.speculator is not None:
            self.speculator.release(seq)

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
                    logprobs=list(seq.sampling.logprobs) if seq.params.logprobs is not None else None,
                    thinking_open=request.thinking_open,
                    reasoning=self.tokenizer.writes_thinking,
                )
            )
            new.clear()
        return RequestOutput(
            request.request_id, request.prompt, request.prompt_token_ids, completions, request.finished,
            request.metrics, [list(s.token_times) for s in request.seqs], request.error,
        )
