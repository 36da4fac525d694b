"""Train a small GPT-2 (Hugging Face transformers, built from a config: no download).

    python examples/train_gpt2.py [--steps 3] [--layers 2] [--d-model 128] [--seq 64]
    memprof run --steps 2 examples/train_gpt2.py --layers 4

Language-model training on random tokens with AdamW. The token embedding is tied to the LM head
(one storage, counted once); attention and MLP activations dominate as the sequence grows.
"""

from __future__ import annotations

import argparse

import torch
from transformers import GPT2Config, GPT2LMHeadModel


def main() -> None:
    parser = argparse.ArgumentParser(description="Train a small GPT-2 on random tokens.")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=1000)
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=args.layers, n_embd=args.d_model, n_head=args.heads, vocab_size=args.vocab,
        n_positions=max(args.seq, 64), bos_token_id=0, eos_token_id=0,
    )
    model = GPT2LMHeadModel(config).to(device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    for step in range(args.steps):
        tokens = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        print(f"step {step}: loss {loss.item():.4f}")


if __name__ == "__main__":
    main()
