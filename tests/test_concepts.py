"""Concept vectors: vocabulary projection, location by word, drift between two models."""

from __future__ import annotations

import copy

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from conftest import build_model, perturbed, tiny_config
from unlearnlens.concepts import (
    ConceptVector,
    concept_vector_drift,
    locate_concept_vectors,
    vocab_projection,
)
from unlearnlens.errors import ConfigError, IncompatibleModelsError, LayerError, PromptError


def token_id(model, word: str) -> int:
    return model.tokenizer.get_vocab()[word]


def planted(arch: str, layer: int, neuron: int, words: list[str], scale: float = 4.0):
    model = build_model(arch, seed=2)
    with torch.no_grad():
        direction = sum(model.unembed.W_U[:, token_id(model, w)] for w in words)
        model.blocks[layer].mlp.W_out[neuron] = scale * direction
    return model


def hand_scores(model, token_sets: list[list[int]]) -> torch.Tensor:
    """Full projection of every neuron, standardised over the vocabulary: [layer, d_mlp]."""
    out = []
    for block in model.blocks:
        proj = block.mlp.W_out.detach().double() @ model.unembed.W_U.detach().double()
        z = (proj - proj.mean(-1, keepdim=True)) / proj.std(-1, unbiased=False, keepdim=True)
        out.append(torch.stack([z[:, ids].mean(-1) for ids in token_sets]).mean(0))
    return torch.stack(out)


@pytest.mark.parametrize(
    ("layer", "neuron", "words"),
    [
        (2, 7, ["Zorblax"]),
        (3, 30, ["Paris", "France"]),
    ],
)
def test_planted_concept_vector_is_found_first(arch, layer, neuron, words):
    model = planted(arch, layer, neuron, words)
    hits = locate_concept_vectors(model, words, top_k=5)
    assert len(hits) == 5
    assert isinstance(hits[0], ConceptVector)
    assert (hits[0].layer, hits[0].neuron) == (layer, neuron)
    top_words = [t for t, _ in vocab_projection(model, layer, neuron, k=len(words))]
    assert sorted(top_words) == sorted(words)
    assert hits[0].top_tokens[0][0] in words
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_scores_equal_a_full_projection(arch):
    model = build_model(arch, seed=3)
    words = ["river", "mountain"]
    hits = locate_concept_vectors(model, words, top_k=12)
    want = hand_scores(model, [[token_id(model, w)] for w in words])
    order = want.flatten().argsort(descending=True)[:12].tolist()
    d_mlp = model.cfg.d_mlp
    assert [(h.layer, h.neuron) for h in hits] == [(i // d_mlp, i % d_mlp) for i in order]
    for h in hits:
        assert h.score == pytest.approx(float(want[h.layer, h.neuron]), abs=1e-4)
    # restricted to some layers, only those are searched
    hits = locate_concept_vectors(model, words, layers=[1], top_k=3)
    assert {h.layer for h in hits} == {1}
    best = want[1].argsort(descending=True)[:3].tolist()
    assert [h.neuron for h in hits] == best


def test_vocab_projection_against_matmul(arch):
    model = build_model(arch, seed=4)
    got = vocab_projection(model, -1, 9, k=6)
    proj = model.blocks[3].mlp.W_out[9].detach() @ model.unembed.W_U.detach()
    vals, idx = proj.topk(6)
    vocab = {i: t for t, i in model.tokenizer.get_vocab().items()}
    assert [t for t, _ in got] == [vocab[int(i)] for i in idx]
    assert [v for _, v in got] == pytest.approx(vals.tolist(), abs=1e-5)
    # k beyond the vocabulary lists the whole vocabulary
    assert len(vocab_projection(model, 0, 0, k=10_000)) == model.cfg.d_vocab


def test_without_tokenizer_token_ids():
    model = build_model("gpt2", seed=5, tokenizer=False)
    with torch.no_grad():
        model.blocks[1].mlp.W_out[3] = 4.0 * model.unembed.W_U[:, 17]
    got = vocab_projection(model, 1, 3, k=3)
    assert got[0][0] == "17"
    hits = locate_concept_vectors(model, [17], top_k=1)
    assert (hits[0].layer, hits[0].neuron) == (1, 3)
    with pytest.raises(PromptError, match="no tokenizer"):
        locate_concept_vectors(model, ["Paris"])


def test_drift_against_hand_computation(arch):
    base = build_model(arch, seed=6)
    unlearned = perturbed(base, 0.2, seed=7)
    vectors = [(0, 1), (3, 20), ConceptVector(layer=2, neuron=5, score=0.0, top_tokens=())]
    table = concept_vector_drift(base, unlearned, vectors, top=8)
    assert table.layers == (0, 3, 2) and table.neurons == (1, 20, 5)
    for i, (layer, neuron) in enumerate([(0, 1), (3, 20), (2, 5)]):
        vb = base.blocks[layer].mlp.W_out[neuron].detach()
        vu = unlearned.blocks[layer].mlp.W_out[neuron].detach()
        assert float(table.cosine[i]) == pytest.approx(
            float(vb @ vu / (vb.norm() * vu.norm())), abs=1e-5
        )
        assert float(table.l2[i]) == pytest.approx(float((vb - vu).norm()), abs=1e-5)
        assert float(table.relative_l2[i]) == pytest.approx(
            float((vb - vu).norm() / vb.norm()), abs=1e-5
        )
        tb = set((vb @ base.unembed.W_U.detach()).topk(8).indices.tolist())
        tu = set((vu @ unlearned.unembed.W_U.detach()).topk(8).indices.tolist())
        assert float(table.jaccard[i]) == pytest.approx(len(tb & tu) / len(tb | tu))
    frame = table.to_dataframe()
    assert list(frame.columns[:3]) == ["layer", "neuron", "cosine"]
    assert len(frame) == 3


def test_drift_of_identical_models():
    base = build_model("llama", seed=8)
    table = concept_vector_drift(base, copy.deepcopy(base), [(1, 2), (2, 3)])
    torch.testing.assert_close(table.cosine, torch.ones(2))
    torch.testing.assert_close(table.l2, torch.zeros(2))
    torch.testing.assert_close(table.jaccard, torch.ones(2))
    assert table.top == base.cfg.d_vocab  # 200 clipped to the tiny vocabulary
    assert table.lost_tokens == ((), ())


def test_bad_input(arch):
    model = build_model(arch, seed=1)
    with pytest.raises(PromptError, match="blorptastic"):
        locate_concept_vectors(model, ["Paris", "blorptastic"])
    with pytest.raises(PromptError, match="empty"):
        locate_concept_vectors(model, ["  "])
    with pytest.raises(PromptError, match="no concept words"):
        locate_concept_vectors(model, [])
    with pytest.raises(PromptError, match="9999"):
        locate_concept_vectors(model, [9999])
    with pytest.raises(LayerError, match="layer 4"):
        locate_concept_vectors(model, ["Paris"], layers=[4])
    with pytest.raises(ConfigError, match="top_k"):
        locate_concept_vectors(model, ["Paris"], top_k=0)
    with pytest.raises(LayerError, match="layer 9"):
        vocab_projection(model, 9, 0)
    d_mlp = model.cfg.d_mlp
    with pytest.raises(LayerError, match=f"neuron {d_mlp} of layer 1"):
        vocab_projection(model, 1, d_mlp)
    with pytest.raises(LayerError, match="neuron -1"):
        vocab_projection(model, 1, -1)
    with pytest.raises(ConfigError, match="k must"):
        vocab_projection(model, 1, 0, k=0)
    with pytest.raises(LayerError, match="neuron"):
        concept_vector_drift(model, model, [(0, d_mlp)])
    with pytest.raises(ConfigError, match="no concept vectors"):
        concept_vector_drift(model, model, [])
    cfg = tiny_config(arch, d_vocab=model.cfg.d_vocab).to_dict()
    cfg["d_mlp"] = 80
    other = HookedTransformer(HookedTransformerConfig.from_dict(cfg), tokenizer=model.tokenizer)
    with pytest.raises(IncompatibleModelsError, match="d_mlp"):
        concept_vector_drift(model, other, [(0, 0)])


def test_weights_untouched(arch):
    model = build_model(arch, seed=1)
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    locate_concept_vectors(model, ["Paris"])
    vocab_projection(model, 0, 0)
    concept_vector_drift(model, perturbed(model, 0.1, seed=1), [(0, 0)])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert [p.requires_grad for p in model.parameters()] == flags
    assert model.training
