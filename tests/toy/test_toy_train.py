from __future__ import annotations

import time

import pytest
import torch

from unlearnlens.errors import ConfigError
from unlearnlens.toy import ToyTrainConfig, accuracy_by_split, make_world, split_pairs, train_base

TINY = dict(
    n_layers=2,
    d_model=32,
    n_heads=4,
    d_head=8,
    d_mlp=32,
    steps=4,
    batch_size=8,
    copy_batch_size=4,
    text_batch_size=2,
    warmup_steps=1,
)


@pytest.fixture(scope="module")
def small_world():
    return make_world(0, n_concepts=4, n_relations=2, n_capability=4)


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_deterministic_for_a_seed(small_world, tmp_path, arch):
    kw = dict(TINY, n_key_value_heads=2) if arch == "llama" else TINY
    a = train_base(small_world, arch, cache_dir=tmp_path / "a", progress=False, **kw)
    b = train_base(small_world, arch, cache_dir=tmp_path / "b", progress=False, **kw)
    c = train_base(small_world, arch, seed=1, cache_dir=tmp_path / "c", progress=False, **kw)
    assert _same_weights(a, b)
    assert not _same_weights(a, c)
    assert a.cfg.n_layers == 2 and not a.training
    if arch == "llama":
        assert a.cfg.normalization_type == "RMS" and a.cfg.gated_mlp and a.cfg.final_rms
        assert a.cfg.positional_embedding_type == "rotary" and a.cfg.n_key_value_heads == 2
    else:
        assert a.cfg.normalization_type == "LN" and a.cfg.positional_embedding_type == "standard"


def test_cache_hit(small_world, tmp_path):
    start = time.perf_counter()
    first = train_base(small_world, cache_dir=tmp_path, progress=False, **TINY)
    trained = time.perf_counter() - start
    entries = [p for p in tmp_path.iterdir()]
    assert len(entries) == 1 and entries[0].is_dir() and not entries[0].name.startswith(".")
    start = time.perf_counter()
    second = train_base(small_world, cache_dir=tmp_path, progress=False, **TINY)
    loaded = time.perf_counter() - start
    assert _same_weights(first, second)
    assert loaded < trained
    assert second.tokenizer is not None and second.tokenizer.padding_side == "right"
    q, a = small_world.forget[0]
    assert torch.equal(first.to_tokens(q), second.to_tokens(q))
    with torch.no_grad():
        assert torch.equal(first(first.to_tokens(q + a)), second(second.to_tokens(q + a)))
    # a different setting is a different cache entry
    train_base(small_world, cache_dir=tmp_path, progress=False, **dict(TINY, steps=2))
    assert len(list(tmp_path.iterdir())) == 2


def test_env_cache_dir(small_world, tmp_path, monkeypatch):
    monkeypatch.setenv("UNLEARNLENS_CACHE", str(tmp_path))
    train_base(small_world, progress=False, **dict(TINY, steps=1))
    assert len(list((tmp_path / "toy").iterdir())) == 1


def test_caller_rng_untouched(small_world, tmp_path):
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    train_base(small_world, cache_dir=tmp_path, progress=False, **dict(TINY, steps=1))
    assert torch.equal(torch.rand(3), expected)


def test_bad_settings_raise(small_world, tmp_path):
    with pytest.raises(ConfigError, match="unknown override 'colour'"):
        train_base(small_world, cache_dir=tmp_path, colour=3)
    with pytest.raises(ConfigError, match="unknown toy architecture"):
        train_base(small_world, "bert", cache_dir=tmp_path)
    with pytest.raises(ConfigError, match="steps"):
        train_base(small_world, steps=0, cache_dir=tmp_path)
    with pytest.raises((ConfigError, TypeError), match="World"):
        train_base([("q", "a")], cache_dir=tmp_path)
    with pytest.raises(ConfigError, match="lr"):
        ToyTrainConfig(lr=-1.0)
    assert not list(tmp_path.iterdir())


def test_accuracy_by_split_matches_full_forward(small_world, tmp_path):
    model = train_base(
        small_world, cache_dir=tmp_path, progress=False, **dict(TINY, steps=30, lr=1e-2)
    )
    model.train()  # the caller's mode must survive
    got = accuracy_by_split(model, small_world)
    assert model.training
    tok = model.tokenizer
    model.eval()
    for name, pairs in split_pairs(small_world).items():
        hits = 0
        for q, a in pairs:
            q_ids = tok(q)["input_ids"]
            a_ids = tok(a, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logits = model(torch.tensor([q_ids + a_ids]))[0]
            hits += int(logits[len(q_ids) - 1].argmax()) == a_ids[0]
        assert got[name] == pytest.approx(hits / len(pairs)), name
    assert set(got) >= {"forget", "retain", "unrelated", "paraphrase_forget", "capability"}


@pytest.mark.slow
def test_full_default_base_knows_every_fact(tmp_path):
    world = make_world(0)
    wall, cpu = time.perf_counter(), time.process_time()
    model = train_base(world, cache_dir=tmp_path, progress=False)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    acc = accuracy_by_split(model, world)
    for split in ("forget", "retain", "unrelated"):
        assert acc[split] >= 0.99, (split, acc)
    # two minutes of this 2-core machine's compute; wall time is only meaningful when idle
    assert cpu <= 2 * 120, (cpu, wall)
    assert model.cfg.n_layers >= 6
