"""Text or jsonl -> Megatron-format `.bin`/`.idx`, one document per sequence.

    python -m exp.data.preprocess --input corpus.jsonl --output-prefix data/corpus
    python -m exp.data.preprocess --input book.txt notes.txt --output-prefix data/books \\
        --text-split blank-line
    python -m exp.data.preprocess --input c.jsonl --output-prefix data/c \\
        --tokenizer hf --tokenizer-name-or-path gpt2

Writes `{output_prefix}_{key}_document.bin/.idx` per json key (the key is `text` for text input),
the names Megatron's preprocessing writes. The default tokenizer needs nothing downloaded: it maps
each UTF-8 byte to its value (0..255) and uses 256 as the end-of-document token. A Hugging Face
tokenizer (`--tokenizer hf`, needs `transformers`) uses its own ids and its eos token.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from exp.data.indexed_dataset import (
    DTYPE_CODES,
    IndexedDatasetBuilder,
    data_file_path,
    index_file_path,
    optimal_dtype,
)


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255; 256 ends a document. Vocabulary size 257."""

    name = "byte"
    vocab_size = 257
    eod = 256

    def tokenize(self, text: str) -> List[int]:
        return list(text.encode("utf-8"))

    def detokenize(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face tokenizer by name or local path; its eos token ends a document."""

    name = "hf"

    def __init__(self, name_or_path: str):
        try:
            from transformers import AutoTokenizer
        except ImportError as e:
            raise ImportError(
                "--tokenizer hf needs the `transformers` package (pip install transformers); "
                "the default --tokenizer byte needs nothing"
            ) from e
        self._tok = AutoTokenizer.from_pretrained(name_or_path)
        if self._tok.eos_token_id is None:
            raise ValueError(f"tokenizer {name_or_path!r} has no eos token to end documents with")
        self.vocab_size = len(self._tok)
        self.eod = int(self._tok.eos_token_id)

    def tokenize(self, text: str) -> List[int]:
        return self._tok(text, add_special_tokens=False)["input_ids"]

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids))


def build_tokenizer(kind: str = "byte", name_or_path: Optional[str] = None):
    """`kind` 'byte' (offline, the default) or 'hf' (needs `name_or_path`)."""
    if kind == "byte":
        return ByteTokenizer()
    if kind == "hf":
        if not name_or_path:
            raise ValueError("tokenizer: 'hf' needs --tokenizer-name-or-path")
        return HFTokenizer(name_or_path)
    raise ValueError(f"tokenizer: expected 'byte' or 'hf', got {kind!r}")


def _input_format(path: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    return "jsonl" if path.endswith((".jsonl", ".json")) else "text"


def iter_documents(
    paths: Sequence[str], keys: Sequence[str], fmt: str = "auto", text_split: str = "blank-line"
) -> Iterator[Dict[str, str]]:
    """Yields one {key: text} per document of the inputs.

    jsonl: one json object per line, every key in `keys` a string. text: key 'text'; documents
    are whole files ('file'), paragraphs between blank lines ('blank-line') or lines ('line').
    Raises ValueError naming the file and line of malformed input.
    """
    if text_split not in ("file", "blank-line", "line"):
        raise ValueError(f"text_split: expected 'file', 'blank-line' or 'line', got {text_split!r}")
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: input file not found")
        kind = _input_format(path, fmt)
        if kind == "jsonl":
            with open(path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{lineno}: not valid json ({e.msg})") from None
                    if not isinstance(obj, dict):
                        raise ValueError(f"{path}:{lineno}: expected a json object, got {type(obj).__name__}")
                    doc = {}
                    for k in keys:
                        if k not in obj:
                            raise ValueError(f"{path}:{lineno}: no key {k!r} (keys: {sorted(obj)})")
                        if not isinstance(obj[k], str):
                            raise ValueError(f"{path}:{lineno}: key {k!r} is not a string")
                        doc[k] = obj[k]
                    yield doc
        elif kind == "text":
            with open(path, encoding="utf-8") as f:
                text = f.read()
            if text_split == "file":
                parts = [text]
            elif text_split == "line":
                parts = text.splitlines()
            else:
                parts, cur = [], []
                for line in text.splitlines(keepends=True):
                    if line.strip():
                        cur.append(line)
                    elif cur:
                        parts.append("".join(cur))
                        cur = []
                if cur:
                    parts.append("".join(cur))
            for part in parts:
                yield {"text": part}
        else:
            raise ValueError(f"input_format: expected 'auto', 'jsonl' or 'text', got {fmt!r}")


def preprocess(
    inputs: Sequence[str],
    output_prefix: str,
    tokenizer=None,
    json_keys: Sequence[str] = ("text",),
    input_format: str = "auto",
    text_split: str = "blank-line",
    append_eod: bool = True,
    dtype=None,
) -> Dict[str, Tuple[str, int, int]]:
    """Tokenizes `inputs` into one indexed dataset per key.

    Returns {key: (path_prefix, documents, tokens)}. Documents with no tokens are skipped.
    `dtype` defaults to the smallest that holds the vocabulary (uint16 below 65500 ids).
    """
    tokenizer = tokenizer or ByteTokenizer()
    if not inputs:
        raise ValueError("inputs: expected at least one input file")
    formats = {_input_format(p, input_format) for p in inputs}
    keys = list(json_keys) if "jsonl" in formats else ["text"]
    if "jsonl" in formats and "text" in formats and keys != ["text"]:
        raise ValueError("inputs: mixing text and jsonl inputs needs json_keys=('text',)")
    dtype = np.dtype(dtype or optimal_dtype(tokenizer.vocab_size))
    if dtype.type not in DTYPE_CODES.values() or dtype.kind not in "iu":
        raise ValueError(f"dtype: expected an integer dtype Megatron defines, got {dtype}")
    if tokenizer.vocab_size - 1 > np.iinfo(dtype).max:
        raise ValueError(f"dtype: {dtype} cannot hold the {tokenizer.vocab_size} token ids")
    out_dir = os.path.dirname(output_prefix)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)

    prefixes = {k: f"{output_prefix}_{k}_document" for k in keys}
    builders = {k: IndexedDatasetBuilder(data_file_path(p), dtype=dtype) for k, p in prefixes.items()}
    counts = {k: [0, 0] for k in keys}
    try:
        for doc in iter_documents(inputs, keys, input_format, text_split):
            for k in keys:
                ids = tokenizer.tokenize(doc[k])
                if append_eod and ids:
                    ids.append(tokenizer.eod)
                if not ids:
                    continue
                builders[k].add_item(np.asarray(ids, dtype=np.int64))
                builders[k].end_document()
                counts[k][0] += 1
                counts[k][1] += len(ids)
    finally:
        for k, b in builders.items():
            b.finalize(index_file_path(prefixes[k]))
    return {k: (prefixes[k], counts[k][0], counts[k][1]) for k in keys}


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", nargs="+", required=True, help="text or jsonl files")
    p.add_argument("--output-prefix", required=True)
    p.add_argument("--json-keys", nargs="+", default=["text"])
    p.add_argument("--input-format", choices=["auto", "jsonl", "text"], default="auto",
                   help="auto: .jsonl/.json are jsonl, anything else text")
    p.add_argument("--text-split", choices=["file", "blank-line", "line"], default="blank-line",
                   help="what one document is in text input")
    p.add_argument("--tokenizer", choices=["byte", "hf"], default="byte")
    p.add_argument("--tokenizer-name-or-path", default=None)
    p.add_argument("--append-eod", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--dtype", default=None, choices=[np.dtype(t).name for t in DTYPE_CODES.values()
                                                    if np.dtype(t).kind in "iu"])
    args = p.parse_args(argv)
    try:
        tok = build_tokenizer(args.tokenizer, args.tokenizer_name_or_path)
        out = preprocess(args.input, args.output_prefix, tok, args.json_keys, args.input_format,
                         args.text_split, args.append_eod, args.dtype)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for key, (prefix, docs, tokens) in out.items():
        print(f"{key}: {docs} documents, {tokens} tokens -> {prefix}.bin/.idx")
    return 0


if __name__ == "__main__":
    sys.exit(main())
