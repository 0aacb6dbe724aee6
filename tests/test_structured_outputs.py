"""Structured outputs (StructuredOutputsParams through llguidance): every form holds the output,
greedy and sampled, batched with unconstrained requests whose outputs do not change; and the
constraint survives what the engine does to a request (n > 1, preemption both ways, chunked
prefill, drafts, asynchronous scheduling)."""
import json
import re

import jsonschema
import numpy as np
import pytest

from paged_jax import SamplingParams
from paged_jax.structured_outputs import GrammarCompiler, StructuredOutputsParams, fill_bitmask

from test_engine import make_llm, random_prompts, tiny_dir  # noqa: F401

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 8},
    "ok": {"type": "boolean"},
    "size": {"enum": ["small", "large"]}},
    "required": ["name", "ok", "size"], "additionalProperties": False}
FORMS = {
    # (A random model given the choice writes whitespace until max_tokens.)
    "json": (StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True),
             lambda text: jsonschema.validate(json.loads(text), SCHEMA)),
    "json_object": (StructuredOutputsParams(json_object=True, disable_any_whitespace=True),
                    lambda text: isinstance(json.loads(text), dict) or 1 / 0),
    "regex": (StructuredOutputsParams(regex=r"[a-z]{2,6}-[0-9]{3}"),
              lambda text: re.fullmatch(r"[a-z]{2,6}-[0-9]{3}", text) or 1 / 0),
    "choice": (StructuredOutputsParams(choice=["alpha", "beta gamma", "delta"]),
               lambda text: text in ("alpha", "beta gamma", "delta") or 1 / 0),
    "grammar": (StructuredOutputsParams(grammar='start: "(" item ("," item)* ")"\n'
                                                'item: /[0-9]/ | "x"'),
                lambda text: re.fullmatch(r"\(([0-9]|x)(,([0-9]|x))*\)", text) or 1 / 0),
}


def params(i, so=None, **kw):
    """Odd i greedy, even i sampled with its own seed."""
    base = dict(max_tokens=48, structured_outputs=so, **kw)
    if i % 2:
        return SamplingParams(temperature=0.0, **base)
    return SamplingParams(temperature=1.0, seed=10 + i, **base)


def run(llm, prompts, plist):
    outs = llm.generate(prompts, plist, use_tqdm=False)
    return [[(c.text, c.token_ids, c.finish_reason) for c in o.outputs] for o in outs]


@pytest.fixture(scope="module")
def llm(tiny_dir):
    return make_llm(tiny_dir)


@pytest.mark.parametrize("form", list(FORMS))
def test_each_form_holds_the_output_beside_unconstrained_requests(llm, form):
    so, check = FORMS[form]
    prompts = random_prompts(6, 21, 3, 20)
    free = [params(i) for i in range(2)]
    want_free = run(llm, prompts[:2], free)
    got = run(llm, prompts, free + [params(i, so) for i in range(2, 6)])
    assert got[:2] == want_free  # unconstrained rows are untouched
    grammar = GrammarCompiler(llm.llm_engine.tokenizer, 49152)
    for seq in got[2:]:
        text, ids, finish = seq[0]
        # Every token is one the constraint allows (a final EOS is its end) ...
        ids = ids[:-1] if ids and ids[-1] == 2 else ids
        assert grammar.new_matcher(so).validate_tokens(ids) == len(ids)
        # ... and a finished output is whole. Any JSON object has no bound a random model
        # must reach (it may write one key until max_tokens); the other forms do.
        assert finish == "stop" or (form == "json_object" and finish == "length"), seq
        if finish == "stop":
            check(text)
    if form == "json_object":
        assert any(seq[0][2] == "stop" for seq in got[2:])


def test_a_grammar_whose_only_path_is_eos_ends_cleanly(llm):
    out = llm.generate(random_prompts(1, 3, 5, 6), params(1, StructuredOutputsParams(regex="")),
                       use_tqdm=False)[0].outputs[0]
    assert out.text == "" and out.finish_reason == "stop" and len(out.token_ids) <= 1


@pytest.mark.parametrize("so, message", [
    (dict(regex="("), "(?s)structured_outputs.regex cannot be compiled: .*unclosed group"),
    (dict(json={"type": "nonsense"}), "structured_outputs.json cannot be compiled"),
    (dict(grammar="start: undefined_rule"), "structured_outputs.grammar cannot be compiled"),
])
def test_a_constraint_that_cannot_compile_is_refused_naming_why(llm, so, message):
    engine = llm.llm_engine
    with pytest.raises(ValueError, match=message):
        engine.add_request("bad", random_prompts(1, 0)[0],
                           params(1, StructuredOutputsParams(**so)))
    assert not engine.has_unfinished_requests()


def test_params_take_exactly_one_form():
    with pytest.raises(ValueError, match="exactly one of .*got regex, choice"):
        StructuredOutputsParams(regex="a", choice=["b"])
    with pytest.raises(ValueError, match="got none"):
        StructuredOutputsParams()
    with pytest.raises(ValueError, match="structured_outputs.json is not valid JSON"):
        StructuredOutputsParams(json="{not json")
    assert StructuredOutputsParams(json='{"type": "object"}').json == {"type": "object"}


def test_bitmask_rows_follow_the_drafts_and_leave_the_matcher_in_place(llm):
    """A drafting row's masks: the tokens allowed now, then after each draft the grammar
    accepts (as a matcher that consumed them says); past a refused draft they repeat (never
    reached)."""
    compiler = GrammarCompiler(llm.llm_engine.tokenizer, 49152)
    so = StructuredOutputsParams(choice=["yes", "no"])

    def allowed(mask, row):
        return {t for t in range(49152) if (mask[row, t // 32] >> (t % 32)) & 1}

    def allowed_after(tokens):
        m = compiler.new_matcher(so)
        assert m.consume_tokens(tokens)
        mask = np.zeros((1, compiler.mask_width), np.int32)
        fill_bitmask(m, [], mask, 0)
        return allowed(mask, 0)

    first = min(allowed_after([]))
    second = min(allowed_after([first]))
    refused = next(t for t in range(3, 49152) if t not in allowed_after([first, second]))
    matcher = compiler.new_matcher(so)
    mask = np.zeros((4, compiler.mask_width), np.int32)
    fill_bitmask(matcher, [first, second, refused], mask, 0)
    assert allowed(mask, 0) == allowed_after([])
    assert allowed(mask, 1) == allowed_after([first]) != allowed(mask, 0)
    assert allowed(mask, 2) == allowed_after([first, second])
    assert allowed(mask, 3) == allowed(mask, 2)  # after the refused draft: a repeat
    fresh = np.zeros((1, compiler.mask_width), np.int32)
    fill_bitmask(matcher, [], fresh, 0)  # the matcher is where it started
    np.testing.assert_array_equal(fresh[0], mask[0])


PLAIN = {}  # the plain engine's outputs of the test below, computed once


@pytest.mark.parametrize("opts", [
    dict(num_kv_blocks=9, enable_chunked_prefill=True, max_num_batched_tokens=24),
    dict(num_kv_blocks=9, preemption_mode="swap", num_cpu_blocks=64),
    dict(speculative_method="ngram", num_speculative_tokens=3),
    dict(async_scheduling=True),
], ids=["recompute-chunked", "swap", "ngram", "async"])
def test_constraints_survive_what_the_engine_does_to_requests(llm, tiny_dir, opts):
    """The same seeded and greedy constrained requests (n = 2) under preemption, chunked
    prefill, n-gram drafts and asynchronous scheduling give the outputs of the plain engine."""
    so, check = FORMS["json"]
    prompts = random_prompts(6, 5, 10, 40)
    plist = [params(i, so, n=2) for i in range(6)]
    if "want" not in PLAIN:
        PLAIN["want"] = run(llm, prompts, plist)
    want = PLAIN["want"]
    other = make_llm(tiny_dir, **opts)
    got = run(other, prompts, plist)
    # (Drafts change which random numbers a seeded row draws: greedy rows only, there.)
    same = range(1, 6, 2) if "speculative_method" in opts else range(6)
    assert [got[i] for i in same] == [want[i] for i in same]
    for out in got:
        for text, _, finish in out:
            assert finish == "stop"
            check(text)
    engine = other.llm_engine
    if "num_kv_blocks" in opts:
        assert engine.scheduler.num_preemptions > 0
    assert engine.kv.pool.num_free == engine.kv.pool.num_usable
