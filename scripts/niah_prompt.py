#!/usr/bin/env python3
"""Writes a needle-in-a-haystack prompt of about N tokens for `asynctls generate`.

The haystack is the Paul Graham essays (`asynctls pull paul-graham-essays`),
the needle one sentence with a 7-digit number at a fractional depth, and the
question last, as RULER's niah_single_2 words it. Tokens are counted with the
model's own tokenizer.json (the `tokenizers` package, 0.21.0), so the prompt
fits the model's context.

    python3 scripts/niah_prompt.py --tokenizer DIR/tokenizer.json \
        --essays ~/.cache/asynctls/data/paul-graham-essays/text.txt \
        --tokens 30000 --depth 0.5 --out niah-30k.txt
"""
import argparse
import random

from tokenizers import Tokenizer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--essays", required=True)
    ap.add_argument("--tokens", type=int, default=30000)
    ap.add_argument("--depth", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    tok = Tokenizer.from_file(args.tokenizer)
    rng = random.Random(args.seed)
    key = rng.choice(["harbor", "lantern", "orchid", "granite", "meadow"])
    value = str(rng.randrange(1_000_000, 10_000_000))
    needle = f" One of the special magic numbers for {key} is: {value}. "
    head = "Some special magic numbers are hidden within the following text. Make sure to memorize it. I will quiz you about the numbers afterwards.\n"
    tail = f"\nWhat is the special magic number for {key} mentioned in the provided text? The special magic number for {key} mentioned in the provided text is"
    sentences = open(args.essays, encoding="utf-8").read().replace("\n", " ").split(". ")
    fixed = len(tok.encode(head + needle + tail).ids)
    hay, count = [], 0
    for s in sentences:
        n = len(tok.encode(s + ". ").ids)
        if fixed + count + n > args.tokens:
            break
        hay.append(s + ". ")
        count += n
    at = int(len(hay) * args.depth)
    text = head + "".join(hay[:at]) + needle + "".join(hay[at:]) + tail
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"{args.out}: {len(tok.encode(text).ids)} tokens, needle {key} = {value} at depth {args.depth}")


if __name__ == "__main__":
    main()
