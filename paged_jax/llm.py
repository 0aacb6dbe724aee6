"""The offline entry point, named as vLLM names it: LLM(...).generate / .chat."""
from __future__ import annotations

import itertools
from typing import Sequence

import jax
from tqdm.auto import tqdm

from paged_jax.config import EngineConfig
from paged_jax.engine import LLMEngine
from paged_jax.request import RequestOutput
from paged_jax.sampling_params import SamplingParams
from paged_jax.tokenizer import apply_chat_template


class LLM:
    def __init__(self, model: str | None = None, **engine_options):
        self.llm_engine = LLMEngine(EngineConfig.from_kwargs(model=model, **engine_options))
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def generate(self, prompts, sampling_params: SamplingParams | Sequence[SamplingParams] | None
                 = None, use_tqdm: bool = True) -> list[RequestOutput]:
        """prompts: a string, a list of strings, or {"prompt_token_ids": [...]} dicts.
        One SamplingParams for all prompts or a list with one per prompt. Outputs come back
        in the order of the prompts."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"got {len(params)} sampling params for {len(prompts)} prompts")
        engine = self.llm_engine
        ids = []
        try:
            for prompt, p in zip(prompts, params):
                rid = str(next(self._ids))
                engine.add_request(rid, prompt, p)
                ids.append(rid)
        except Exception:
            engine.abort_request(ids)  # a bad prompt must not leave its batch-mates queued
            raise
        return self._run(ids, use_tqdm)

    def chat(self, messages, sampling_params: SamplingParams | None = None,
             use_tqdm: bool = True) -> list[RequestOutput]:
        """messages: one conversation (a list of {"role", "content"}) or a list of them."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        tok = self.get_tokenizer()
        prompts = [{"prompt_token_ids": apply_chat_template(tok, c)} for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        engine, wanted, done = self.llm_engine, set(ids), {}
        # In a multi-host run every process generates; only process 0 shows progress.
        bar = tqdm(total=len(ids), desc="Processed prompts",
                   disable=not use_tqdm or jax.process_index() != 0)
        try:
            while len(done) < len(ids) and engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished and out.request_id in wanted:
                        done[out.request_id] = out
                        bar.update(1)
        finally:
            bar.close()
            leftover = [i for i in ids if i not in done]
            if leftover:
                engine.abort_request(leftover)
        return [done[i] for i in ids]
