"""Host-side handling of the tokens a step appended: logprobs, detokenization, and the
RequestOutputs users see."""
from __future__ import annotations

import time

import numpy as np

from paged_jax.detokenizer import output_text
from paged_jax.request import CompletionOutput, Logprob, Request, RequestOutput


class OutputBuilder:
    def __init__(self, tokenizer, text_every_step: bool = False):
        self.tokenizer = tokenizer
        # Offline generation only needs the final text; streaming servers want it every step.
        self.text_every_step = text_every_step

    def record(self, req: Request, result: dict[str, np.ndarray], start: int, n: int) -> None:
        """The step appended n tokens to req (Scheduler.update_from_output decided how many),
        sampled at rows start..start+n-1 of the step's result: their logprobs (only when
        asked for: this runs for every request every step), and the first token's time."""
        if req.first_token_time is None:
            req.first_token_time = time.monotonic()
        if req.params.logprobs is None:
            return
        for i in range(start, start + n):
            row = {k: v[i] for k, v in result.items()}
            req.cumulative_logprob += float(row["logprob"])
            req.output_logprobs.append(self._logprobs(
                req.params.logprobs, int(row["tokens"]), row, req.params.detokenize))

    def record_prompt_score(self, req: Request, position: int, result: dict[str, np.ndarray],
                            row: int) -> None:
        """Row `row` of a step's result scored the prompt token after `position`: its entry
        of the request's prompt logprobs (entry 0 is the first token's None)."""
        if req.finished or req.prompt_logprobs is None:
            return  # aborted meanwhile
        entry = self._logprobs(req.params.prompt_logprobs, int(result["tokens"][row]),
                               {k: v[row] for k, v in result.items()}, req.params.detokenize)
        if position + 1 < len(req.prompt_logprobs):
            req.prompt_logprobs[position + 1] = entry
        elif position + 1 == len(req.prompt_logprobs):
            req.prompt_logprobs.append(entry)
        else:
            raise AssertionError(f"prompt position {position} scored before the ones ahead "
                                 f"of it ({len(req.prompt_logprobs) - 1} scored)")

    def decode(self, req: Request) -> str:
        p = req.params
        if self.tokenizer is None or not p.detokenize:  # no tokenizer files, or not asked
            return ""
        if p.skip_special_tokens or p.spaces_between_special_tokens:
            return self.tokenizer.decode(req.output_token_ids,
                                         skip_special_tokens=p.skip_special_tokens)
        return self._joined(req.output_token_ids)

    def stream_text(self, req: Request) -> str:
        """The text so far of an unfinished request, extended by the tokens since the last
        step (detokenizer.TextStream: a character still incomplete is held back), or decoded
        whole where a stream cannot give the tokenizer's decode."""
        if self.tokenizer is not None and req.params.detokenize:
            text = output_text(req, self.tokenizer)
            if text is not None:
                return text
        return self.decode(req)

    def _joined(self, ids: list[int]) -> str:
        """The text of ids with special tokens written as they are, joined to the text
        around them without the spaces a tokenizer's decoding may set around them."""
        special = self._special_ids()
        parts, run = [], []
        for t in ids:
            if t in special:
                if run:
                    parts.append(self.tokenizer.decode(run))
                    run = []
                parts.append(special[t])
            else:
                run.append(t)
        if run:
            parts.append(self.tokenizer.decode(run))
        return "".join(parts)

    def _special_ids(self) -> dict[int, str]:
        if not hasattr(self, "_special"):
            self._special = {t: str(tok) for t, tok in
                             self.tokenizer.added_tokens_decoder.items()}
        return self._special

    def _token_text(self, token: int, detokenize: bool = True) -> str | None:
        if self.tokenizer is None or not detokenize:
            return None
        return self.tokenizer.decode([token])

    def _logprobs(self, n: int, token: int, row, detokenize: bool = True
                  ) -> dict[int, Logprob]:
        out = {}
        for rank, (tid, lp) in enumerate(zip(row["top_ids"][:n], row["top_logprobs"][:n]), 1):
            out[int(tid)] = Logprob(float(lp), rank, self._token_text(int(tid), detokenize))
        out[token] = Logprob(float(row["logprob"]), int(row["rank"]),
                             self._token_text(token, detokenize))
        return out

    # Both builders below run for every running request every step (cumulative outputs):
    # they pass their fields by position, which takes half the time of keywords, and test
    # the common case first.

    def completion(self, index: int, req: Request) -> CompletionOutput:
        if req.finish_reason is None:
            text = self.stream_text(req) if self.text_every_step else ""
        elif isinstance(req.stop_reason, str):
            text = req.text  # cut at the stop string
        else:
            text = self.decode(req)  # (once: every character, none held back)
        scored = req.params.logprobs is not None
        return CompletionOutput(  # (index, text, token_ids, cumulative_logprob, logprobs, ...)
            index, text, list(req.output_token_ids),
            req.cumulative_logprob if scored else None,
            list(req.output_logprobs) if scored else None, req.finish_reason, req.stop_reason)

    def request_output(self, group_id: str, group: list[Request]) -> RequestOutput:
        first = group[0]
        finished, preemptions, cached, scheduled = True, 0, 0, None
        for r in group:  # (one loop: generator expressions cost more than the rest)
            finished = finished and r.finish_reason is not None
            preemptions += r.num_preemptions
            cached = max(cached, r.num_cached_tokens or 0)
            if r.first_scheduled_time is not None and (
                    scheduled is None or r.first_scheduled_time < scheduled):
                scheduled = r.first_scheduled_time
        return RequestOutput(  # (request_id, prompt, prompt_token_ids, outputs, finished, ...)
            group_id, first.prompt,
            # The request's own list, not a copy a step (the engine never changes a prompt;
            # vLLM shares it too): a long prompt copied for each output cost O(prompt) a step.
            first.prompt_token_ids,
            [self.completion(i, r) for i, r in enumerate(group)],
            finished, preemptions, cached, scheduled,
            list(first.prompt_logprobs) if first.prompt_logprobs is not None else None)
