"""When a request stops: end-of-sequence and stop tokens, stop strings, the length limit.

Plain Python, host side; the scheduler applies it to every token a step yields
(Scheduler.update_from_output), so finishing a request is decided in one place.
"""
from __future__ import annotations

from paged_jax.detokenizer import output_text
from paged_jax.request import Request


class StopChecker:
    def __init__(self, tokenizer=None):
        """tokenizer: decodes the output for stop strings (None: a token-ids-only engine,
        which refuses requests with stop strings at add_request)."""
        self.tokenizer = tokenizer

    def check(self, req: Request) -> bool:
        """After a token was appended to req.output_token_ids: sets finish_reason (and
        stop_reason, and for a stop string the text up to it) and returns True when the
        request is done."""
        token = req.output_token_ids[-1]
        p = req.params
        # The grammar takes every token (the sampler allowed only what it accepts); it stops
        # once nothing more can follow. A token it refuses (a bug) ends the output there.
        grammar_done = req.matcher is not None and (not req.matcher.consume_token(token)
                                                    or req.matcher.is_stopped())
        if not p.ignore_eos and token in req.eos_token_ids:
            req.finish_reason = "stop"
        elif token in p.stop_token_ids:
            req.finish_reason, req.stop_reason = "stop", token
        elif p.stop and len(req.output_token_ids) >= p.min_tokens \
                and self._hit_stop_string(req):
            req.finish_reason = "stop"
        elif grammar_done:
            req.finish_reason = "stop"
        elif req.num_known_tokens >= req.max_total_tokens:
            req.finish_reason = "length"
        return req.finish_reason is not None

    def _hit_stop_string(self, req: Request) -> bool:
        text = output_text(req, self.tokenizer, complete=True)
        if text is None:  # (no stream for this tokenizer, or a character not complete yet)
            text = self.tokenizer.decode(req.output_token_ids,
                                         skip_special_tokens=req.params.skip_special_tokens)
        # Only the tail can hold a new match: the text before it was checked last token.
        window = max(len(s) for s in req.params.stop) + 16
        start = max(0, len(text) - window)
        for stop in req.params.stop:
            at = text.find(stop, start)
            if at >= 0:
                end = at + len(stop) if req.params.include_stop_str_in_output else at
                req.text, req.stop_reason = text[:end], stop
                return True
        return False
