"""Spectral-tracking overhead as a fraction of training time, measured side by side.

Trains the same small LM twice per repetition, with and without a SpectralTracker at the
default interval, alternating the order, and prints the median time ratio. Usage::

    python benchmarks/tracking_overhead.py [--preset tiny] [--steps 300] [--every 50] [--reps 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import nerve_interp as ni
from nerve_interp import data, models
from nerve_interp.tracking import SpectralTracker
from nerve_interp.training import TrainConfig, train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--every", type=int, default=50)
    p.add_argument("--eval-blocks", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    a = p.parse_args()
    tok = data.train_tokenizer(vocab_size=2048)
    # seed=None: the blocks of earlier runs, so timings stay comparable
    train_blocks = data.token_blocks(ni.load_corpus(split="train", seed=None), tok, a.seq_len)
    val_blocks = data.token_blocks(ni.load_corpus(split="heldout", seed=None), tok, a.seq_len)
    cfg = TrainConfig(steps=a.steps, batch_size=16, warmup=a.steps // 10, eval_every=a.every)
    times: dict[str, list[float]] = {"plain": [], "tracked": []}
    measure_s = []
    for rep in range(a.reps):
        order = ["plain", "tracked"] if rep % 2 == 0 else ["tracked", "plain"]
        for variant in order:
            model = models.make_lm(a.preset, vocab_size=len(tok), max_seq_len=a.seq_len)
            cbs = ([SpectralTracker([val_blocks[: a.eval_blocks]], every=a.every)]
                   if variant == "tracked" else [])
            t = time.perf_counter()
            train(model, train_blocks, val_blocks, cfg, callbacks=cbs, progress=False)
            times[variant].append(time.perf_counter() - t)
            if cbs:
                measure_s.append(cbs[0].seconds)
    plain, tracked = statistics.median(times["plain"]), statistics.median(times["tracked"])
    n_meas = a.steps // a.every + 2
    print(f"model {a.preset}, {a.steps} steps, tracker every {a.every} steps ({n_meas} "
          f"measurements of {a.eval_blocks * a.seq_len} tokens), torch threads "
          f"{torch.get_num_threads()}, {a.reps} reps (medians)")
    print(f"  train without tracker  {plain:7.2f} s")
    print(f"  train with tracker     {tracked:7.2f} s")
    print(f"  overhead (tracked / plain - 1)          {tracked / plain - 1:6.1%}")
    print(f"  tracker's own time / plain training     {statistics.median(measure_s) / plain:6.1%}")


if __name__ == "__main__":
    main()
