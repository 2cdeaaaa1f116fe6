"""Train the toy world's base model: a small LLaMA- or GPT-2-style ``HookedTransformer``.

The base model learns every training-template question of every concept (loss on the answer
token) and the in-context copying task (loss on the copied half of each list); optionally also
the concepts' biographies (language-model loss on every token). It is built from a
``HookedTransformerConfig`` in code and trained with AdamW, deterministically for a seed on the
CPU.

Trained models are cached on disk under a key that hashes the world, the model config and the
training settings, so a second call with the same arguments loads instead of training. The
cache folder is ``cache_dir``, else the ``UNLEARNLENS_CACHE`` environment variable (plus
``toy/``), else ``~/.cache/unlearnlens/toy/``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformers import PreTrainedTokenizerFast

from unlearnlens._progress import bar
from unlearnlens._roles import mark_base
from unlearnlens.errors import ConfigError, NonFiniteLossError
from unlearnlens.toy.tokenizer import make_tokenizer
from unlearnlens.toy.world import COPY_PREFIX, World

__all__ = [
    "ToyTrainConfig",
    "cache_key",
    "default_cache_dir",
    "model_config",
    "train_base",
]

_CACHE_FORMAT = 1  # bump when training changes in a way the key does not see


@dataclass(frozen=True)
class ToyTrainConfig:
    """How the base model is trained. Every field enters the cache key."""

    steps: int = 300
    """Optimizer steps."""

    batch_size: int = 32
    """Question/answer sequences per step (drawn epoch by epoch, without replacement)."""

    copy_batch_size: int = 48
    """Copying-task sequences per step (fresh random lists, never a held-out probe)."""

    text_batch_size: int = 0
    """Biography paragraphs per step, trained with a language-model loss on every token.

    Off by default: it costs a fifth more time per step and does not improve paraphrase
    accuracy on the default world.
    """

    lr: float = 2e-3
    """Peak AdamW learning rate."""

    min_lr_ratio: float = 0.05
    """The cosine schedule decays to ``lr * min_lr_ratio``."""

    warmup_steps: int = 100
    """Linear warm-up steps at the start."""

    weight_decay: float = 0.01
    """AdamW weight decay (not applied to norms, biases and embeddings)."""

    betas: tuple[float, float] = (0.9, 0.98)
    """AdamW betas."""

    grad_clip: float = 1.0
    """Gradient-norm clipping threshold (0 turns clipping off)."""

    seed: int = 0
    """Seed of the weight initialisation and of the data order."""

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(
                    f"ToyTrainConfig.{name} must be a positive integer, got {value!r}"
                )
        for name in ("copy_batch_size", "text_batch_size", "warmup_steps", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(
                    f"ToyTrainConfig.{name} must be a non-negative integer, got {value!r}"
                )
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(
                f"ToyTrainConfig.lr must be a positive finite number, got {self.lr!r}"
            )
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(
                f"ToyTrainConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}"
            )
        if not self.weight_decay >= 0.0:
            raise ConfigError(
                f"ToyTrainConfig.weight_decay must be >= 0, got {self.weight_decay!r}"
            )
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(
                f"ToyTrainConfig.betas must be two numbers in [0, 1), got {self.betas!r}"
            )
        if not self.grad_clip >= 0.0:
            raise ConfigError(f"ToyTrainConfig.grad_clip must be >= 0, got {self.grad_clip!r}")


_MODEL_DEFAULTS: dict[str, dict] = {
    "llama": dict(
        n_layers=6,
        d_model=128,
        n_heads=4,
        d_head=32,
        n_key_value_heads=2,
        d_mlp=256,
        act_fn="silu",
        normalization_type="RMS",
        positional_embedding_type="rotary",
        rotary_dim=32,
        gated_mlp=True,
        final_rms=True,
        n_ctx=128,
    ),
    "gpt2": dict(
        n_layers=6,
        d_model=128,
        n_heads=4,
        d_head=32,
        d_mlp=512,
        act_fn="gelu_new",
        normalization_type="LN",
        positional_embedding_type="standard",
        n_ctx=128,
    ),
}
_CONFIG_FIELDS = {f.name for f in dataclasses.fields(HookedTransformerConfig)}
_TRAIN_FIELDS = {f.name for f in dataclasses.fields(ToyTrainConfig)}


def model_config(
    arch: str, d_vocab: int, *, device: str = "cpu", **overrides
) -> HookedTransformerConfig:
    """The base model's ``HookedTransformerConfig``.

    LLaMA-style by default: RMSNorm, rotary embeddings, a gated SiLU MLP, grouped-query
    attention (4 query heads sharing 2 key/value heads), 6 layers of width 128. GPT-2-style
    on request: LayerNorm, learned positions, a GELU MLP.

    Args:
        arch: ``"llama"`` or ``"gpt2"``.
        d_vocab: Vocabulary size (the tokenizer's length).
        device: Where the model lives.
        **overrides: Any ``HookedTransformerConfig`` field (``n_layers=8``, ``d_mlp=512``).

    Raises:
        ConfigError: An unknown architecture or config field.
    """
    if arch not in _MODEL_DEFAULTS:
        raise ConfigError(
            f"unknown toy architecture {arch!r}; expected one of {sorted(_MODEL_DEFAULTS)}"
        )
    unknown = sorted(set(overrides) - _CONFIG_FIELDS)
    if unknown:
        raise ConfigError(f"unknown HookedTransformerConfig field(s) {unknown} for the toy model")
    fields = {**_MODEL_DEFAULTS[arch], **overrides}
    if arch == "llama" and "d_head" in overrides and "rotary_dim" not in overrides:
        fields["rotary_dim"] = fields["d_head"]
    return HookedTransformerConfig(
        d_vocab=d_vocab,
        act_fn=fields.pop("act_fn"),
        device=device,
        seed=None,
        default_prepend_bos=True,
        **fields,
    )


def default_cache_dir() -> Path:
    """``$UNLEARNLENS_CACHE/toy`` if that variable is set, else ``~/.cache/unlearnlens/toy``."""
    env = os.environ.get("UNLEARNLENS_CACHE")
    return Path(env) / "toy" if env else Path.home() / ".cache" / "unlearnlens" / "toy"


def cache_key(world: World, cfg: HookedTransformerConfig, train_cfg: ToyTrainConfig) -> str:
    """A hash of everything a trained base model depends on: world, model config, training."""
    skip = {"device", "n_devices", "n_params"}
    model_fields = {k: str(v) for k, v in sorted(cfg.to_dict().items()) if k not in skip}
    payload = {
        "format": _CACHE_FORMAT,
        "world": world.to_dict(),
        "model": model_fields,
        "train": dataclasses.asdict(train_cfg),
        "device_type": torch.device(cfg.device).type,
    }
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


# --------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class _Data:
    """Token ids and loss masks of the fixed training sequences, plus the copying task."""

    qa_tokens: torch.Tensor  # [n_qa, seq], right-padded
    qa_targets: torch.Tensor  # [n_qa, seq], -100 except at the answer
    text_tokens: torch.Tensor  # [n_text, seq]
    text_targets: torch.Tensor
    copy_prefix: list[int]  # <bos> Copy :
    copy_sep: int  # the id of " ;"
    copy_word_ids: torch.Tensor  # [n_words] ids of " word"
    held_out: frozenset[tuple[int, ...]]  # capability probes, as word-id tuples


def _encode(tok: PreTrainedTokenizerFast, text: str, *, bos: bool = True) -> list[int]:
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return ([tok.bos_token_id] if bos else []) + ids


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def _build_data(world: World, tok: PreTrainedTokenizerFast, n_ctx: int) -> _Data:
    pad = tok.pad_token_id
    qa_rows, qa_tgts = [], []
    for q, a in world.training_pairs():
        p, ans = _encode(tok, q), _encode(tok, a, bos=False)
        ids = p + ans
        tgt = [-100] * len(ids)
        for j, t in enumerate(ans):  # position n-1+j predicts answer token j
            tgt[len(p) - 1 + j] = t
        qa_rows.append(ids)
        qa_tgts.append(tgt)
    text_rows, text_tgts = [], []
    for c in world.concepts:
        for text in world.texts(c):
            ids = [*_encode(tok, text), tok.eos_token_id]
            text_rows.append(ids)
            text_tgts.append([*ids[1:], -100])
    longest = max(len(r) for r in qa_rows + text_rows)
    if longest > n_ctx:
        raise ConfigError(f"a training sequence has {longest} tokens, more than n_ctx={n_ctx}")
    word_ids = [_encode(tok, " " + w, bos=False) for w in world.copy_words]
    if any(len(w) != 1 for w in word_ids):
        raise ConfigError("every copy word must be one token under the toy tokenizer")
    id_of = {w: i[0] for w, i in zip(world.copy_words, word_ids, strict=True)}
    return _Data(
        qa_tokens=_pad(qa_rows, pad),
        qa_targets=_pad(qa_tgts, -100),
        text_tokens=_pad(text_rows, pad),
        text_targets=_pad(text_tgts, -100),
        copy_prefix=_encode(tok, COPY_PREFIX),
        copy_sep=_encode(tok, " ;", bos=False)[0],
        copy_word_ids=torch.tensor([i[0] for i in word_ids], dtype=torch.long),
        held_out=frozenset(tuple(id_of[w] for w in ws) for ws in world.capability_lists),
    )


def _copy_batch(
    data: _Data, n: int, rng: random.Random, pad: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh copy-task sequences; the loss is on the copied half (never a held-out list)."""
    words = data.copy_word_ids.tolist()
    rows, tgts = [], []
    while len(rows) < n:
        chosen = tuple(rng.sample(words, rng.randint(4, 7)))
        if chosen in data.held_out:
            continue
        ids = [*data.copy_prefix, *chosen, data.copy_sep, *chosen]
        first = len(data.copy_prefix) + len(chosen)  # the separator predicts the first copy
        tgt = [-100] * len(ids)
        tgt[first : len(ids) - 1] = ids[first + 1 :]
        rows.append(ids)
        tgts.append(tgt)
    return _pad(rows, pad), _pad(tgts, -100)


def _loss(model: HookedTransformer, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    width = int((targets != -100).nonzero()[:, 1].max()) + 1
    logits = model(tokens[:, :width].to(model.cfg.device))
    return F.cross_entropy(
        logits.flatten(0, 1).float(),
        targets[:, :width].flatten().to(logits.device),
        ignore_index=-100,
    )


def _param_groups(model: HookedTransformer, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        is_matrix = p.ndim >= 2 and "embed" not in name
        (decay if is_matrix else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _lr_at(step: int, cfg: ToyTrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    frac = (step - cfg.warmup_steps) / span
    return cfg.lr * (
        cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac))
    )


def _cat_batches(
    a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor], pad: int
):
    width = max(a[0].shape[1], b[0].shape[1])

    def widen(x: torch.Tensor, value: int) -> torch.Tensor:
        return F.pad(x, (0, width - x.shape[1]), value=value)

    return (
        torch.cat([widen(a[0], pad), widen(b[0], pad)]),
        torch.cat([widen(a[1], -100), widen(b[1], -100)]),
    )


def _fit(
    model: HookedTransformer,
    data: _Data,
    cfg: ToyTrainConfig,
    *,
    pad: int,
    progress: bool | None,
    on_step: Callable[[int], None] | None = None,
) -> None:
    rng = random.Random(f"toy-train:{cfg.seed}")
    order_gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas)
    n_qa = data.qa_tokens.shape[0]
    perm, cursor = torch.randperm(n_qa, generator=order_gen), 0
    model.train()
    pbar = bar(range(cfg.steps), progress=progress, desc="training toy base model", leave=False)
    for step in pbar:
        if cursor + cfg.batch_size > n_qa:
            perm, cursor = torch.randperm(n_qa, generator=order_gen), 0
        idx = perm[cursor : cursor + min(cfg.batch_size, n_qa)]
        cursor += cfg.batch_size
        # questions and copy lists have similar lengths: one forward pass for both, where
        # every supervised token counts the same
        batch = (data.qa_tokens[idx], data.qa_targets[idx])
        if cfg.copy_batch_size:
            batch = _cat_batches(batch, _copy_batch(data, cfg.copy_batch_size, rng, pad), pad)
        loss = _loss(model, *batch)
        if cfg.text_batch_size:
            t_idx = torch.randint(
                data.text_tokens.shape[0], (cfg.text_batch_size,), generator=order_gen
            )
            loss = loss + _loss(model, data.text_tokens[t_idx], data.text_targets[t_idx])
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"toy base training hit a non-finite loss ({loss.item()}) at step {step}"
            )
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        if progress and step % 25 == 0:
            pbar.set_postfix(loss=f"{loss.item():.3f}")
        if on_step is not None:
            on_step(step)
    pbar.close()
    model.eval()


# --------------------------------------------------------------------------------- public


def _split_overrides(overrides: dict) -> tuple[dict, dict]:
    train, model = {}, {}
    for key, value in overrides.items():
        if key in _TRAIN_FIELDS:
            train[key] = value
        elif key in _CONFIG_FIELDS:
            model[key] = value
        else:
            raise ConfigError(
                f"unknown override {key!r}: neither a ToyTrainConfig field "
                f"({sorted(_TRAIN_FIELDS)}) nor a HookedTransformerConfig field"
            )
    return train, model


def train_base(
    world: World,
    arch: str = "llama",
    *,
    seed: int = 0,
    steps: int | None = None,
    cache_dir: str | Path | None = None,
    progress: bool | None = None,
    device: str | torch.device | None = None,
    **overrides,
) -> HookedTransformer:
    """Trains (or loads from the cache) the base model of a toy world.

    The model answers every fact of the world (forget, retain and unrelated splits) and does
    the copying task; its tokenizer (:func:`unlearnlens.toy.make_tokenizer` over the world)
    is attached, with right padding.

    Training is deterministic for a seed on the CPU. Results are cached under a hash of the
    world, the model config and the training settings: a second call with the same arguments
    loads the saved model.

    Args:
        world: The world to learn (:func:`unlearnlens.toy.make_world`).
        arch: ``"llama"`` (RMSNorm, rotary, gated SiLU MLP, grouped-query attention) or
            ``"gpt2"`` (LayerNorm, learned positions, GELU MLP).
        seed: Seed of the initialisation and data order.
        steps: Optimizer steps (default :attr:`ToyTrainConfig.steps`).
        cache_dir: Cache folder; default :func:`default_cache_dir`.
        progress: Show a progress bar while training (``None``: the library-wide
            setting, :func:`unlearnlens.set_progress`).
        device: Where to train and return the model (default the CPU; another device type
            trains there and is cached under its own key, since results differ across devices).
        **overrides: :class:`ToyTrainConfig` fields (``lr=1e-3``) or
            ``HookedTransformerConfig`` fields (``n_layers=8``).

    Returns:
        The trained model, in eval mode, with ``model.tokenizer`` set.

    Raises:
        ConfigError: An unknown architecture or override, or a bad training setting.
    """
    from unlearnlens.models import load_model, save_model

    if not isinstance(world, World):
        raise ConfigError(
            f"train_base needs a toy World (from make_world), got {type(world).__name__}"
        )
    train_over, model_over = _split_overrides(overrides)
    if steps is not None:
        train_over["steps"] = steps
    train_cfg = ToyTrainConfig(seed=seed, **train_over)
    device_str = str(device) if device is not None else "cpu"
    tok = make_tokenizer(world.corpus())
    cfg = model_config(arch, len(tok), device=device_str, **model_over)

    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = folder / f"{arch}-{cache_key(world, cfg, train_cfg)}"
    if target.is_dir():
        return _attach(load_model(target, device=device_str))

    data = _build_data(world, tok, cfg.n_ctx)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(train_cfg.seed)
        model = HookedTransformer(cfg, tokenizer=tok, default_padding_side="right")
        _fit(model, data, train_cfg, pad=tok.pad_token_id, progress=progress)

    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=folder))
    try:
        save_model(model, tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process cached the same model first
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _attach(model)


def _attach(model: HookedTransformer) -> HookedTransformer:
    model.eval()
    if model.tokenizer is not None:
        model.tokenizer.padding_side = "right"
    return mark_base(model)
