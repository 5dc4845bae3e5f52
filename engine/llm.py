"""LLM: the synchronous, offline API. `LLM(...).generate(prompts, params)` runs every prompt
through one continuously batched engine and returns the outputs in prompt order."""

from __future__ import annotations

from tqdm import tqdm

from .beam_search import BeamSearch, BeamSearchParams, BeamSequence, candidates_of, check_fits
from .config import EngineConfig
from .llm_engine import LLMEngine, RequestOutput
from .sampling_params import SamplingParams


class LLM:
    def __init__(self, model: str | None = None, *, progress: bool = True, **config_fields):
        config = EngineConfig(**({"model": model} if model else {}), **config_fields)
        self.engine = LLMEngine(config, progress=progress)
        self.tokenizer = self.engine.tokenizer

    def add_adapter(self, name: str, path) -> int:
        return self.engine.add_adapter(name, path)

    def remove_adapter(self, name: str) -> bool:
        return self.engine.remove_adapter(name)

    def generate(self, prompts: str | list[int] | list[str | list[int]],
                 params: SamplingParams | list[SamplingParams] | None = None,
                 *, adapters: str | None | list[str | None] = None, progress: bool = False) -> list[RequestOutput]:
        """Generate for each prompt (text or token ids); returns final outputs in order.
        Every prompt is validated before any is queued, so a bad one queues nothing."""
        single = isinstance(prompts, str) or (prompts and isinstance(prompts[0], int))
        prompt_list = [prompts] if single else list(prompts)
        param_list = params if isinstance(params, list) else [params or SamplingParams()] * len(prompt_list)
        adapter_list = adapters if isinstance(adapters, list) else [adapters] * len(prompt_list)
        if len(param_list) != len(prompt_list) or len(adapter_list) != len(prompt_list):
            raise ValueError("params and adapters must be given once or once per prompt")
        ids = []
        try:
            for prompt, p, adapter in zip(prompt_list, param_list, adapter_list):
                ids.append(self.engine.add_request(prompt, p, adapter=adapter).request_id)
        except Exception:
            for rid in ids:
                self.engine.abort(rid)
            raise
        final = self._run(ids, progress)
        return [final[rid] for rid in ids]

    def beam_search(self, prompts: str | list[int] | list[str | list[int]], params: BeamSearchParams, *,
                    adapter: str | None = None) -> list[list[BeamSequence]]:
        """Beam search (engine/beam_search.py) from each prompt, all searches' steps batched
        together; returns each prompt's hypotheses, best first. Every prompt is validated
        before any search starts."""
        single = isinstance(prompts, str) or (prompts and isinstance(prompts[0], int))
        prompt_ids = [self.engine.tokenize(p) for p in ([prompts] if single else prompts)]
        searches = [BeamSearch(params, self.engine.eos_token_ids, self.engine.model.config.vocab_size)
                    for _ in prompt_ids]
        for ids, s in zip(prompt_ids, searches):
            check_fits(len(ids), params, self.engine.max_model_len)
            self.engine.make_request(ids, s.step_params(), adapter=adapter)  # validates only
        while pending := [(ids, s) for ids, s in zip(prompt_ids, searches) if not s.done]:
            steps = [(s, [self.engine.add_request(ids + tokens, s.step_params(), adapter=adapter).request_id
                          for tokens, *_ in s.live]) for ids, s in pending]
            final = self._run([rid for _, rids in steps for rid in rids])
            for s, rids in steps:
                s.advance([candidates_of(final[rid]) for rid in rids])
        return [s.results(self.tokenizer) for s in searches]

    def _run(self, ids: list[str], progress: bool = False) -> dict[str, RequestOutput]:
        """Step the engine until the queued requests `ids` have finished; their final outputs."""
        final: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="generate", disable=not progress)
        while len(final) < len(ids):
            for out in self.engine.step():
                if out.finished:
                    final[out.request_id] = out
                    bar.update()
        bar.close()
        return final
