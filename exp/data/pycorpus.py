"""A byte-level corpus from the Python sources a machine already has.

    python -m exp.data.pycorpus OUT_PREFIX [--scope installed|stdlib] [--seed N] [--min-tokens N]

Every machine that runs this package has a Python installation and the packages it needs (torch,
triton, numpy, ...), and their `.py` files are a large body of real code. This tool walks them,
drops files whose contents repeat (vendored copies, reinstalled packages), lays the files out in a
seeded order, one document each, and writes a Megatron-format dataset (`.bin`/`.idx`, byte tokens,
`ByteTokenizer`: ids 0..255, 256 ends a document).

`--scope stdlib` reads the standard library only (tens of MB); `--scope installed` (the default)
adds every site-packages directory of the running interpreter (hundreds of MB where torch is
installed), enough for a run of several minutes on one GPU not to see a byte twice. The corpus
depends on what is installed: its SHA-256 (over the relative paths and contents, in order) is
printed so two runs can tell whether they trained on the same data.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import site
import sys
import sysconfig
from typing import Dict, Iterable, List, Sequence, Tuple

import numpy as np

from exp.data.indexed_dataset import IndexedDatasetBuilder, data_file_path, index_file_path
from exp.data.preprocess import ByteTokenizer

SCOPES = ("stdlib", "installed")
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", ".git"}


def source_roots(scope: str) -> List[Tuple[str, str]]:
    """The (label, directory) pairs `scope` reads, in a fixed order, existing ones only."""
    if scope not in SCOPES:
        raise ValueError(f"scope: expected one of {SCOPES}, got {scope!r}")
    paths = sysconfig.get_paths()
    roots = [("stdlib", paths["stdlib"])]
    if scope == "installed":
        seen = {os.path.realpath(paths["stdlib"])}
        candidates = [paths.get("purelib"), paths.get("platlib")] + list(site.getsitepackages())
        user = site.getusersitepackages() if site.ENABLE_USER_SITE else None
        candidates.append(user)
        for d in candidates:
            if d and os.path.isdir(d) and os.path.realpath(d) not in seen:
                seen.add(os.path.realpath(d))
                roots.append((f"site{len(roots)}", d))
    return [(label, d) for label, d in roots if os.path.isdir(d)]


def python_files(roots: Sequence[Tuple[str, str]]) -> List[Tuple[str, str]]:
    """(name, path) of every `.py` file under the roots, sorted by name; a root's own
    site-packages (the standard library's, on system Pythons) is left to its own root."""
    out: List[Tuple[str, str]] = []
    for label, root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
            for f in filenames:
                if f.endswith(".py"):
                    path = os.path.join(dirpath, f)
                    out.append((f"{label}/{os.path.relpath(path, root)}", path))
    out.sort()
    return out


def read_sources(files: Iterable[Tuple[str, str]]) -> Tuple[List[bytes], str, Dict[str, int]]:
    """The distinct, non-empty contents of `files` (first occurrence kept), the SHA-256 over
    the kept names and contents, and counts {'files', 'duplicates', 'unreadable'}."""
    seen, docs = set(), []
    digest = hashlib.sha256()
    counts = {"files": 0, "duplicates": 0, "unreadable": 0}
    for name, path in files:
        counts["files"] += 1
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except OSError:
            counts["unreadable"] += 1
            continue
        key = hashlib.sha1(raw).digest()
        if not raw.strip() or key in seen:
            counts["duplicates"] += bool(raw.strip())
            continue
        seen.add(key)
        digest.update(name.encode() + b"\0" + raw)
        docs.append(raw)
    return docs, digest.hexdigest(), counts


def write_byte_corpus(out_prefix: str, docs: Sequence[bytes], seed: int) -> int:
    """Writes `docs` (UTF-8 bytes) as byte-token documents in a seeded order, each ended by the
    end-of-document id; returns the number of tokens written."""
    tok = ByteTokenizer()
    order = np.random.RandomState(seed).permutation(len(docs))
    os.makedirs(os.path.dirname(out_prefix) or ".", exist_ok=True)
    tokens = 0
    with IndexedDatasetBuilder(data_file_path(out_prefix), dtype=np.uint16) as b:
        for i in order:
            ids = np.frombuffer(docs[i], dtype=np.uint8).astype(np.uint16)
            b.add_item(np.append(ids, np.uint16(tok.eod)))
            b.end_document()
            tokens += ids.size + 1
        b.finalize(index_file_path(out_prefix))
    return tokens


def build(out_prefix: str, scope: str = "installed", seed: int = 20240101, min_tokens: int = 0) -> Dict[str, object]:
    """Builds the corpus at `out_prefix`; returns {'documents', 'tokens', 'sha256', 'roots', ...}.

    Raises:
        ValueError: an unknown scope, or fewer than `min_tokens` tokens found.
        FileNotFoundError: no Python source at all under the roots.
    """
    if not isinstance(min_tokens, int) or min_tokens < 0:
        raise ValueError(f"min_tokens: expected an int >= 0, got {min_tokens!r}")
    roots = source_roots(scope)
    files = python_files(roots)
    docs, sha, counts = read_sources(files)
    if not docs:
        raise FileNotFoundError(f"no Python sources (.py) under {[d for _, d in roots]}")
    size = sum(len(d) + 1 for d in docs)
    if size < min_tokens:
        raise ValueError(f"the {scope!r} corpus has {size:,} tokens, fewer than min_tokens={min_tokens:,}; "
                         f"use --scope installed or install more packages")
    tokens = write_byte_corpus(out_prefix, docs, seed)
    return {"documents": len(docs), "tokens": tokens, "sha256": sha, "roots": [d for _, d in roots], **counts}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m exp.data.pycorpus", description=__doc__.split("\n\n")[0])
    p.add_argument("out_prefix", help="output prefix: writes OUT_PREFIX.bin and OUT_PREFIX.idx")
    p.add_argument("--scope", choices=SCOPES, default="installed")
    p.add_argument("--seed", type=int, default=20240101, help="the document order's seed")
    p.add_argument("--min-tokens", type=int, default=0, help="fail unless the corpus has at least this many tokens")
    args = p.parse_args(argv)
    try:
        s = build(args.out_prefix, args.scope, args.seed, args.min_tokens)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{s['documents']:,} files ({s['duplicates']:,} repeated contents left out) from {len(s['roots'])} "
          f"root(s), {s['tokens']:,} byte tokens, sha256 {s['sha256'][:16]}... -> {args.out_prefix}.bin/.idx")
    return 0


if __name__ == "__main__":
    sys.exit(main())
