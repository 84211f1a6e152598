"""Small corpora for the data pipeline tests: every token value is unique, so a window's first token
says which domain, file and window it is."""

import numpy as np

from fastmix.data import TokenCorpus

SEQ_LEN = 4


def make_corpus(root, files=None):
    """Domains a (two files: 10 + 5 windows), b (12 windows), c (7 windows) at seq_len 4."""
    files = files or {"a": [41, 23], "b": [50], "c": [30]}
    paths, next_token = {}, 0
    for name, sizes in files.items():
        paths[name] = []
        for i, n in enumerate(sizes):
            path = root / f"{name}{i}.bin"
            np.arange(next_token, next_token + n, dtype=np.uint32).tofile(path)
            next_token += n
            paths[name].append(path)
    return TokenCorpus(paths, dtype="uint32")


def window_index(corpus, seq_len=SEQ_LEN):
    """first token -> (domain index, window index within the domain)."""
    out = {}
    for d, name in enumerate(corpus.names):
        w = 0
        for path in corpus.files[name]:
            flat = corpus._flat_files.index(path)
            tokens = corpus.tokens_of(flat)
            for start in range(0, len(tokens) - seq_len, seq_len):
                out[int(tokens[start])] = (d, w)
                w += 1
    return out


def flatten(batches):
    """Batches (dicts) -> list of (first token, domain) per sample, in order."""
    out = []
    for b in batches:
        ids, dom = b["input_ids"], b["domain"]
        if ids.ndim == 1:
            out.append((int(ids[0]), int(dom)))
        else:
            out.extend(zip(ids[:, 0].tolist(), dom.tolist(), strict=True))
    return out


def take(iterator, n):
    out = []
    for _ in range(n):
        try:
            out.append(next(iterator))
        except StopIteration:
            break
    return out


def test_window_index_covers_every_window(tmp_path):
    corpus = make_corpus(tmp_path)
    index = window_index(corpus)
    counts = corpus.num_windows(SEQ_LEN)
    for d, name in enumerate(corpus.names):
        assert sorted(w for dd, w in index.values() if dd == d) == list(range(counts[name]))
