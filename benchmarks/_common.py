"""Shared set-up for the benchmarks: a GPT-2-small-shaped model pair built from config."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

import unlearnlens as ul


def gpt2_small_pair(
    seed: int = 0, noise: float = 0.02
) -> tuple[HookedTransformer, HookedTransformer]:
    """A GPT-2-small-shaped random model (12 layers, d_model 768) and a perturbed copy."""
    cfg = HookedTransformerConfig(
        n_layers=12,
        d_model=768,
        d_head=64,
        n_heads=12,
        d_mlp=3072,
        d_vocab=50257,
        n_ctx=1024,
        act_fn="gelu_new",
        normalization_type="LN",
        seed=seed,
        device="cpu",
    )
    return model_pair(cfg, seed, noise)


def model_pair(
    cfg: HookedTransformerConfig, seed: int = 0, noise: float = 0.02
) -> tuple[HookedTransformer, HookedTransformer]:
    """A random model of ``cfg`` and a copy with Gaussian noise (seeded by ``seed + 1``)."""
    base = HookedTransformer(cfg)
    base.eval()
    other = copy.deepcopy(base)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in other.parameters():
            p.add_((noise * torch.randn(p.shape, generator=gen)).to(p.dtype))
    return base, other


def prompts(
    n: int = 8, prompt_len: int = 18, answer_len: int = 2, seed: int = 0, equal: bool = True
) -> ul.PromptSet:
    """n random prompts of about 20 tokens (equal lengths unless equal=False)."""
    gen = torch.Generator().manual_seed(seed)
    p_lens = [prompt_len] * n if equal else [prompt_len - 3 + (i % 5) for i in range(n)]
    a_lens = [answer_len] * n if equal else [1 + (i % 3) for i in range(n)]
    ptoks = [torch.randint(0, 50257, (k,), generator=gen) for k in p_lens]
    atoks = [torch.randint(0, 50257, (k,), generator=gen) for k in a_lens]
    return ul.PromptSet.from_tokens(ptoks, atoks)


@dataclass
class Timing:
    """Best wall-clock and process CPU seconds over repeated runs.

    On a shared machine the wall clock also counts time spent waiting for a core; the CPU time
    of this process does not, so both are reported and the ratios of both are printed.
    """

    wall: float = float("inf")
    cpu: float = float("inf")

    def ratio(self, faster: "Timing") -> str:
        return f"{self.wall / faster.wall:.2f}x wall, {self.cpu / faster.cpu:.2f}x CPU"


def best_of(fn: Callable[[], object], repeats: int = 3) -> tuple[Timing, object]:
    """Best wall and CPU times of ``repeats`` runs (and the last result)."""
    timing, out = Timing(), None
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        out = fn()
        timing.wall = min(timing.wall, time.perf_counter() - w)
        timing.cpu = min(timing.cpu, time.process_time() - c)
    return timing, out


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, in MiB."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
