"""Concept vectors: MLP value vectors whose vocabulary projection names a concept.

A row ``W_out[layer][neuron]`` of an MLP output matrix is the vector the neuron writes into
the residual stream. Projected onto the unembedding (``W_out[n] @ W_U``) it reads as a ranking
of the vocabulary; the ConceptVectors benchmark (used by the reference study) picks, for each
concept, a neuron whose projection is dominated by the concept's tokens ("Harry", "Potter",
"Hogwarts", ...). This module finds such neurons in any model (:func:`locate_concept_vectors`)
and measures how much fine-tuning moved them (:func:`concept_vector_drift`): the study's
finding is that the value vectors barely change under fine-tuning unlearning.

The projection is the plain ``W_out[n] @ W_U`` of the benchmark (no final norm in between);
for models loaded with the final norm folded into ``W_U`` (TransformerLens's default) it is
the same as reading the vector through the final norm.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float
from torch import Tensor

from unlearnlens._checks import check_has_mlp, check_int, check_layers
from unlearnlens.errors import ConfigError, LayerError, PromptError

if TYPE_CHECKING:
    import pandas as pd
    from transformer_lens import HookedTransformer

__all__ = [
    "ConceptVector",
    "DriftTable",
    "concept_vector_drift",
    "locate_concept_vectors",
    "vocab_projection",
]


# ---------------------------------------------------------------------------------- checks


def _check_neuron(model: HookedTransformer, layer: int, neuron: int) -> tuple[int, int]:
    check_has_mlp(model, "an MLP neuron's value vector")
    (layer,) = check_layers(model, [layer])
    neuron = check_int(neuron, "neuron", error=LayerError)
    d_mlp = model.cfg.d_mlp
    if not 0 <= neuron < d_mlp:
        raise LayerError(
            f"neuron {neuron} of layer {layer} is out of range: the MLP has d_mlp={d_mlp} "
            f"neurons (valid: 0..{d_mlp - 1})"
        )
    return layer, neuron


def _check_k(k: int, d_vocab: int, what: str = "k") -> int:
    return min(check_int(k, what, minimum=1), d_vocab)


def _token_str(model: HookedTransformer, token: int) -> str:
    if model.tokenizer is None:
        return str(token)
    return model.tokenizer.decode([token])


def _projection(model: HookedTransformer, layer: int, neuron: int) -> Float[Tensor, " d_vocab"]:
    w_out = model.blocks[layer].mlp.W_out[neuron].detach().float()
    return w_out @ model.unembed.W_U.detach().float().to(w_out.device)


# ------------------------------------------------------------------------------ projection


def vocab_projection(
    model: HookedTransformer, layer: int, neuron: int, k: int = 20
) -> list[tuple[str, float]]:
    """The ``k`` tokens that neuron ``neuron`` of ``layer`` promotes most.

    Args:
        model: The model.
        layer: The MLP's layer (negative counts from the end).
        neuron: The neuron, an index into ``d_mlp``.
        k: How many tokens to list (at most the vocabulary size).

    Returns:
        ``(token, value)`` pairs sorted by ``W_out[layer][neuron] @ W_U``, highest first;
        tokens as decoded strings, or as token ids written as strings when the model has no
        tokenizer.

    Raises:
        LayerError: The layer or neuron is out of range.
        ConfigError: ``k`` is not a positive integer.
    """
    layer, neuron = _check_neuron(model, layer, neuron)
    k = _check_k(k, model.cfg.d_vocab)
    top = _projection(model, layer, neuron).topk(k)
    pairs = zip(top.values.tolist(), top.indices.tolist(), strict=True)
    return [(_token_str(model, t), v) for v, t in pairs]


# ------------------------------------------------------------------------------ locate


@dataclass(frozen=True)
class ConceptVector:
    """A neuron whose value vector promotes a concept's tokens.

    Attributes:
        layer: The MLP's layer.
        neuron: The neuron's index in ``d_mlp`` (the benchmark's ``Dim``).
        score: Mean standardised projection of the concept's tokens (see
            :func:`locate_concept_vectors`).
        top_tokens: The ten tokens its projection ranks highest, with their values.
    """

    layer: int
    neuron: int
    score: float
    top_tokens: tuple[tuple[str, float], ...]


Word = str | int


def _word_tokens(model: HookedTransformer, word: Word) -> list[int]:
    """The vocabulary ids a concept word stands for (both with and without a leading space)."""
    d_vocab = model.cfg.d_vocab
    if isinstance(word, bool):
        raise PromptError(f"concept word {word!r} is neither a string nor a token id")
    if isinstance(word, int):
        if not 0 <= word < d_vocab:
            raise PromptError(
                f"token id {word} is outside the model's vocabulary of {d_vocab} tokens"
            )
        return [word]
    if not isinstance(word, str):
        raise PromptError(f"concept word {word!r} is neither a string nor a token id")
    if not word.strip():
        raise PromptError(f"concept word {word!r} is empty")
    tok = model.tokenizer
    if tok is None:
        raise PromptError(
            f"this model has no tokenizer, so the word {word!r} cannot be looked up; pass token "
            "ids instead"
        )
    special = set(tok.all_special_ids)
    ids: list[int] = []
    for form in dict.fromkeys([word.strip(), " " + word.strip()]):
        for t in tok.encode(form, add_special_tokens=False):
            if t not in special and 0 <= t < d_vocab and t not in ids:
                ids.append(t)
    if not ids:
        raise PromptError(
            f"the word {word!r} is not in the model's vocabulary: it tokenizes only to special "
            "or unknown tokens"
        )
    return ids


def locate_concept_vectors(
    model: HookedTransformer,
    words: str | Sequence[Word],
    *,
    layers: int | Sequence[int] | None = None,
    top_k: int = 10,
) -> list[ConceptVector]:
    """Ranks MLP neurons by how strongly their value vectors promote a concept's words.

    For neuron ``n`` of layer ``l``, let ``p = W_out[l][n] @ W_U`` be its vocabulary projection
    and ``z = (p - mean(p)) / std(p)`` its standardisation over the vocabulary (so that
    neurons with large or small norms compare fairly). The score is the mean over the words of
    the mean of ``z`` over each word's tokens. A word's tokens are those of the word and of the
    word with a leading space (BPE vocabularies hold both), special and unknown tokens left
    out; an int is taken as a token id.

    The mean and standard deviation over the vocabulary are computed exactly from
    ``W_U``'s mean column and the Gram matrix of the centred ``W_U`` (``d_model x d_model``),
    so the full ``d_mlp x d_vocab`` projection of each layer is never built.

    Args:
        model: The model.
        words: The concept's words (``["Harry", "Potter", "Hogwarts"]``) or token ids.
        layers: Layers to search; all by default.
        top_k: How many neurons to return.

    Returns:
        The ``top_k`` highest-scoring neurons over all searched layers, best first.

    Raises:
        PromptError: No words, a word that is not in the vocabulary (named in the message),
            or words without a tokenizer.
        LayerError: A layer out of range.
        ConfigError: ``top_k`` is not a positive integer.
    """
    if isinstance(words, (str, int)):
        words = [words]
    words = list(words)
    if not words:
        raise PromptError("no concept words given")
    word_ids = [_word_tokens(model, w) for w in words]
    check_has_mlp(model, "locate_concept_vectors")
    layer_list = check_layers(model, layers)
    top_k = _check_k(top_k, len(layer_list) * model.cfg.d_mlp, "top_k")

    with torch.no_grad():
        w_u = model.unembed.W_U.detach().float()  # [d_model, d_vocab]
        mu = w_u.mean(-1)
        centred = w_u - mu[:, None]
        gram = centred @ centred.T / w_u.shape[-1]
        scores = []
        for layer in layer_list:
            a = model.blocks[layer].mlp.W_out.detach().float().to(w_u.device)  # [d_mlp, d_model]
            mean = a @ mu
            std = ((a @ gram) * a).sum(-1).clamp(min=0.0).sqrt()
            per_word = [((a @ w_u[:, ids]) - mean[:, None]).mean(-1) / std for ids in word_ids]
            scores.append(torch.stack(per_word).mean(0))
        flat = torch.stack(scores).nan_to_num(nan=-torch.inf).flatten()
        best = flat.topk(top_k)

    d_mlp = model.cfg.d_mlp
    out = []
    for value, index in zip(best.values.tolist(), best.indices.tolist(), strict=True):
        layer, neuron = layer_list[index // d_mlp], index % d_mlp
        out.append(
            ConceptVector(
                layer=layer,
                neuron=neuron,
                score=float(value),
                top_tokens=tuple(vocab_projection(model, layer, neuron, k=10)),
            )
        )
    return out


# ------------------------------------------------------------------------------- drift


def _layer_neuron(vector: object) -> tuple[int, int]:
    if isinstance(vector, tuple) and len(vector) == 2:
        return vector[0], vector[1]
    layer = getattr(vector, "layer", None)
    neuron = getattr(vector, "neuron", getattr(vector, "dim", None))
    if layer is None or neuron is None:
        raise ConfigError(
            f"a concept vector must be a ConceptVector, a (layer, neuron) tuple, or have "
            f"'layer' and 'neuron' (or 'dim') attributes; got {vector!r}"
        )
    return layer, neuron


@dataclass(frozen=True)
class DriftTable:
    """How far each concept vector moved between two models.

    Attributes:
        layers: Each vector's layer.
        neurons: Each vector's neuron.
        cosine: Cosine similarity of the base and unlearned value vectors.
        l2: ``||W_out_u[n] - W_out_b[n]||``.
        relative_l2: ``l2 / ||W_out_b[n]||``.
        jaccard: Overlap ``|A & B| / |A | B|`` of the two models' top-``top`` projected tokens.
        top: The number of projected tokens compared by ``jaccard``.
        lost_tokens: The base projection's ten best tokens that are no longer among the
            unlearned projection's top ``top``.
    """

    layers: tuple[int, ...]
    neurons: tuple[int, ...]
    cosine: Float[Tensor, " vector"]
    l2: Float[Tensor, " vector"]
    relative_l2: Float[Tensor, " vector"]
    jaccard: Float[Tensor, " vector"]
    top: int
    lost_tokens: tuple[tuple[str, ...], ...]

    def to_dataframe(self) -> pd.DataFrame:
        """One row per vector."""
        import pandas as pd

        return pd.DataFrame(
            {
                "layer": list(self.layers),
                "neuron": list(self.neurons),
                "cosine": self.cosine.tolist(),
                "l2": self.l2.tolist(),
                "relative_l2": self.relative_l2.tolist(),
                f"jaccard_top{self.top}": self.jaccard.tolist(),
                "lost_tokens": [list(t) for t in self.lost_tokens],
            }
        )


def concept_vector_drift(
    base: HookedTransformer,
    unlearned: HookedTransformer,
    vectors: Sequence[ConceptVector | tuple[int, int] | object],
    *,
    top: int = 200,
) -> DriftTable:
    """Compares concept vectors (``W_out`` rows) between a base and an unlearned model.

    Each model's vector is projected with its own unembedding.

    Args:
        base: The original model.
        unlearned: The unlearned model (same architecture).
        vectors: :class:`ConceptVector` objects, ``(layer, neuron)`` pairs, or objects with
            ``layer`` and ``neuron`` (or ``dim``, as in the ConceptVectors data) attributes.
        top: How many top projected tokens the Jaccard overlap compares (the benchmark's 200).

    Raises:
        IncompatibleModelsError: The models differ in architecture or tokenizer.
        LayerError: A layer or neuron out of range.
        ConfigError: No vectors, a malformed vector, or a bad ``top``.
    """
    from unlearnlens.models import check_compatible

    check_compatible(base, unlearned)
    vectors = list(vectors)
    if not vectors:
        raise ConfigError("no concept vectors given")
    pairs = [_check_neuron(base, *_layer_neuron(v)) for v in vectors]
    top = _check_k(top, base.cfg.d_vocab, "top")

    cos, l2, rel, jac, lost = [], [], [], [], []
    with torch.no_grad():
        for layer, neuron in pairs:
            vb = base.blocks[layer].mlp.W_out[neuron].detach().float()
            vu = unlearned.blocks[layer].mlp.W_out[neuron].detach().float().to(vb.device)
            diff = float((vu - vb).norm())
            cos.append(float(torch.nn.functional.cosine_similarity(vb, vu, dim=0, eps=1e-12)))
            l2.append(diff)
            rel.append(diff / max(float(vb.norm()), 1e-12))
            pb = _projection(base, layer, neuron)
            pu = _projection(unlearned, layer, neuron)
            tb = pb.topk(top).indices.tolist()
            tu = set(pu.topk(top).indices.tolist())
            jac.append(len(set(tb) & tu) / len(set(tb) | tu))
            lost.append(tuple(_token_str(base, t) for t in tb[:10] if t not in tu))
    return DriftTable(
        layers=tuple(p[0] for p in pairs),
        neurons=tuple(p[1] for p in pairs),
        cosine=torch.tensor(cos),
        l2=torch.tensor(l2),
        relative_l2=torch.tensor(rel),
        jaccard=torch.tensor(jac),
        top=top,
        lost_tokens=tuple(lost),
    )
