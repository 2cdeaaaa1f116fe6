"""Restoration speed and memory against the straightforward way, measured in the same run.

The study's sweep: restore the base model's ``mlp.W_out`` into the unlearned model over a
window of 5 layers around every layer, score KRS.

* unlearnlens: ``restore_sweep`` swaps one window's tensors in place, starts each run from the
  unlearned model's cached residual stream at the window's lowest layer, and unembeds only the
  answer-predicting positions;
* straightforward: per window, ``copy.deepcopy`` the unlearned model, ``load_state_dict`` the
  window's weights from the base, run a full forward pass, KRS from the full logits.

Target: at least 3x faster, and a peak memory of no more than the two models plus one window's
weights plus activations. Memory is the process's resident set size (RSS), sampled every few
milliseconds by a thread while each approach runs, above the RSS with both models loaded
(``tracemalloc`` does not see torch's CPU allocations). Ours runs first, so its peak cannot hide
under the other's. Run: ``python benchmarks/bench_restoration.py [--repeats N] [--threads T]``.
"""

from __future__ import annotations

import argparse
import copy
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import Timing, best_of, gpt2_small_pair, prompts

from unlearnlens.metrics import krs
from unlearnlens.restoration import restore_sweep

MIB = 2**20
WINDOW = 5


class PeakRSS:
    """Samples this process's RSS in a thread; ``peak`` is the highest value seen, in bytes."""

    def __init__(self, interval: float = 0.002) -> None:
        self._proc = psutil.Process()
        self._interval = interval
        self._stop = threading.Event()
        self.peak = 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(self._interval)

    def __enter__(self) -> PeakRSS:
        self.peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def measure(fn: Callable[[], object], repeats: int) -> tuple[Timing, int, object]:
    """Best wall and CPU times over ``repeats`` runs, peak RSS over all of them, the last result."""
    with PeakRSS() as rss:
        timing, out = best_of(fn, repeats)
    return timing, rss.peak, out


def nbytes(tensors: object) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)  # type: ignore[attr-defined]


def main(repeats: int = 1) -> dict[str, float]:
    torch.manual_seed(0)
    base, unlearned = gpt2_small_pair()
    ps = prompts(equal=False, seed=1)
    n = base.cfg.n_layers
    windows = [list(range(max(0, c - WINDOW // 2), min(n, c + WINDOW // 2 + 1))) for c in range(n)]

    def ours():
        return restore_sweep(
            base, unlearned, ps, components="mlp.W_out", window=WINDOW, progress=False
        )

    def straightforward():
        with torch.no_grad():
            tokens, mask = ps.tokens, ps.attention_mask
            tp = ps.target_positions[..., None].expand(-1, -1, base.cfg.d_vocab)
            zs = base(tokens, attention_mask=mask).gather(1, tp)
            zt = unlearned(tokens, attention_mask=mask).gather(1, tp)
            base_state = base.state_dict()
            out = []
            for layers in windows:
                model = copy.deepcopy(unlearned)
                model.load_state_dict(
                    {
                        f"blocks.{layer}.mlp.W_out": base_state[f"blocks.{layer}.mlp.W_out"]
                        for layer in layers
                    },
                    strict=False,
                )
                z = model(tokens, attention_mask=mask).gather(1, tp)
                out.append(krs(z, ps, source_logits=zs, target_logits=zt).nanmean())
                del model
            return torch.stack(out)

    model_bytes = nbytes(base.parameters()) + nbytes(unlearned.parameters())
    window_bytes = nbytes(unlearned.blocks[layer].mlp.W_out for layer in range(WINDOW))
    start_rss = psutil.Process().memory_info().rss

    ours()  # warm-up (allocator, lazy imports); not timed
    t_ours, peak_ours, res = measure(ours, repeats)
    t_plain, peak_plain, ref = measure(straightforward, repeats)

    diff = float((ref - res.scores).abs().max())
    ratio = t_plain.wall / t_ours.wall
    extra_ours = (peak_ours - start_rss) / MIB
    extra_plain = (peak_plain - start_rss) / MIB
    print(
        f"models: {len(ps)} prompts of {ps.seq_len} tokens at most, GPT-2-small shape; "
        f"torch threads: {torch.get_num_threads()}"
    )
    print(
        f"study sweep (mlp.W_out, window {WINDOW}, {n} layers, KRS): straightforward "
        f"{t_plain.wall:.2f}s, unlearnlens {t_ours.wall:.2f}s -> {t_plain.ratio(t_ours)} faster "
        f"(max |diff| {diff:.1e})"
    )
    print(f"KRS per window centre: {[round(v, 4) for v in res.scores.tolist()]}")
    print(
        f"memory: two models {model_bytes / MIB:.0f} MiB in parameters, one window of W_out "
        f"{window_bytes / MIB:.0f} MiB; RSS with both models loaded {start_rss / MIB:.0f} MiB"
    )
    print(
        f"peak RSS above that: unlearnlens +{extra_ours:.0f} MiB, straightforward "
        f"+{extra_plain:.0f} MiB"
    )
    return {
        "ratio": ratio,
        "max_abs_diff": diff,
        "cpu_ratio": t_plain.cpu / t_ours.cpu,
        "ours_s": t_ours.wall,
        "straightforward_s": t_plain.wall,
        "ours_extra_mib": extra_ours,
        "straightforward_extra_mib": extra_plain,
        "window_mib": window_bytes / MIB,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1, help="timed runs of each approach")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: on a shared machine more threads mostly wait)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    main(args.repeats)
