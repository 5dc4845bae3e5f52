"""LLMEngine: one synchronous step loop over scheduler + model runner. Not thread-safe on
its own; `LLM` drives it directly and `AsyncEngine` drives it from one background thread."""

from __future__ import annotations

import itertools
import sys
import threading
import time
from pathlib import Path

import torch

from .config import EngineConfig, physical_cores
from .detokenizer import IncrementalDetokenizer
from .errors import AdapterNotFoundError, InvalidRequestError, ModelConfigError
from .kv_cache import KVCacheManager
from .kv_layout import context_limit_of_cache, kv_layout, window_note
from .logits_processors import adjuster_for
from .outputs import RequestOutput
from .pooling import add_part, embedding_of
from .reasoning import CLOSED, GrammarAfterReasoning, reasoning_start, think_markers
from .own_proposals import ngram_ends, prediction_token_ids, propose_own_tokens
from .model_runner import ModelRunner
from .models.slot_rows import SlotRowTerms
from .models.vocab_lora import check_base_copies
from .models.arch import context_limit, longrope_note, text_config
from .models.loader import load_hf_config, load_model
from .models.prepare import resolve_model
from .request import Request, RequestStatus
from .sampling_params import SamplingParams
from .scheduler import Scheduler
from .structured_output import GrammarCompiler

class LLMEngine:
    def __init__(self, config: EngineConfig | None = None, *, progress: bool = True):
        self.config = config = config or EngineConfig()
        torch.set_num_threads(config.num_threads or physical_cores())
        model_dir = resolve_model(config.model, progress=progress)
        self.model_dir = Path(model_dir)
        hf_config = load_hf_config(self.model_dir)
        max_len, capped = context_limit(hf_config, config.max_model_len)
        hf_config = text_config(hf_config)
        t0 = time.perf_counter()
        self.device = config.torch_device
        self.model, _ = load_model(self.model_dir, config.torch_dtype, max_len, device=self.device)
        self.tokenizer = _load_tokenizer(self.model_dir)
        self.lora_pool = None
        if config.max_loras > 0:
            from loragate.adapters.pool import LoraSlotPool

            self.row_terms = SlotRowTerms(self.model, config.max_loras)
            self.lora_pool = LoraSlotPool(self.model.config, config.max_loras, config.max_lora_rank,
                                          config.torch_dtype, config.max_cpu_loras, row_terms=self.row_terms,
                                          device=self.device, max_cpu_lora_bytes=config.max_cpu_lora_memory)
            if self.device.type == "cuda":
                from loragate.kernels import lora_cuda

                with torch.cuda.device(self.device):
                    lora_cuda.warm_up(self.device, config.torch_dtype)
        # Sized last, so that a share of free memory counts what the model and slots took.
        layout = kv_layout(self.model.config.layer_windows, self.model.config.num_layers, max_len)
        bytes_per_block = ModelRunner.bytes_per_block(self.model, config.block_size, layout)
        kv_bytes = config.kv_cache_bytes(self.device)
        num_blocks = kv_bytes // bytes_per_block
        if num_blocks < 2 * layout.num_groups:
            raise ModelConfigError(f"kv_cache_memory {config.kv_cache_memory} ({kv_bytes} B) holds fewer than "
                                   f"{2 * layout.num_groups} blocks of {bytes_per_block} B")
        step = config.max_num_batched_tokens
        self.max_model_len = min(max_len,
                                 context_limit_of_cache(num_blocks, config.block_size, layout, step) or max_len)
        for note in (capped, longrope_note(hf_config, max_len, self.max_model_len)):  # the cache's cap is known here
            if note and progress:
                print(f"loragate: {note}", file=sys.stderr)
        self.kv = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching, layout)
        # Adapters may be added or removed from any thread (AsyncEngine callers) while the
        # loop thread reads them: entries are replaced whole under this lock.
        self.adapters: dict[str, tuple[int, object]] = {}  # name -> (version, LoraWeights)
        self._adapter_versions: dict[str, int] = {}
        self._adapter_lock = threading.Lock()
        self.scheduler = Scheduler(self.kv, config.max_num_seqs, config.max_num_batched_tokens, self.lora_pool)
        self.runner = ModelRunner(self.model, num_blocks, config.block_size, self.lora_pool,
                                  cuda_graph_rows=config.cuda_graph_rows, layout=layout)
        self.kv.copy_rows = self.runner.copy_block_rows
        self.eos_token_ids = _eos_ids(self.tokenizer, hf_config, self.model_dir)
        self.grammars = GrammarCompiler(self.tokenizer, self.model.config.vocab_size, self.eos_token_ids)
        self.think_markers = think_markers(self.tokenizer)  # a reasoning model's <think> and </think>, or None
        from .spec import build_speculator

        self.speculator = build_speculator(config, self)
        self.model_name = config.model if not Path(config.model).is_dir() else self.model_dir.name
        self._detokenizers: dict[str, IncrementalDetokenizer] = {}
        self._ids = itertools.count()
        self.num_computed_tokens_total = 0  # tokens run through the model (prefix hits excluded)
        self.num_generated_tokens_total = 0
        self.num_forced_accepted = 0  # grammar-forced tokens taken without a step of their own
        self.num_prediction_accepted = 0  # predicted output tokens taken as proposed
        self.num_aborted = 0  # requests ended before they finished (their client gone, say)
        # Requests whose proposals this step are the engine's own (own_proposals.py): grammar-forced, predicted
        self._forced: set[str] = set()
        self._predicted: set[str] = set()
        if progress:
            where = (f"{torch.get_num_threads()} threads" if self.device.type == "cpu"
                     else f"{self.device}: {torch.cuda.get_device_name(self.device)}")
            print(f"loragate: {self.model_name} ({config.dtype}, {where}) loaded in "
                  f"{time.perf_counter() - t0:.1f}s; KV cache {num_blocks} blocks x {config.block_size} tokens "
                  f"= {num_blocks // layout.num_groups * config.block_size} tokens of every layer "
                  f"({num_blocks * bytes_per_block / 2**20:.0f} MiB); max_model_len {self.max_model_len}"
                  + window_note(layout), file=sys.stderr)

    def use_proposer(self, proposer) -> None:
        """Speculate with another Proposer (engine/spec/proposer.py), e.g. a drafter that
        conditions on the target's hidden states: the runner then exposes them to it."""
        from .spec import Speculator

        self.speculator = Speculator(proposer, self.config.num_speculative_tokens, self.max_model_len)
        self.runner.expose_hidden_states = proposer.wants_hidden_states

    # -- adapters -------------------------------------------------------------------------

    def add_adapter(self, name: str, path) -> int:
        """Load and validate a PEFT LoRA adapter directory under `name`; returns its version.
        Adding an existing name creates a new version: running requests finish on the old
        one, new requests get the new one, and the prefix cache never mixes them."""
        if self.lora_pool is None:
            raise ModelConfigError("LoRA support is off (max_loras=0)")
        from loragate.adapters.loader import load_adapter

        weights = load_adapter(Path(path), self.model.config, self.config.max_lora_rank)
        self.prepare_adapter_weights(weights)
        return self.add_adapter_weights(name, weights)

    def prepare_adapter_weights(self, weights) -> None:
        """The engine's own work on an adapter before it can load into a slot: DoRA's row scales
        (45 ms for a rank-16 all-linear SmolLM2 adapter; the first DoRA adapter also takes ||W||^2
        per row: 3.8 s on Qwen2.5-1.5B) and a MoE model's expert slots (pool.py). Done in the
        caller's thread (the gateway's: a worker), so no step stalls; it only reads the base."""
        if self.lora_pool is not None:
            check_base_copies(self.model, weights)
            self.row_terms.prepare(weights)
            self.lora_pool.make_stacks(weights)

    def add_adapter_weights(self, name: str, weights) -> int:
        with self._adapter_lock:
            version = self._adapter_versions.get(name, 0) + 1
            self._adapter_versions[name] = version
            self.adapters[name] = (version, weights)
            self.lora_pool.forget(f"{name}@")  # unpinned copies of older versions
        return version

    def remove_adapter(self, name: str) -> bool:
        """Forget an adapter; requests already running on it finish."""
        with self._adapter_lock:
            if self.adapters.pop(name, None) is None:
                return False
            self.lora_pool.forget(f"{name}@")
        return True

    # -- requests -------------------------------------------------------------------------

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, add_special_tokens=True)
        return list(prompt)

    def make_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                     request_id: str | None = None, cache_salt: str = "", adapter: str | None = None,
                     tenant: str | None = None) -> Request:
        """Tokenize and validate; raises InvalidRequestError. Touches no engine state, so it
        may run on any thread. A `tenant`'s prompts hit only its own prefix-cache entries:
        otherwise a hit (its speed, or usage's cached_tokens) would tell one tenant what
        another sent."""
        params = params or SamplingParams()
        ids = self.tokenize(prompt)
        if not ids:
            raise InvalidRequestError("prompt is empty", "prompt")
        vocab = self.model.config.vocab_size
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in ids):
            raise InvalidRequestError(f"prompt token ids must be integers in [0, {vocab})", "prompt")
        if len(ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"prompt is {len(ids)} tokens; this model's context is {self.max_model_len} tokens "
                "including at least one generated token", "prompt")
        if len(ids) + params.max_tokens > self.max_model_len:  # vLLM's and OpenAI's 400, not a silent cut at the limit
            raise InvalidRequestError(
                f"this model's context is {self.max_model_len} tokens, but the request needs "
                f"{len(ids) + params.max_tokens} ({len(ids)} in the prompt, max_tokens {params.max_tokens} "
                "in the completion): lower max_tokens or shorten the prompt", "max_tokens")
        for name, token_ids in (("logit_bias", params.logit_bias), ("stop_token_ids", params.stop_token_ids),
                                ("allowed_token_ids", params.allowed_token_ids or ())):
            if any(t >= vocab for t in token_ids):
                raise InvalidRequestError(f"{name} token ids must be in [0, {vocab})", name)
        prediction = prediction_token_ids(params.prediction, self.tokenizer, vocab, self.max_model_len)
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if cache_salt:  # quoted: a salt holding "|lora:x@1" must not spell another request's key
            cache_salt = f"salt:{cache_salt!r}"
        if tenant is not None:
            cache_salt = f"tenant:{tenant}|{cache_salt}"
        req = Request(request_id, ids, params, cache_salt=cache_salt, tenant=tenant)
        req.logits_adjuster = adjuster_for(params, ids, self.eos_token_ids, self.tokenizer)
        req.prediction_token_ids = prediction
        req.prediction_ngram_ends = prediction and ngram_ends(prediction)  # here, off the step loop (67 ms at 8k tokens)
        if params.grammar is not None:
            req.grammar = self.grammars.constraint(params.grammar)
            start = reasoning_start(ids, self.think_markers, self.tokenizer) if params.reasoning and self.think_markers \
                else CLOSED
            if start != CLOSED:  # the format applies after the reasoning
                req.grammar = GrammarAfterReasoning(req.grammar, self.think_markers, start)
        if adapter is not None:
            entry = self.adapters.get(adapter)
            if entry is None:
                raise AdapterNotFoundError(f"adapter {adapter!r} does not exist", "model")
            version, weights = entry
            req.adapter, req.lora_key, req.lora_weights = adapter, f"{adapter}@{version}", weights
            req.cache_salt = f"{cache_salt}|lora:{req.lora_key}"
        return req

    def enqueue(self, req: Request) -> None:
        self.scheduler.add(req)
        self._detokenizers[req.request_id] = IncrementalDetokenizer(self.tokenizer, req.sampling_params)

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, cache_salt: str = "", adapter: str | None = None,
                    tenant: str | None = None) -> Request:
        req = self.make_request(prompt, params, request_id, cache_salt, adapter, tenant)
        self.enqueue(req)
        return req

    def abort(self, request_id: str) -> bool:
        req = self.scheduler.requests.get(request_id)
        if req is None:
            return False
        self.scheduler.finish(req, RequestStatus.FINISHED_ABORTED)
        self._detokenizers.pop(request_id, None)
        self.num_aborted += 1
        return True

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished

    # -- the step -------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return []
        t0 = time.perf_counter()
        out = self.runner.execute(scheduled)
        step_seconds = time.perf_counter() - t0
        for request_id, entries in (out.prompt_logprobs or {}).items():
            self.scheduler.requests[request_id].prompt_logprobs.extend(entries)
        for request_id, (position, part) in (out.pooled or {}).items():
            add_part(self.scheduler.requests[request_id], position, part)
        # Cut each request's new tokens at its first stop (speculation may emit several).
        statuses = [self._cut_at_stop(req, i, out) for i, req in enumerate(out.requests)]
        # The engine's own proposals are not the speculator's: its statistics skip them.
        own = [req.request_id in self._forced or req.request_id in self._predicted for req in out.requests]
        proposed = [0 if o else len(req.spec_token_ids) for req, o in zip(out.requests, own)]
        for req, accepted in zip(out.requests, out.num_accepted):
            if req.request_id in self._forced:
                self.num_forced_accepted += accepted
            elif req.request_id in self._predicted:
                req.num_accepted_prediction_tokens += accepted
                self.num_prediction_accepted += accepted
        self.scheduler.update(scheduled, out)
        self.num_computed_tokens_total += out.num_computed_tokens
        self.num_generated_tokens_total += sum(len(t) for t in out.token_ids)
        now = time.monotonic()
        outputs = []
        for req, tokens, logprobs, status in zip(out.requests, out.token_ids, out.logprobs, statuses):
            if req.first_token_time is None:
                req.first_token_time = now
            detok = self._detokenizers[req.request_id]
            if status is not None:
                self.scheduler.finish(req, status)
                del self._detokenizers[req.request_id]
            outputs.append(RequestOutput(
                request_id=req.request_id, prompt_token_ids=req.prompt_token_ids,
                token_ids=req.output_token_ids, new_token_ids=tokens, text=detok.text,
                delta_text=detok.take_delta(req.is_finished), finished=req.is_finished,
                finish_reason=req.finish_reason, stop_reason=req.stop_reason,
                num_cached_tokens=req.num_cached_tokens, new_logprobs=logprobs or [],
                prompt_logprobs=req.prompt_logprobs if req.sampling_params.prompt_logprobs is not None else None,
                queue_seconds=req.first_scheduled_time - req.arrival_time, num_preemptions=req.num_preemptions,
                num_prediction_tokens=len(req.prediction_token_ids or ()),
                num_accepted_prediction_tokens=req.num_accepted_prediction_tokens,
                embedding=embedding_of(req) if req.is_finished else None))
        if self.speculator is not None:
            self.speculator.after_step(scheduled, out, proposed, step_seconds)
            self.speculator.propose(self.scheduler.running)
        self._forced, self._predicted = propose_own_tokens(self.scheduler.running, self.max_model_len)
        return outputs

    def _cut_at_stop(self, req: Request, i: int, out) -> RequestStatus | None:
        detok = self._detokenizers[req.request_id]
        tokens = out.token_ids[i]
        for j, token in enumerate(tokens):
            detok.add_tokens([token])
            status = self._stop_status(req, token, detok, len(req.output_token_ids) + j + 1)
            if status is not None:
                del tokens[j + 1:]
                if out.logprobs[i] is not None:
                    del out.logprobs[i][j + 1:]
                return status
        return None

    def _stop_status(self, req: Request, token: int, detok: IncrementalDetokenizer,
                     num_output: int) -> RequestStatus | None:
        p = req.sampling_params
        if req.logits_adjuster is not None:
            req.logits_adjuster.advance(token)
        if req.grammar is not None and req.grammar.advance(token):
            return RequestStatus.FINISHED_STOPPED  # the output is complete (or, never expected, broken)
        if num_output > p.min_tokens:  # the first min_tokens tokens end only at a length limit
            if token in p.stop_token_ids:
                req.stop_reason = token
                return RequestStatus.FINISHED_STOPPED
            if not p.ignore_eos and token in self.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED
            if detok.matched_stop is not None:
                req.stop_reason = detok.matched_stop
                return RequestStatus.FINISHED_STOPPED
        if num_output >= p.max_tokens or req.num_prompt_tokens + num_output >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None


def _load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelConfigError(f"cannot load the tokenizer from {model_dir}: {e}") from e


def _eos_ids(tokenizer, hf_config, model_dir: Path) -> set[int]:
    ids: set[int] = set()
    for source in (tokenizer.eos_token_id, getattr(hf_config, "eos_token_id", None)):
        if source is not None:
            ids.update(source if isinstance(source, list) else [source])
    gen_path = model_dir / "generation_config.json"
    if gen_path.is_file():
        from transformers import GenerationConfig

        eos = GenerationConfig.from_pretrained(str(model_dir)).eos_token_id
        if eos is not None:
            ids.update(eos if isinstance(eos, list) else [eos])
    return ids
