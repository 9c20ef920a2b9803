"""Quantize a HuggingFace BERT built from a config (random weights, nothing downloaded) with
pypaper.quant.quantize_ and compare its output and latency with fp32.

    python examples/quantize_bert.py [--hidden 256] [--layers 4] [--tokens 128]

Every nn.Linear of the encoder (Q, K, V, attention output, both FFN layers) and the pooler is
swapped; embeddings, LayerNorms and attention stay fp32. Reports the relative L2 error of
last_hidden_state and the median forward time.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from pypaper.quant import (Int4WeightOnlyConfig, Int8DynamicConfig, Int8WeightOnlyConfig,
                           model_bytes, quantize_)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=1000, hidden_size=args.hidden, num_hidden_layers=args.layers,
                     num_attention_heads=max(1, args.hidden // 64), intermediate_size=4 * args.hidden,
                     max_position_embeddings=max(512, args.tokens))
    model = BertModel(cfg).eval()
    ids = torch.randint(0, 1000, (1, args.tokens))
    with torch.no_grad():
        ref = model(input_ids=ids).last_hidden_state

    def timed(m):
        with torch.no_grad():
            m(input_ids=ids)
            ts = []
            for _ in range(20):
                t0 = time.perf_counter()
                m(input_ids=ids)
                ts.append(time.perf_counter() - t0)
        return 1e3 * statistics.median(ts)

    print("| model | rel. L2 error of last_hidden_state | bytes | forward ms |")
    print("|---|---:|---:|---:|")
    print(f"| fp32 | 0 | {model_bytes(model):,} | {timed(model):.2f} |")
    for name, qcfg in [("int8 dynamic", Int8DynamicConfig()), ("int8 weight-only", Int8WeightOnlyConfig()),
                       ("int4 weight-only g64", Int4WeightOnlyConfig(64))]:
        q = quantize_(copy.deepcopy(model), qcfg)
        with torch.no_grad():
            out = q(input_ids=ids).last_hidden_state
        rel = float((out - ref).norm() / ref.norm())
        print(f"| {name} | {rel:.4f} | {model_bytes(q):,} | {timed(q):.2f} |")


if __name__ == "__main__":
    main()
