"""vLLM's server extras: /tokenize, /detokenize, /version, /ping, X-Request-Id, CORS, several
API keys, --root-path and the chat-template flags; on the shared server, and on one server of
its own started with those flags. The serve flags' refusals run without a server."""
from __future__ import annotations

import importlib.metadata
import json
import re
import subprocess
import sys

import httpx
import pytest
from server_testing import API_KEY, ENGINE_ARGS, REPO, start_server, stop_server

from paged_jax import cli
from paged_jax.tokenizer import load_tokenizer, render_chat

CHAT = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name three colors."}]
# The extra server's --chat-template (a file), and a request's own (trusted there)
SERVER_TEMPLATE = ("{% for m in messages %}<<{{ m.role }}>> {{ m.content }}\n{% endfor %}"
                   "{% if add_generation_prompt %}<<assistant>>{% endif %}")
REQUEST_TEMPLATE = "REQUEST {{ messages[-1].content }}"
ALLOWED_ORIGIN = "http://allowed.example"
SECOND_KEY = "second-key"


@pytest.fixture(scope="module")
def tokenizer(server):
    return load_tokenizer(server.model_dir)


@pytest.fixture(scope="module")
def vocab_size(server) -> int:
    return json.loads((server.model_dir / "config.json").read_text())["vocab_size"]


@pytest.fixture(scope="module")
def open_http(server):
    """No API key: the routes outside /v1 are open."""
    with httpx.Client(base_url=server.base_url, timeout=60) as http:
        yield http


@pytest.fixture(scope="module")
def flagged(tiny_chat_model_dir, tmp_path_factory):
    """A server with the flags under test (test_server_startup.py's small step shapes, so
    that the compile cache may already hold them)."""
    folder = tmp_path_factory.mktemp("flagged")
    (folder / "template.jinja").write_text(SERVER_TEMPLATE)
    live = start_server(tiny_chat_model_dir, folder / "log", dict(
        num_kv_blocks=32, max_model_len=64, max_num_seqs=4, max_num_batched_tokens=64,
        api_key=SECOND_KEY, allowed_origins=json.dumps([ALLOWED_ORIGIN]), allow_credentials=None,
        root_path="/api", chat_template=folder / "template.jinja",
        trust_request_chat_template=None, enable_auto_tool_choice=None,
        tool_call_parser="hermes"))
    try:
        yield live
    finally:
        stop_server(live)


# ---- /tokenize and /detokenize ---------------------------------------------------------------

@pytest.mark.parametrize("special", [True, False])
def test_tokenize_a_prompt_is_the_tokenizers_encode(open_http, tokenizer, special):
    text = "The capital of France is Paris. Ünïcödé ✓"
    r = open_http.post("/tokenize", json={"prompt": text, "add_special_tokens": special})
    assert r.status_code == 200, r.text
    want = tokenizer.encode(text, add_special_tokens=special)
    assert r.json() == {"count": len(want), "max_model_len": ENGINE_ARGS["max_model_len"],
                        "tokens": want, "token_strs": None}


def test_tokenize_returns_token_strings_when_asked(open_http, tokenizer):
    r = open_http.post("/tokenize", json={"prompt": "Hello world", "return_token_strs": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["token_strs"] == tokenizer.convert_ids_to_tokens(body["tokens"])
    assert len(body["token_strs"]) == body["count"] > 1


@pytest.mark.parametrize("generation_prompt", [True, False])
def test_tokenize_messages_is_the_rendered_chat_template(open_http, tokenizer,
                                                         generation_prompt):
    r = open_http.post("/tokenize", json={"messages": CHAT,
                                          "add_generation_prompt": generation_prompt,
                                          "return_token_strs": True, "model": "tiny-llama"})
    assert r.status_code == 200, r.text
    text = render_chat(tokenizer, CHAT, add_generation_prompt=generation_prompt)
    want = tokenizer.encode(text, add_special_tokens=False)
    body = r.json()
    assert body["tokens"] == want and body["count"] == len(want)
    assert body["token_strs"] == tokenizer.convert_ids_to_tokens(want)


def test_tokenize_continues_the_final_message(open_http, tokenizer):
    messages = [*CHAT, {"role": "assistant", "content": "Red, green"}]
    r = open_http.post("/tokenize", json={"messages": messages, "add_generation_prompt": False,
                                          "continue_final_message": True})
    assert r.status_code == 200, r.text
    text = render_chat(tokenizer, messages, add_generation_prompt=False,
                       continue_final_message=True)
    assert r.json()["tokens"] == tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(r.json()["tokens"]).endswith("Red, green")


def test_detokenize_round_trips(open_http, tokenizer):
    text = "Round trip: 1, 2, 3 — done."
    ids = open_http.post("/tokenize", json={"prompt": text,
                                            "add_special_tokens": False}).json()["tokens"]
    r = open_http.post("/detokenize", json={"tokens": ids, "model": "tiny-llama"})
    assert r.status_code == 200, r.text
    assert r.json() == {"prompt": text}
    assert open_http.post("/detokenize", json={"tokens": []}).json() == {"prompt": ""}


@pytest.mark.parametrize("bad", ["vocab", -1])
def test_detokenize_an_id_outside_the_vocabulary_is_a_400_naming_it(open_http, vocab_size,
                                                                   bad):
    bad = vocab_size if bad == "vocab" else bad
    r = open_http.post("/detokenize", json={"tokens": [1, 2, bad]})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "tokens"
    assert f"tokens[2] = {bad}" in error["message"]
    assert str(vocab_size) in error["message"]


@pytest.mark.parametrize("path, body, field", [
    ("/tokenize", {"prompt": "hi", "temperature": 1}, "temperature"),
    ("/tokenize", {"messages": CHAT, "max_tokens": 3}, "max_tokens"),
    ("/tokenize", {"prompt": "hi", "messages": CHAT}, "prompt"),
    ("/tokenize", {"prompt": 5}, "prompt"),
    ("/tokenize", {}, "prompt"),
    ("/detokenize", {"tokens": [1], "skip_special_tokens": True}, "skip_special_tokens"),
    ("/detokenize", {"tokens": [1, True]}, "tokens"),
    ("/detokenize", {"tokens": ["5"]}, "tokens"),
])
def test_bad_fields_are_400s_naming_the_field(open_http, path, body, field):
    r = open_http.post(path, json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == field and field in error["message"]
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize("content", [b"", b"[1, 2]", b'{"prompt": NaN}', b"{"])
def test_tokenize_bodies_that_are_no_json_object_are_400s(open_http, content):
    r = open_http.post("/tokenize", content=content,
                       headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"]


def test_tokenize_refuses_what_the_chat_cannot_take(open_http):
    unknown = open_http.post("/tokenize", json={"prompt": "hi", "model": "other"})
    assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "model"
    special = open_http.post("/tokenize", json={"messages": CHAT, "add_special_tokens": True})
    assert special.status_code == 400
    assert special.json()["error"]["param"] == "add_special_tokens"
    # The shared server does not trust a request's own template (vLLM's default)
    template = open_http.post("/tokenize", json={"messages": CHAT,
                                                 "chat_template": REQUEST_TEMPLATE})
    assert template.status_code == 400
    assert template.json()["error"]["param"] == "chat_template"


# ---- /version, /ping, X-Request-Id, CORS on the shared server ----------------------------------

def test_version_and_ping(open_http):
    assert open_http.get("/version").json() == {
        "version": importlib.metadata.version("paged-jax")}
    for method in ("GET", "POST"):
        assert open_http.request(method, "/ping").status_code == 200
    assert open_http.put("/ping").status_code == 405


def test_every_response_echoes_the_request_id(server, open_http):
    for method, path, status in [("GET", "/health", 200), ("GET", "/v1/models", 401),
                                 ("GET", "/no/such/route", 404), ("POST", "/tokenize", 400)]:
        r = open_http.request(method, path, headers={"X-Request-Id": f"mine-{path}"})
        assert r.status_code == status
        assert r.headers.get_list("x-request-id") == [f"mine-{path}"]
    # through a stream too
    with server.http() as http, http.stream("POST", "/v1/completions", headers={
            "X-Request-Id": "streamed-1"}, json={"model": server.model, "prompt": "Hi",
                                                 "max_tokens": 3, "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["x-request-id"] == "streamed-1"
        assert "[DONE]" in r.read().decode()


def test_a_request_without_an_id_gets_a_new_one_each_time(open_http):
    ids = [open_http.get("/health").headers.get_list("x-request-id") for _ in range(3)]
    assert all(len(one) == 1 and re.fullmatch(r"[0-9a-f]{32}", one[0]) for one in ids)
    assert len({one[0] for one in ids}) == 3


def test_cors_allows_any_origin_by_default(open_http):
    r = open_http.get("/health", headers={"Origin": "http://anywhere.example"})
    assert r.headers["access-control-allow-origin"] == "*"
    preflight = open_http.options("/v1/chat/completions", headers={
        "Origin": "http://anywhere.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert preflight.status_code == 200  # answered before the API key is asked for
    assert preflight.headers["access-control-allow-origin"] == "*"


# ---- a server with the flags -----------------------------------------------------------------

def _preflight(live, origin: str) -> httpx.Response:
    return httpx.options(live.base_url + "/v1/chat/completions", timeout=30, headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})


def test_cors_preflight_from_an_allowed_origin_only(flagged):
    allowed = _preflight(flagged, ALLOWED_ORIGIN)
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    assert allowed.headers["access-control-allow-credentials"] == "true"
    other = _preflight(flagged, "http://evil.example")
    assert other.status_code == 400
    assert "access-control-allow-origin" not in other.headers
    simple = httpx.get(flagged.base_url + "/health", headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in simple.headers


@pytest.mark.parametrize("prefix", ["", "/api"])
def test_either_api_key_works_and_a_third_does_not(flagged, prefix):
    def status(key: str | None) -> int:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.get(f"{flagged.base_url}{prefix}/v1/models", headers=headers,
                         timeout=30).status_code
    # Behind --root-path, the prefixed path is checked too (not taken for a path outside /v1)
    assert [status(API_KEY), status(SECOND_KEY), status("third-key"), status(None)] == [
        200, 200, 401, 401]


def test_routes_are_reachable_under_the_root_path(flagged):
    headers = {"Authorization": f"Bearer {SECOND_KEY}"}
    models = httpx.get(flagged.base_url + "/api/v1/models", headers=headers, timeout=30)
    assert [m["id"] for m in models.json()["data"]] == [flagged.model]
    assert httpx.get(flagged.base_url + "/api/health", timeout=30).status_code == 200
    tokens = httpx.post(flagged.base_url + "/api/tokenize", json={"prompt": "hi"}, timeout=30)
    assert tokens.status_code == 200 and tokens.json()["count"] >= 1
    schema = httpx.get(flagged.base_url + "/api/openapi.json", headers=headers, timeout=30)
    assert schema.json()["servers"] == [{"url": "/api"}]
    # /tokenize reads its body itself: its two shapes are documented by reference
    body = schema.json()["paths"]["/tokenize"]["post"]["requestBody"]
    refs = [one["$ref"] for one in body["content"]["application/json"]["schema"]["oneOf"]]
    components = schema.json()["components"]["schemas"]
    assert all(ref.rsplit("/", 1)[1] in components for ref in refs) and len(refs) == 2
    assert "ChatMessage" in json.dumps(components["TokenizeChatRequest"])


def test_the_server_template_renders_chats_and_a_trusted_request_brings_its_own(flagged):
    tokenizer = load_tokenizer(flagged.model_dir)
    r = httpx.post(flagged.base_url + "/tokenize", json={"messages": CHAT}, timeout=30)
    assert r.status_code == 200, r.text
    text = render_chat(tokenizer, CHAT, chat_template=SERVER_TEMPLATE)
    assert text.startswith("<<system>> Be brief.") and text.endswith("<<assistant>>")
    assert r.json()["tokens"] == tokenizer.encode(text, add_special_tokens=False)
    own = httpx.post(flagged.base_url + "/tokenize", timeout=30, json={
        "messages": CHAT, "chat_template": REQUEST_TEMPLATE})
    assert own.status_code == 200, own.text
    assert own.json()["tokens"] == tokenizer.encode("REQUEST Name three colors.",
                                                    add_special_tokens=False)


def test_the_flagged_server_answers_a_chat_with_tools(flagged):
    """--enable-auto-tool-choice --tool-call-parser hermes: a chat offering a tool is served
    (whether the random model calls it is beside the point)."""
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}
    with flagged.http() as http:
        r = http.post("/v1/chat/completions", json={
            "model": flagged.model, "messages": CHAT, "tools": [tool], "tool_choice": "auto",
            "max_tokens": 4})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] in ("length", "stop", "tool_calls")


# ---- the serve flags, refused before a model loads ----------------------------------------------

def test_an_unreadable_chat_template_stops_serve_before_the_model_loads(tmp_path):
    missing = tmp_path / "no-such-template.jinja"
    run = subprocess.run([sys.executable, "-m", "paged_jax", "serve", "--model", "/no/model",
                          "--chat-template", str(missing)], capture_output=True, text=True,
                         timeout=120, cwd=REPO)
    assert run.returncode == 2
    assert "--chat-template" in run.stderr and str(missing) in run.stderr
    assert "/no/model" not in run.stderr  # it never got as far as the model


@pytest.mark.parametrize("argv, words", [
    (["--tool-call-parser", "nope"], "argument --tool-call-parser: invalid choice: 'nope'"),
    (["--enable-auto-tool-choice"], "--enable-auto-tool-choice needs --tool-call-parser"),
    (["--allowed-origins", "http://a.example"], "argument --allowed-origins: not a JSON list"),
    (["--allowed-headers", '["x", 1]'], "argument --allowed-headers: not a JSON list"),
    (["--root-path", "api/"], "--root-path must be a path"),
])
def test_bad_serve_flags_are_usage_errors(capsys, argv, words):
    with pytest.raises(SystemExit) as info:
        cli.main(["serve", *argv])
    assert info.value.code == 2
    assert words in capsys.readouterr().err


def test_tool_call_parsers_are_the_servers():
    from paged_jax.server.chat_options import TOOL_CALL_PARSERS

    assert cli.TOOL_CALL_PARSERS == TOOL_CALL_PARSERS


def test_api_keys_from_flags_else_the_environment(monkeypatch):
    parser = cli.build_parser()
    for name in cli.API_KEY_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    assert cli.api_keys(parser.parse_args(["serve"])) == []
    monkeypatch.setenv("VLLM_API_KEY", "from-vllm")
    assert cli.api_keys(parser.parse_args(["serve"])) == ["from-vllm"]
    monkeypatch.setenv("PAGED_JAX_API_KEY", "from-paged-jax")
    assert cli.api_keys(parser.parse_args(["serve"])) == ["from-paged-jax"]
    given = parser.parse_args(["serve", "--api-key", "a", "--api-key", "b"])
    assert cli.api_keys(given) == ["a", "b"]


def test_cors_flags_parse_to_the_middleware_options():
    args = cli.build_parser().parse_args([
        "serve", "--allowed-origins", '["https://a.example", "https://b.example"]',
        "--allowed-methods", '["GET", "POST"]', "--allow-credentials"])
    options = cli.cors_options(args)
    assert options.middleware_kwargs() == dict(
        allow_origins=["https://a.example", "https://b.example"],
        allow_methods=["GET", "POST"], allow_headers=["*"], allow_credentials=True)


# ---- the middleware in process (no engine) ------------------------------------------------------

def test_a_500_from_an_unhandled_error_carries_the_request_id_too():
    from fastapi.testclient import TestClient

    from paged_jax.server.app import _App
    from paged_jax.server.errors import install_handlers

    app = _App()
    install_handlers(app)

    @app.get("/boom")
    async def boom():
        raise RuntimeError("boom")

    @app.get("/own")
    async def own():  # a route's own X-Request-Id is replaced, not doubled
        from fastapi.responses import Response

        return Response(headers={"X-Request-Id": "the-routes"})

    with TestClient(app, raise_server_exceptions=False) as http:
        r = http.get("/boom", headers={"X-Request-Id": "failing-1"})
        assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
        assert r.headers.get_list("x-request-id") == ["failing-1"]
        assert http.get("/own", headers={"X-Request-Id": "client-1"}).headers.get_list(
            "x-request-id") == ["client-1"]


@pytest.mark.parametrize("path, root, want", [
    ("/v1/models", "", "/v1/models"), ("/api/v1/models", "/api", "/v1/models"),
    ("/v1/models", "/api", "/v1/models"), ("/apix/v1", "/api", "/apix/v1"),
    ("/api", "/api", ""),
])
def test_route_path_strips_the_root_path_as_starlette_routes(path, root, want):
    from starlette._utils import get_route_path

    from paged_jax.server.middleware import route_path

    scope = {"path": path, "root_path": root}
    assert route_path(scope) == want == get_route_path(scope)
