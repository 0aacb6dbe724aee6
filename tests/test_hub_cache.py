"""Models by hub name ("Org/Name") from the local Hugging Face hub cache, never downloaded: a
cache laid out as huggingface_hub writes it (models--org--name/refs, snapshots/<sha>/) in a
temporary folder, with the network never asked."""
from __future__ import annotations

import shutil

import pytest

from paged_jax import weights

SHA = "0123456789abcdef0123456789abcdef01234567"
OLD = "fedcba9876543210fedcba9876543210fedcba98"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, request):
    """The cache's snapshots hold a config.json only, unless the test asks for a whole model
    (the tiny_model marker): resolving a name reads no weights."""
    from huggingface_hub import constants

    repo = tmp_path / "hub" / "models--tiny-org--tiny-llama"
    for sha in (SHA, OLD):
        if request.node.get_closest_marker("tiny_model"):
            model = request.getfixturevalue("make_tiny_llama_dir")(tokenizer=True)
            shutil.copytree(model, repo / "snapshots" / sha)
        else:
            (repo / "snapshots" / sha).mkdir(parents=True)
            (repo / "snapshots" / sha / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SHA)
    (repo / "refs" / "v1").write_text(OLD)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return repo


def test_a_hub_name_resolves_to_its_cached_snapshot(hub_cache):
    assert weights.resolve_model("tiny-org/tiny-llama") == hub_cache / "snapshots" / SHA
    assert weights.resolve_model("tiny-org/tiny-llama", revision="v1") == (
        hub_cache / "snapshots" / OLD)
    assert weights.resolve_model("tiny-org/tiny-llama", revision=OLD) == (
        hub_cache / "snapshots" / OLD)


def test_a_name_not_in_the_cache_names_the_cache_and_the_revision(hub_cache):
    with pytest.raises(FileNotFoundError, match=r"'tiny-org/other' \(revision main\) is not a "
                       r"local path and not in the Hugging Face hub cache .*hub; paged-jax "
                       "never downloads"):
        weights.resolve_model("tiny-org/other")
    with pytest.raises(FileNotFoundError, match=r"\(revision v9\)"):
        weights.resolve_model("tiny-org/tiny-llama", revision="v9")
    # a revision chooses among cached snapshots; a local path or the embedded model has none
    with pytest.raises(ValueError, match=r"revision 'v1' applies to a hub name \(Org/Name\), "
                       "not to the embedded model"):
        weights.resolve_model(None, revision="v1")
    with pytest.raises(ValueError, match="revision 'v1' applies to a hub name"):
        weights.resolve_model(str(hub_cache), revision="v1")
    # a path that merely looks like a name is a missing folder, not a hub lookup
    with pytest.raises(FileNotFoundError, match="model folder tiny-org/x does not exist"):
        weights.resolve_model("./tiny-org/x")


@pytest.mark.slow  # builds an engine
@pytest.mark.tiny_model
def test_llm_loads_a_cached_hub_model_by_name(hub_cache):
    from paged_jax import LLM

    llm = LLM("tiny-org/tiny-llama", num_kv_blocks=16, max_model_len=64, revision="v1")
    engine = llm.llm_engine
    assert engine.model_name == "tiny-org/tiny-llama"
    assert engine.model_path == str(hub_cache / "snapshots" / OLD)
    assert llm.get_tokenizer() is not None


@pytest.mark.slow  # loads SmolLM2's tokenizer
def test_a_tokenizer_from_its_own_hub_repository_at_its_revision(tmp_path, monkeypatch,
                                                                 make_tiny_llama_dir,
                                                                 smollm2_tokenizer_files):
    """Weights in one cached repository, the tokenizer in another (vLLM's tokenizer= and
    tokenizer_revision=), the network unreachable; a weights-only folder alone says where
    the tokenizer can come from."""
    from huggingface_hub import constants

    from paged_jax.models.loader import load_model

    hub = tmp_path / "hub"
    weights_repo = hub / "models--org--weights-only"
    shutil.copytree(make_tiny_llama_dir(vocab_size=49152), weights_repo / "snapshots" / SHA)
    (weights_repo / "refs").mkdir()
    (weights_repo / "refs" / "main").write_text(SHA)
    tok_repo = hub / "models--org--tok"
    shutil.copytree(smollm2_tokenizer_files, tok_repo / "snapshots" / OLD)
    (tok_repo / "refs").mkdir()
    (tok_repo / "refs" / "v1").write_text(OLD)  # only at v1: main is not cached
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    with pytest.raises(FileNotFoundError, match="no tokenizer files .* --tokenizer takes it"):
        load_model("org/weights-only")
    with pytest.raises(FileNotFoundError, match=r"'org/tok' \(revision main\)"):
        load_model("org/weights-only", tokenizer="org/tok")
    m = load_model("org/weights-only", tokenizer="org/tok", tokenizer_revision="v1")
    assert m.path == str(weights_repo / "snapshots" / SHA)
    assert m.tokenizer.decode(m.tokenizer.encode("Hi there")) == "Hi there"
    assert m.tokenizer.chat_template  # SmolLM2's, from the tokenizer's repository
    with pytest.raises(ValueError, match="tokenizer_revision 'v1' needs a tokenizer"):
        load_model("org/weights-only", tokenizer_revision="v1")
    small = make_tiny_llama_dir()  # vocab 256 < the tokenizer's 49152
    with pytest.raises(ValueError, match=r"has 49152 tokens; the model's vocab_size is 256"):
        load_model(str(small), tokenizer="org/tok", tokenizer_revision="v1")
