"""One resident model per pair: memory and time of a sweep with the source off the target's device.

The study's coefficient sweep (``patch_mlp_coefficients``, window 5, every layer, KRS) on a
LLaMA-shaped pair built from config (random weights and a perturbed copy as the "unlearned"
model), run twice in the same process:

* both resident: source and target on the target's device;
* source offloaded: only the target on it; the engine runs the source's clean pass block by
  block there, one block's weights copied at a time, and streams its unembedding a slice at a
  time (:mod:`unlearnlens._offload`).

Peak memory on the target's device, as a multiple of one model's bytes (parameters and
buffers); goal <= 1.15x with the source offloaded.

* On a GPU (``--device cuda``): the source lives on the CPU and the target on the GPU; the
  peak is ``torch.cuda.max_memory_allocated`` over the sweep.
* On the CPU (the default, for machines without a GPU): both models live in host memory, so
  the offloaded run takes the same block-by-block path with :func:`unlearnlens._offload.forced`
  (each block is copied, as it would be to another device) and the target's device is counted
  by tensor accounting: a ``TorchDispatchMode`` sees every tensor each operation returns,
  counts the bytes of each new storage (outputs that share an input's storage are views or
  in-place results and add nothing) until Python's weak-reference finaliser reports the storage
  freed, and keeps the peak. The peak of those live bytes plus the bytes of the models resident
  on the target (the target alone, or target and source) is the figure, the CPU analogue of
  ``max_memory_allocated``. Allocator caching and the kernels' internal scratch space are not
  counted on either side.

Time is the best of ``--repeats`` runs of each (not under the accounting mode), interleaved,
after one untimed warm-up run.
Run: ``python benchmarks/bench_offload.py [--size small|1b] [--device cpu|cuda]
[--dtype float32|bfloat16] [--batch-size N] [--repeats N] [--threads T]``.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import weakref
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformer_lens import HookedTransformer, HookedTransformerConfig

sys.path.insert(0, str(Path(__file__).parent))
from _common import Timing, best_of, model_pair

import unlearnlens as ul
from unlearnlens import _offload
from unlearnlens.patching import patch_mlp_coefficients

MIB = 2**20
WINDOW = 5

SIZES = {
    # TinyLlama-1.1B's shape: 22 layers, d_model 2048, grouped-query attention (4 KV heads).
    "1b": dict(n_layers=22, d_model=2048, n_heads=32, n_key_value_heads=4, d_mlp=5632),
    # The same proportions at a quarter of the width: 0.2B parameters, for 2-core machines.
    "small": dict(n_layers=12, d_model=1024, n_heads=16, n_key_value_heads=4, d_mlp=2816),
}


def llama_pair(
    size: str, dtype: torch.dtype, seed: int = 0, noise: float = 0.02
) -> tuple[HookedTransformer, HookedTransformer]:
    """A LLaMA-shaped random model on the CPU (RMSNorm, rotary, gated SiLU MLP) and a copy."""
    cfg = HookedTransformerConfig(
        d_head=64,
        d_vocab=32000,
        n_ctx=512,
        act_fn="silu",
        normalization_type="RMS",
        positional_embedding_type="rotary",
        rotary_dim=64,
        gated_mlp=True,
        final_rms=True,
        dtype=dtype,
        seed=seed,
        device="cpu",
        **SIZES[size],
    )
    return model_pair(cfg, seed, noise)


def random_prompts(n: int, prompt_len: int, answer_len: int, seed: int = 0) -> ul.PromptSet:
    gen = torch.Generator().manual_seed(seed)
    p_lens = [prompt_len - 3 + (i % 5) for i in range(n)]
    ptoks = [torch.randint(0, 32000, (k,), generator=gen) for k in p_lens]
    atoks = [torch.randint(0, 32000, (answer_len,), generator=gen) for _ in range(n)]
    return ul.PromptSet.from_tokens(ptoks, atoks)


def nbytes(model: torch.nn.Module) -> int:
    """Bytes of a model's parameters and buffers."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages created on one device while active; ``peak`` is the most."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        seen = {
            id(t.untyped_storage())
            for t in tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor) and t.device.type != "meta"
        }
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device != self.device:
                continue
            storage = t.untyped_storage()
            key = id(storage)
            if key in seen or key in self.live:
                continue  # a view or an in-place result: no new memory
            self.live[key] = storage.nbytes()
            self.current += self.live[key]
            weakref.finalize(storage, self._free, key)
        self.peak = max(self.peak, self.current)
        return out


def peak_bytes(fn: Callable[[], object], device: torch.device, resident: int) -> int:
    """Peak bytes on ``device`` while ``fn`` runs, ``resident`` bytes of models already there."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    with LiveBytes(device) as live:
        fn()
    return resident + live.peak


def main(
    size: str = "small",
    device: str = "cpu",
    dtype: str = "float32",
    batch_size: int | None = 64,
    n_prompts: int = 16,
    repeats: int = 1,
) -> dict[str, float]:
    torch.manual_seed(0)
    dev = torch.device(device)
    t0 = time.perf_counter()
    base, unlearned = llama_pair(size, getattr(torch, dtype))
    unlearned = unlearned.to(dev, print_details=False)
    ps = random_prompts(n_prompts, 20, 3, seed=1)
    model_bytes = nbytes(unlearned)
    n_params = sum(p.numel() for p in unlearned.parameters())
    block_bytes = nbytes(unlearned.blocks[0])
    print(
        f"LLaMA-shaped {size}: {n_params / 1e9:.2f}B parameters, {model_bytes / MIB:.0f} MiB "
        f"per model in {dtype} ({block_bytes / MIB:.0f} MiB per block); {len(ps)} prompts of "
        f"{ps.seq_len} tokens at most; batch_size {batch_size}; device {device}; torch threads "
        f"{torch.get_num_threads()}; built in {time.perf_counter() - t0:.0f}s"
    )

    def sweep(source: HookedTransformer) -> ul.SweepResult:
        return patch_mlp_coefficients(
            source, unlearned, ps, window=WINDOW, batch_size=batch_size, progress=False
        )

    if dev.type == "cuda":  # the real thing: the source stays on the CPU
        base_here = copy.deepcopy(base).to(dev, print_details=False)

        def resident() -> ul.SweepResult:
            return sweep(base_here)

        def offloaded() -> ul.SweepResult:
            return sweep(base)

        def sync(fn: Callable[[], ul.SweepResult]) -> Callable[[], ul.SweepResult]:
            def run() -> ul.SweepResult:
                out = fn()
                torch.cuda.synchronize()
                return out

            return run

        resident, offloaded = sync(resident), sync(offloaded)
    else:  # one device: the same path, forced, with every block copied

        def resident() -> ul.SweepResult:
            return sweep(base)

        def offloaded() -> ul.SweepResult:
            with _offload.forced():
                return sweep(base)

    resident()  # warm-up (allocator, lazy imports); not timed
    t_res, t_off = Timing(), Timing()
    for _ in range(repeats):  # interleaved, so that both see the same machine
        for timing, fn in ((t_res, resident), (t_off, offloaded)):
            t, out = best_of(fn, 1)
            timing.wall, timing.cpu = min(timing.wall, t.wall), min(timing.cpu, t.cpu)
            if fn is resident:
                res_resident = out
            else:
                res_offloaded = out
    diff = float((res_resident.scores - res_offloaded.scores).abs().max())

    peak_res = peak_bytes(resident, dev, 2 * model_bytes)
    peak_off = peak_bytes(offloaded, dev, model_bytes)
    method = "torch.cuda.max_memory_allocated" if dev.type == "cuda" else "tensor accounting"
    print(
        f"sweep (mlp.hook_post, window {WINDOW}, {unlearned.cfg.n_layers} layers, KRS): both "
        f"resident {t_res.wall:.1f}s, source offloaded {t_off.wall:.1f}s -> time overhead "
        f"{t_off.ratio(t_res)} (max |diff| {diff:.1e})"
    )
    print(
        f"peak on {device} ({method}): both resident {peak_res / MIB:.0f} MiB = "
        f"{peak_res / model_bytes:.3f}x one model; source offloaded {peak_off / MIB:.0f} MiB = "
        f"{peak_off / model_bytes:.3f}x one model (goal <= 1.15x)"
    )
    print(
        f"above the models resident: both resident +{(peak_res - 2 * model_bytes) / MIB:.0f} "
        f"MiB, source offloaded +{(peak_off - model_bytes) / MIB:.0f} MiB (the sweep's "
        f"activations and caches; one block of weights is {block_bytes / MIB:.0f} MiB)"
    )
    return {
        "peak_resident_x": peak_res / model_bytes,
        "peak_offloaded_x": peak_off / model_bytes,
        "time_overhead_wall": t_off.wall / t_res.wall,
        "time_overhead_cpu": t_off.cpu / t_res.cpu,
        "max_abs_diff": diff,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--device", default="cpu", help="the target's device: cpu or cuda")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument(
        "--batch-size", type=int, default=64, help="rows per pass (0: the engine's default)"
    )
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs of each")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    main(args.size, args.device, args.dtype, args.batch_size or None, args.prompts, args.repeats)
