"""Cost of the remote capture path (``remote="local"``) vs the normal in-process capture.

Run::

    python benchmarks/remote_overhead.py             # tiny GPT-2 (D = 128), 8 batches, 5 reps
    python benchmarks/remote_overhead.py --d-model 256 --reps 3

Measured (2 shared CPU cores, 1 torch thread, defaults): local 94 ms, remote="local" 149 ms,
i.e. +7 ms per batch for serialising and deserialising the trace; eigenvalues identical.

``remote="local"`` does everything a real NDIF request does on the client *and* the server
except the network: it serialises the trace body, deserialises it with every local module
hidden, runs it, and the per-batch ``(n, mean, centred scatter)`` are merged here. Both
variants see the same batches of the same ``nnsight.TransformersModel`` in the same process,
repetitions interleaved; medians are printed, and the script checks that both give the same
eigenvalues (≤ 1e-10 relative) so it cannot silently time something else.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import transformers as T
from nnsight import TransformersModel
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import nerve_interp as ni


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-model", type=int, default=32)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: stable timings on a shared machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    vocab = 97
    torch.manual_seed(0)
    hf = T.GPT2LMHeadModel(T.GPT2Config(n_layer=args.layers, n_embd=args.d_model, n_head=4,
                                        vocab_size=vocab, bos_token_id=0, eos_token_id=0)).eval()
    tk = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w1"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="w1", pad_token="w0",
                                  eos_token="w0")
    model = TransformersModel(hf, tokenizer=tok)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(1, vocab, (args.batch_size, args.seq), generator=g)
               for _ in range(args.batches)]

    variants = {"local": None, "remote='local'": "local"}
    times: dict[str, list[float]] = {k: [] for k in variants}
    results = {}
    for name, remote in variants.items():  # warm-up (nnsight parses each trace's source once)
        results[name] = ni.collect_spectra(model, batches, progress=False, remote=remote)
    for _ in range(args.reps):
        for name, remote in variants.items():
            t0 = time.perf_counter()
            ni.collect_spectra(model, batches, progress=False, remote=remote)
            times[name].append(time.perf_counter() - t0)

    a, b = results["local"], results["remote='local'"]
    worst = max(float(np.max(np.abs(a.eigenvalues(l, p) - b.eigenvalues(l, p)))
                      / a.eigenvalues(l, p)[0]) for l in a.layers for p in a.points)
    assert worst <= 1e-10, worst
    d_ff = 4 * args.d_model
    print(f"GPT-2 {args.layers} layers, d_model {args.d_model} (D = {d_ff}), "
          f"{args.batches} batches × {args.batch_size} × {args.seq} tokens, "
          f"{2 * args.layers} points; median of {args.reps}")
    base = statistics.median(times["local"])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name:<16} {med * 1e3:8.1f} ms  ({med / base:.2f}× local, "
              f"{(med - base) / args.batches * 1e3:+.1f} ms per batch)")
    print(f"  max |Δλ| / λ_1 = {worst:.1e}; statistics returned per batch: "
          f"{2 * args.layers * (8 * d_ff * d_ff + 8 * d_ff) / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
