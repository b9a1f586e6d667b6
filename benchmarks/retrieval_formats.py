"""Pass-key prompt formats on SmolLM2-135M-Instruct: how many of the eval's retrieval cases
(same lengths, depths and keys) each format lets the model answer, with full precision or a cache.

This is how the format of ``xquant_fx.evaluate``'s retrieval was chosen: a format the
full-precision model fails cannot tell caches apart, and one that a quantized cache passes as
easily tells them apart no better. Without ``--config``, formats are scored on the plain model:
those that start the answer (``... The pass key is``) teacher-forced in one forward (a hit when
the argmax at each key position is the key's token, which is what greedy decoding of the key
requires), ``chat-question`` (the eval's earlier format: chat template, ``What is the pass
key?``, the key said twice) by 12 greedy tokens that must contain the key. With ``--config SPEC``
the answer-starting formats run as the eval runs them (``evaluate.retrieval``, decode steps
through the XQuantCache).

    python benchmarks/retrieval_formats.py [--formats eval,key-twice,...] [--config kivi-2]

About 2 CPU-minutes per format at the default lengths, 3-4 with a quantized ``--config``.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import time

import torch

from xquant_fx import XQuantConfig, evaluate, smollm2

_CHAT_HEAD = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
              "<|im_start|>user\n")


def _corpus_sentences(count: int = 3000) -> tuple[str, ...]:
    text = re.sub(r"\s+", " ", evaluate.default_corpus())
    return tuple(s.strip() for s in re.split(r"(?<=[.!?]) ", text) if not re.search(r"\d", s))[:count]


_TWICE = " The pass key is {key}. Remember it. {key} is the pass key."

# name -> overrides of evaluate.RETRIEVAL_* (and "generate": free answer after a chat question)
FORMATS = {
    "eval": {},  # the eval's format: plain text, the key said once, the answer started
    "key-twice": {"NEEDLE": _TWICE},
    "chat-answer": {"INTRO": _CHAT_HEAD + evaluate.RETRIEVAL_INTRO,
                    "QUESTION": "\n\nWhat is the pass key?<|im_end|>\n<|im_start|>assistant\nThe pass key is"},
    "corpus-filler": {"FILLER": None},  # natural text: sentences of the eval corpus without digits
    "corpus-filler-key-twice": {"FILLER": None, "NEEDLE": _TWICE},
    "chat-question": {"INTRO": _CHAT_HEAD + evaluate.RETRIEVAL_INTRO, "NEEDLE": _TWICE,
                      "QUESTION": "\n\nWhat is the pass key?<|im_end|>\n<|im_start|>assistant\n", "generate": 12},
}


@contextlib.contextmanager
def _format(overrides: dict):
    saved = {name: getattr(evaluate, "RETRIEVAL_" + name) for name in overrides if name != "generate"}
    for name, value in overrides.items():
        if name == "FILLER" and value is None:
            value = _corpus_sentences()
        if name != "generate":
            setattr(evaluate, "RETRIEVAL_" + name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(evaluate, "RETRIEVAL_" + name, value)


def _hits(model, tokenizer, cases, generate: int | None) -> list[bool]:
    hits = []
    for length in sorted({c.length for c in cases}):
        group = [c for c in cases if c.length == length]
        with torch.no_grad():
            if generate:  # the prompt ends before the answer: generate and look for the key
                question = evaluate._token_ids(tokenizer, evaluate.RETRIEVAL_QUESTION)
                ends = [c.needle_start + c.needle_len + c.filler_len - c.filler_before for c in group]
                prompts = torch.tensor([list(c.prompt[:end]) + question for c, end in zip(group, ends)])
                out = model.generate(prompts, max_new_tokens=generate, do_sample=False,
                                     attention_mask=torch.ones_like(prompts))
                hits += [c.key in tokenizer.decode(o[prompts.shape[1]:]) for c, o in zip(group, out)]
            else:
                ids = torch.tensor([c.prompt + c.answer[:-1] for c in group])
                pred = model(ids, logits_to_keep=len(group[0].answer)).logits.argmax(-1)
                hits += [pred[i].tolist() == list(c.answer) for i, c in enumerate(group)]
    return hits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--lengths", nargs="+", type=int, default=list(evaluate.RETRIEVAL_LENGTHS))
    parser.add_argument("--config", default=None, metavar="SPEC",
                        help="score through this cache config as the eval does (formats that start the answer)")
    args = parser.parse_args()
    model, tokenizer = smollm2.load(torch.float32)
    for name in args.formats.split(","):
        overrides = FORMATS[name]
        if args.config and overrides.get("generate"):
            print(f"{name:14s} skipped: --config scores formats that start the answer only")
            continue
        start = time.process_time()
        with _format(overrides):
            cases = evaluate.retrieval_cases(tokenizer, args.lengths)
            if args.config:
                hits = evaluate.retrieval(model, cases, XQuantConfig.from_spec(args.config))
            else:
                hits = _hits(model, tokenizer, cases, overrides.get("generate"))
        per_length = {n: "".join("x" if h else "." for c, h in zip(cases, hits) if c.length == n) for n in args.lengths}
        seconds = time.process_time() - start
        print(f"{name:24s} {args.config or 'plain model'}: {sum(hits)}/{len(hits)}  {per_length}  ({seconds:.0f} CPU-s)",
              flush=True)


if __name__ == "__main__":
    main()
