"""``fastmix prepare``: text or JSONL files -> one token file per domain + ``corpus.json``.

Output layout (what ``TokenCorpus.from_dir`` reads)::

    <out>/<domain>.bin     flat little-endian tokens, every document followed by end-of-document
    <out>/corpus.json      {"format": "fastmix-corpus", "version": 1, "dtype": "uint16",
                            "tokenizer": "byte", "vocab_size": 257, "eos_id": 256,
                            "domains": {name: {"files": ["name.bin"], "tokens": N, "documents": D,
                                               "sources": [...]}}}

Inputs: ``.jsonl`` / ``.json`` / ``.ndjson`` files hold one JSON object per line whose
``--text-field`` (default ``text``) is a document; a ``.gz`` suffix is read through gzip; any other
file is plain text, one document per file, kept as it is (``\r\n`` stays; ``--lines``: one per
non-empty line).  ``--lines`` applies to plain-text files only: a JSONL record is always one
document, newlines in its text included, so one run can take both kinds of file.  Bytes that are
not UTF-8 become U+FFFD, with a warning naming the file; so do lone surrogates in a text (a JSON
``"\\ud800"`` escape makes one), with a warning naming the domain; a file that starts with a
UTF-16 or UTF-32 byte-order mark is refused (read as UTF-8 it would be ASCII with NUL bytes).
A document with no text is skipped (and counted in its domain's ``"empty_documents"``), never
stored as a lone end-of-document.

Domain names: a token file is named after its domain, so two names that differ only in letter case
or Unicode normalisation (``Code`` and ``code``) are refused, within a run or against a domain
already in ``corpus.json``, before anything is written: macOS and Windows take their token files
for one file.

Tokenizers: ``byte`` (built in: the UTF-8 bytes 0-255 plus end-of-document 256, stored as uint16),
``tiktoken:<encoding>`` (e.g. ``tiktoken:gpt2``) and ``hf:<tokenizer.json or hub name>`` when the
``tiktoken`` / ``tokenizers`` packages are installed.

Crash safety: a token file is written under a temporary name in the output directory and renamed
into place only once complete; ``corpus.json`` is rewritten the same way afterwards.  The rename and
the manifest update happen under one lock on the directory, so runs adding domains to one directory
at once keep each other's, and a domain prepared by two runs at once is the file and the entry of
one of them.  A crash
leaves at most a ``.<domain>.bin.tmp-*`` file, which nothing loads; domains are done one after
another, so a run that fails keeps the domains it finished before (complete, and listed).
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import gzip
import io
import json
import numbers
import os
import sys
import warnings
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fastmix._io import atomic_open, atomic_write_text, make_dir, writable_dir
from fastmix.data import CORPUS_MANIFEST, CorpusError, _file_name_key

__all__ = [
    "Tokenizer",
    "get_tokenizer",
    "prepare_domain",
    "prepare_corpus",
    "read_documents",
    "configure",
    "run",
]

MANIFEST_FORMAT = "fastmix-corpus"
MANIFEST_VERSION = 1
BYTE_EOS = 256
# Tokens are buffered and written in chunks of this many (8 MiB of uint16), so memory stays flat.
_FLUSH_TOKENS = 1 << 22


@dataclass(frozen=True)
class Tokenizer:
    """A text -> token ids function with the facts a corpus records about it."""

    name: str
    encode: Callable[[str], Sequence[int] | np.ndarray]
    vocab_size: int
    eos_id: int

    def __post_init__(self) -> None:
        # Checked here, once: a bad vocab_size or eos_id would otherwise surface as a numpy
        # OverflowError while writing, or as ids silently wrapped by the uint32 token file.
        if not isinstance(self.name, str) or not self.name:
            raise TypeError(f"Tokenizer name must be a non-empty string, got {self.name!r}")
        if not callable(self.encode):
            raise TypeError(
                f"tokenizer {self.name!r}: encode must be callable, "
                f"got {type(self.encode).__name__}"
            )
        for field in ("vocab_size", "eos_id"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(
                    f"tokenizer {self.name!r}: {field} must be an integer, "
                    f"got {type(value).__name__}"
                )
            object.__setattr__(self, field, int(value))  # a numpy integer is stored as int
        if not 1 <= self.vocab_size <= 1 << 32:
            raise ValueError(
                f"tokenizer {self.name!r}: vocab_size must be between 1 and 2**32 (token files "
                f"hold uint16 or uint32 ids), got {self.vocab_size}"
            )
        if not 0 <= self.eos_id < self.vocab_size:
            raise ValueError(
                f"tokenizer {self.name!r}: eos_id must be an id of the vocabulary "
                f"(0 to {self.vocab_size - 1}), got {self.eos_id}"
            )

    @property
    def dtype(self) -> np.dtype:
        """uint16 when every id fits (vocab <= 65536), else uint32."""
        return np.dtype("<u2") if self.vocab_size <= 1 << 16 else np.dtype("<u4")


def _byte_encode(text: str) -> np.ndarray:
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: U+FFFD, as for bytes that are not UTF-8
        data = _without_surrogates(text)[0].encode("utf-8")
    return np.frombuffer(data, dtype=np.uint8)


def get_tokenizer(spec: str = "byte") -> Tokenizer:
    """``"byte"``, ``"tiktoken:<encoding>"`` or ``"hf:<path or hub name>"``.

    The last two need the optional ``tiktoken`` / ``tokenizers`` packages; without them the error
    says which package to install.
    """
    if not isinstance(spec, str):
        raise TypeError(f"tokenizer must be a string, got {type(spec).__name__}")
    if spec == "byte":
        return Tokenizer("byte", _byte_encode, vocab_size=BYTE_EOS + 1, eos_id=BYTE_EOS)
    kind, _, arg = spec.partition(":")
    if kind == "tiktoken" and arg:
        try:
            import tiktoken
        except ImportError:
            raise ValueError(
                f"tokenizer {spec!r} needs the 'tiktoken' package (pip install tiktoken)"
            ) from None
        try:
            enc = tiktoken.get_encoding(arg)
        except Exception as e:  # noqa: BLE001 - unknown names, no network, a broken cache
            raise ValueError(
                f"tokenizer {spec!r} cannot be loaded: {type(e).__name__}: {e}"
            ) from None
        return Tokenizer(
            spec,
            lambda text: enc.encode_ordinary(text),
            vocab_size=enc.n_vocab,
            eos_id=enc.eot_token,
        )
    if kind == "hf" and arg:
        try:
            from tokenizers import Tokenizer as HFTokenizer
        except ImportError:
            raise ValueError(
                f"tokenizer {spec!r} needs the 'tokenizers' package (pip install tokenizers)"
            ) from None
        try:
            tok = (
                HFTokenizer.from_file(arg)
                if os.path.isfile(arg)
                else HFTokenizer.from_pretrained(arg)
            )
        except Exception as e:  # noqa: BLE001 - a malformed file, no network, an unknown name
            raise ValueError(
                f"tokenizer {spec!r} cannot be loaded: {type(e).__name__}: {e}"
            ) from None
        # Text that spells a special token ("<|endoftext|>" inside a document) must stay text:
        # as a token it would forge a document boundary.  tokenizers >= 0.19 can do that.
        if hasattr(tok, "encode_special_tokens"):
            tok.encode_special_tokens = True
        eos = next(
            (
                tok.token_to_id(t)
                for t in ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")
                if tok.token_to_id(t) is not None
            ),
            None,
        )
        vocab = tok.get_vocab_size(with_added_tokens=True)
        if eos is None:  # no end-of-document token in the vocabulary: add one past the end
            eos = vocab
            vocab += 1
        return Tokenizer(
            spec,
            lambda text: tok.encode(text, add_special_tokens=False).ids,
            vocab_size=vocab,
            eos_id=eos,
        )
    raise ValueError(
        f"tokenizer must be 'byte', 'tiktoken:<encoding>' or 'hf:<path>', got {spec!r}"
    )


# ----------------------------------------------------------------------------------------------
# Reading documents
# ----------------------------------------------------------------------------------------------


def read_documents(
    path: str | os.PathLike, *, text_field: str = "text", lines: bool = False
) -> Iterator[str]:
    """Documents of one input file (JSONL by suffix, else plain text); errors name the file.

    ``text_field`` is the JSONL field holding the text; ``lines`` makes each non-empty line of a
    plain-text file a document, and changes nothing for JSONL, whose records are always one
    document each.
    """
    yield from _read_documents(path, text_field, lines)


def _read_documents(
    path: str | os.PathLike, text_field: str, lines: bool, on_read: Any = None
) -> Iterator[str]:
    """``read_documents``; ``on_read(n)`` after each document gets the bytes of the file read so
    far (of the compressed file for .gz: the decompressed text is several times its size)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"input {str(path)!r}: no such file")
    name = path.name.lower()
    is_gz = name.endswith(".gz")
    is_jsonl = name.removesuffix(".gz").endswith((".jsonl", ".json", ".ndjson"))
    try:
        file = open(path, "rb")
    except OSError as e:
        raise ValueError(f"input {str(path)!r}: cannot be read ({e.strerror or e})") from None
    # utf-8-sig: a BOM is not part of the first document (nor the start of JSON);
    # newline="" for whole plain-text documents: their bytes, \r\n included, are kept.
    newline = "" if not (is_jsonl or lines) else None
    replaced = _REPLACED.count
    try:
        with file:  # (a GzipFile does not close the file it reads)
            raw = gzip.GzipFile(fileobj=file, mode="rb") if is_gz else file
            _refuse_wide_text(path, raw.peek(4)[:4])
            with io.TextIOWrapper(
                raw, encoding="utf-8-sig", errors=_REPLACE, newline=newline
            ) as f:
                for doc in _parse_documents(f, path, text_field, is_jsonl, lines):
                    yield doc
                    if on_read is not None:
                        on_read(file.tell())
    except (OSError, EOFError, zlib.error) as e:  # a corrupt or truncated .gz, a failing disk
        raise ValueError(f"input {str(path)!r}: cannot be read ({e})") from None
    if _REPLACED.count > replaced:
        warnings.warn(
            f"input {str(path)!r}: {_REPLACED.count - replaced} byte sequence(s) that are not "
            "UTF-8 were replaced with U+FFFD",
            RuntimeWarning,
            stacklevel=3,
        )


# Byte-order marks of the encodings a text editor may save in instead of UTF-8 (Windows'
# "Unicode", PowerShell 5's `>`), the UTF-32 ones first: they begin like UTF-16's.
_WIDE_BOMS = (
    (codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"),
    (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16"),
)


def _refuse_wide_text(path: Path, head: bytes) -> None:
    """A ValueError naming ``path`` when its first bytes are a UTF-16 or UTF-32 byte-order mark.

    Read as UTF-8, such a file is valid almost throughout (ASCII text with a NUL byte after each
    character): its tokens were that, with a warning about the two bytes of the mark only.
    """
    for bom, encoding in _WIDE_BOMS:
        if head.startswith(bom):
            raise ValueError(
                f"input {str(path)!r} is {encoding} text (it starts with a {encoding} byte-order "
                "mark), not UTF-8: save it as UTF-8"
            )


class _Replacements:
    """Counts what the decoding error handler below replaced (one process, one thread reading)."""

    count = 0

    @classmethod
    def handler(cls, exc: UnicodeError) -> tuple[str, int]:
        if not isinstance(exc, UnicodeDecodeError):
            raise exc
        cls.count += 1
        return "\ufffd", exc.end


_REPLACED = _Replacements
_REPLACE = "fastmix-prepare-replace"
codecs.register_error(_REPLACE, _Replacements.handler)


def _parse_documents(
    f: io.TextIOWrapper, path: Path, text_field: str, is_jsonl: bool, lines: bool
) -> Iterator[str]:
    """The documents of one decoded input file (see ``read_documents``)."""
    if is_jsonl:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as e:  # also a number past int's digit limit: not a JSON error
                raise ValueError(
                    f"input {str(path)!r}, line {lineno}: invalid JSON ({e})"
                ) from None
            except RecursionError:  # json gives up on deep nesting with this, not a JSON error
                raise ValueError(
                    f"input {str(path)!r}, line {lineno}: invalid JSON (nested too deeply)"
                ) from None
            if not isinstance(obj, dict):  # (it said "no 'text' field": choose --text-field)
                raise ValueError(
                    f"input {str(path)!r}, line {lineno}: a JSON {type(obj).__name__}, not an "
                    "object; JSON lines input holds one object per line (a whole JSON array "
                    "is not read)"
                )
            if text_field not in obj:
                raise ValueError(
                    f"input {str(path)!r}, line {lineno}: no {text_field!r} field "
                    "(choose the field with --text-field)"
                )
            text = obj[text_field]
            if not isinstance(text, str):
                raise ValueError(
                    f"input {str(path)!r}, line {lineno}: field {text_field!r} is not a string"
                )
            yield text
    elif lines:
        for line in f:
            line = line.rstrip("\n")
            if line.strip():
                yield line
    else:
        yield f.read()


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------


def prepare_domain(
    name: str,
    texts: Iterable[str],
    out_dir: str | os.PathLike,
    tokenizer: str | Tokenizer = "byte",
    *,
    sources: Sequence[str] = (),
    progress: Any = None,
) -> dict[str, Any]:
    """Tokenise ``texts`` (one document each) into ``<out_dir>/<name>.bin`` and record it.

    Each document is followed by the tokenizer's end-of-document id; a document that encodes to no
    token (an empty text) is skipped, not written as a lone end-of-document, and counted in the
    entry's ``"empty_documents"`` (present when there were any).  Lone surrogates in a text become
    U+FFFD before it is encoded, with a RuntimeWarning naming the domain.  The file is written
    under a temporary name and renamed once complete, then ``corpus.json`` is updated the same
    way, so an exception or a crash midway never leaves a file that loads.  Returns the manifest
    entry.
    A ``name`` that differs from a domain already in ``corpus.json`` only in letter case or Unicode
    normalisation (``code`` beside ``Code``) is refused with a ValueError before anything is
    written: the two token files would be one on a case-insensitive file system (macOS,
    Windows).  The same name again replaces that domain.
    ``progress`` is an optional tqdm-like object whose ``update(n)`` gets the characters consumed.
    """
    return _prepare_domain(name, texts, out_dir, tokenizer, sources, progress, check_first=True)


def _prepare_domain(
    name: str,
    texts: Iterable[str],
    out_dir: str | os.PathLike,
    tokenizer: str | Tokenizer,
    sources: Sequence[str],
    progress: Any,
    check_first: bool,
) -> dict[str, Any]:
    """``prepare_domain``; ``check_first=False`` skips the name check before tokenising, for a
    caller that checked all its names already (the check under the lock stays)."""
    _check_domain_name(name)
    if isinstance(texts, (str, bytes)):  # iterating it would make one document per character
        raise TypeError(
            f"texts must be an iterable of documents (str), not a single {type(texts).__name__}"
        )
    if isinstance(texts, (set, frozenset)):  # its order, the tokens' order, changes per process
        raise TypeError(_UNORDERED.format(what="texts", items="documents"))
    out = make_dir(out_dir, "out_dir")
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else get_tokenizer(tokenizer)
    if check_first:
        _check_manifest_clashes([name], _load_or_new_manifest(out, tok))
    target = out / f"{name}.bin"
    # The rename and the manifest update happen under one lock, after the manifest is read
    # again: renamed before it, the file of a run that then met another tokenizer's manifest (or
    # lost the manifest update to a concurrent run of the same domain) stayed in place, listed
    # under the other run's tokenizer or token count.
    with contextlib.ExitStack() as locked:
        with atomic_open(target) as f:
            n_tokens, n_docs, n_empty = _write_documents(f, texts, tok, name, sources, progress)
            f.flush()
            os.fsync(f.fileno())  # the slow part, before taking the lock
            locked.enter_context(_manifest_lock(out))  # another run may be adding domains here
            manifest = _load_or_new_manifest(out, tok)  # re-read: it may have added some since
            _check_manifest_clashes([name], manifest)
        # renamed into place: still under the lock
        entry = {
            "files": [target.name],
            "tokens": int(n_tokens),
            "documents": int(n_docs),
            "sources": [str(s) for s in sources],
        }
        if n_empty:
            entry["empty_documents"] = int(n_empty)
        manifest["domains"][name] = entry
        atomic_write_text(out / CORPUS_MANIFEST, _manifest_text(manifest))
    return entry


def _manifest_text(manifest: Mapping[str, Any]) -> str:
    """corpus.json's text: indented, one line per domain.  (json's indented encoder is pure
    Python: rewriting corpus.json after each domain took ~15 ms per domain at 1,000 domains.)"""
    lines = []
    for key, value in manifest.items():
        if key == "domains" and isinstance(value, dict) and value:
            rows = ",\n".join(f"    {json.dumps(n)}: {json.dumps(e)}" for n, e in value.items())
            lines.append(f"  {json.dumps(key)}: {{\n{rows}\n  }}")
        else:
            lines.append(f"  {json.dumps(key)}: {json.dumps(value)}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def _write_documents(
    f: Any, texts: Iterable[str], tok: Tokenizer, name: str, sources: Sequence[str], progress: Any
) -> tuple[int, int, int]:
    """Tokenise ``texts`` into ``f`` (see ``prepare_domain``); returns (tokens, documents, empty
    documents), and raises ValueError when no document holds a token."""
    n_tokens = n_docs = n_empty = n_surrogates = 0
    buffer: list[np.ndarray] = []
    buffered = 0
    eos = np.array([tok.eos_id], dtype=tok.dtype)
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"domain {name!r}: documents must be str, got {type(text).__name__}")
        if progress is not None:
            progress.update(len(text))
        text, replaced = _without_surrogates(text)
        n_surrogates += replaced
        ids = _token_ids(tok, text, name)
        if ids.size == 0:
            n_empty += 1
            continue
        buffer += [ids.astype(tok.dtype, copy=False), eos]
        buffered += ids.size + 1
        n_docs += 1
        if buffered >= _FLUSH_TOKENS:
            f.write(np.concatenate(buffer).tobytes())
            n_tokens += buffered
            buffer, buffered = [], 0
    if buffer:
        f.write(np.concatenate(buffer).tobytes())
        n_tokens += buffered
    if n_surrogates:
        warnings.warn(
            f"domain {name!r}: {n_surrogates} lone surrogate(s) (code points U+D800-U+DFFF, "
            "which UTF-8 cannot hold) were replaced with U+FFFD",
            RuntimeWarning,
            stacklevel=3,  # prepare_domain's caller
        )
    if n_docs == 0:
        empty = f", {n_empty} empty" if n_empty else ""
        raise ValueError(
            f"domain {name!r}: no documents{empty} (inputs: {list(sources) or 'none'})"
        )
    return n_tokens, n_docs, n_empty


def _without_surrogates(text: str) -> tuple[str, int]:
    """``text`` with each lone surrogate replaced by U+FFFD, and how many there were.

    A Python str can hold them (a JSON "\\ud800" escape makes one); UTF-8 cannot, so encoding
    with errors="replace" makes a silent "?" of each, and other tokenizers do as they please.  A
    high-low pair is the character it spells, as in UTF-16.
    """
    if text.isascii():  # O(1): most text never pays for the check below
        return text, 0
    try:
        text.encode("utf-8")
        return text, 0
    except UnicodeEncodeError:
        pass
    fixed = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    return fixed, fixed.count("\ufffd") - text.count("\ufffd")


def _token_ids(tok: Tokenizer, text: str, domain: str) -> np.ndarray:
    """``tok.encode(text)`` as a 1-D integer array of ids in the vocabulary (empty: no token).

    The cast to the token file's dtype truncates floats and wraps what does not fit, so anything
    else is refused here, naming the tokenizer and the domain.
    """
    raw = tok.encode(text)
    where = f"tokenizer {tok.name!r} (domain {domain!r})"
    try:
        ids = np.asarray(raw)
    except (ValueError, TypeError, OverflowError) as e:  # ragged nesting and the like
        raise ValueError(f"{where}: encode returned no flat sequence of ids ({e})") from None
    if ids.ndim != 1:
        raise ValueError(
            f"{where}: encode must return a flat sequence of ids, got {type(raw).__name__}"
            + (f" of shape {ids.shape}" if ids.ndim else "")
        )
    if ids.size == 0:
        return ids
    if ids.dtype.kind == "f" and isinstance(raw, np.ndarray) and np.all(ids == np.floor(ids)):
        if np.isfinite(ids).all() and ids.min() >= 0 and ids.max() < tok.vocab_size:
            return ids.astype(np.int64)  # whole numbers held as floats: exact below 2**53
    if ids.dtype.kind not in "iu":  # not an integer array: look at the values one by one
        if ids.dtype.kind == "f" and not isinstance(raw, np.ndarray):
            ids = np.array(raw, dtype=object)  # numpy makes float64 of ints like [-1, 2**63]
        values = ids.tolist()
        for v in values:  # a float would be truncated, a bool taken as 0 or 1
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise ValueError(
                    f"{where}: token ids must be integers, got {type(v).__name__} {v!r}"
                )
        bad = next((v for v in values if not 0 <= v < tok.vocab_size), None)
        if bad is None:  # integers held as objects, all in the vocabulary (< 2**32)
            return np.array(values, dtype=np.int64)
    elif ids.min() < 0 or ids.max() >= tok.vocab_size:
        bad = ids.min() if ids.min() < 0 else ids.max()
    else:
        return ids
    raise ValueError(
        f"{where}: id {int(bad)} is outside the vocabulary (0 to {tok.vocab_size - 1})"
    )


@contextlib.contextmanager
def _manifest_lock(out: Path) -> Iterator[None]:
    """An exclusive lock on the directory itself (where flock exists) for the manifest update:
    no lock file is left beside the corpus."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released when fd is closed
        yield
    finally:
        os.close(fd)


def prepare_corpus(
    domains: Mapping[str, str | bytes | os.PathLike | Sequence[str | bytes | os.PathLike]],
    out_dir: str | os.PathLike,
    tokenizer: str = "byte",
    *,
    text_field: str = "text",
    lines: bool = False,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Tokenise every domain's input files; returns the written manifest (``corpus.json``).

    ``domains`` maps a domain name to one input file or a list of them, written into ``out_dir``
    with ``tokenizer`` (see :func:`get_tokenizer`); ``text_field`` and ``lines`` are as in
    :func:`read_documents` (``lines`` splits the plain-text files only: a JSONL record is always
    one document); ``show_progress`` draws a progress bar.  Domain names that differ only in
    letter case or Unicode normalisation, from each other or from a domain already in
    ``corpus.json``, are refused before anything is written (see ``prepare_domain``).
    """
    if not isinstance(domains, Mapping) or not domains:
        raise ValueError("domains: nothing to prepare (a mapping name -> file or list of files)")
    for name in domains:
        _check_domain_name(name)
    _check_name_clashes(list(domains))
    domains = {name: _input_paths(name, spec) for name, spec in domains.items()}
    tok = get_tokenizer(tokenizer)
    for name, paths in domains.items():  # before out_dir is made: a typo left an empty folder
        for p in paths:
            if not Path(p).is_file():
                raise ValueError(f"domain {name!r}: input {str(p)!r} is not a file")
    out = writable_dir(out_dir, "out_dir")  # before any tokenising: a bad out_dir fails at once
    _check_inputs_not_outputs(domains, out)
    # Against the domains already there, before the first domain is written (prepare_domain
    # checks again, under the lock, for domains another run adds meanwhile).
    _check_manifest_clashes(list(domains), _load_or_new_manifest(out, tok))
    total = sum(Path(p).stat().st_size for ps in domains.values() for p in ps)
    bar = _progress(total, show_progress)
    try:
        for name, paths in domains.items():
            if bar is not None:
                bar.set_description(name)
            docs = _documents(paths, text_field, lines, bar)  # (it moves the bar)
            # (checked against corpus.json above; prepare_domain's own check before tokenising
            # read and compared the whole manifest once more per domain)
            sources = [str(p) for p in paths]
            _prepare_domain(name, docs, out_dir, tok, sources, progress=None, check_first=False)
    finally:
        if bar is not None:
            bar.close()
    return _load_or_new_manifest(Path(out_dir), tok)


def _check_inputs_not_outputs(domains: Mapping[str, Sequence[str]], out: Path) -> None:
    """Refuse an input file that is a file this run writes: a domain's token file or corpus.json.

    ``web=out/web.bin -o out`` (a text file named like the token file, or the token file of an
    earlier run) was read while its replacement was written, then replaced by it: the input was
    gone, silently.
    """
    written: dict[tuple[int, int], str] = {}
    for what, path in [(f"the token file of domain {n!r}", out / f"{n}.bin") for n in domains] + [
        ("corpus.json", out / CORPUS_MANIFEST)
    ]:
        try:
            st = path.stat()
        except OSError:  # not there yet: nothing to lose
            continue
        written.setdefault((st.st_dev, st.st_ino), what)
    if not written:
        return
    for name, paths in domains.items():
        for p in paths:
            st = os.stat(p)
            what = written.get((st.st_dev, st.st_ino))
            if what is not None:
                raise ValueError(
                    f"domain {name!r}: input {str(p)!r} is {what} in {str(out)!r}, which this "
                    "run replaces: the input would be lost; move it, or choose another output "
                    "folder"
                )


# A set of str iterates in an order that changes with PYTHONHASHSEED, i.e. from one process to the
# next: the same call would lay the domain's tokens out in another order each time.
_UNORDERED = ("{what}: a set of {items} has no fixed order, and their order is the order of the "
              "domain's tokens; pass a list (e.g. sorted(...))")


def _input_paths(name: str, spec: Any) -> list[str]:
    """A domain's input files as a list of str paths; errors name the domain.

    One path is a list of one (a str is not a list of one-character paths, nor bytes of ints).
    """
    if isinstance(spec, (str, bytes, os.PathLike)):
        spec = [spec]
    elif isinstance(spec, (set, frozenset)):  # its order, the tokens' order, changes per process
        raise TypeError(_UNORDERED.format(what=f"domain {name!r}", items="input files"))
    elif not isinstance(spec, Iterable):
        raise TypeError(
            f"domain {name!r}: expected an input file or a list of them, got {type(spec).__name__}"
        )
    paths = []
    for p in spec:
        if not isinstance(p, (str, bytes, os.PathLike)):
            raise TypeError(f"domain {name!r}: an input file must be a path, got {p!r}")
        paths.append(os.fsdecode(p))
    if not paths:  # (it said "no documents (inputs: none)", once its out_dir was made)
        raise ValueError(f"domain {name!r} lists no input files")
    return paths


def _documents(paths: Sequence[Any], text_field: str, lines: bool, bar: Any) -> Iterator[str]:
    """Documents of several files; the bar follows the bytes of each file read, and is set to
    the file's exact size after it.  (It counted the characters of the documents: for a .gz
    input several times the file's size, so the bar ran past its total and then fell back.)"""
    for p in paths:
        if bar is None:
            yield from _read_documents(p, text_field, lines)
            continue
        start, size = bar.n, Path(p).stat().st_size

        def on_read(read: int, start: int = start, size: int = size) -> None:
            bar.update(start + min(read, size) - bar.n)

        yield from _read_documents(p, text_field, lines, on_read)
        bar.n = start + size
        bar.refresh()


def _progress(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    # bytes of the input files read (of the compressed file for .gz)
    return tqdm(total=total, unit="B", unit_scale=True, file=sys.stderr, dynamic_ncols=True)


def _check_domain_name(name: Any) -> None:
    if not isinstance(name, str) or not name or name.startswith(".") or "/" in name or "\\" in name:
        raise ValueError(
            f"domain name must be a plain file name (no '/', no leading '.'), got {name!r}"
        )
    if "\0" in name:  # no file name holds one: open() would say only "embedded null byte"
        raise ValueError(f"domain name must not contain a NUL character, got {name!r}")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # a file name's bytes that are not UTF-8, named after the file
        raise ValueError(
            f"domain name must be text UTF-8 can hold (corpus.json is UTF-8), got {name!r}; "
            "name the domain: DOMAIN=FILE"
        ) from None
    if len(name.encode("utf-8", errors="replace")) > 200:  # + ".bin" and a temporary suffix
        raise ValueError(f"domain name must be at most 200 bytes, got {name[:40]!r}...")


def _check_name_clashes(names: Sequence[str]) -> None:
    """Refuse two of ``names`` whose token files would be one file on some file systems.

    The token files of two names that differ only in letter case or Unicode normalisation
    (``Code.bin`` and ``code.bin``; ``café`` composed and decomposed) are one file where file
    names are compared without them (the default on macOS and Windows): the domain prepared last
    would overwrite the other's tokens, silently.
    """
    seen: dict[str, str] = {}
    for name in names:
        other = seen.setdefault(_file_name_key(name), name)
        if other != name:
            raise ValueError(_name_clash(name, other, ""))


def _check_manifest_clashes(names: Sequence[str], manifest: Mapping[str, Any]) -> None:
    """:func:`_check_name_clashes` of ``names`` against the domains of ``manifest`` (a
    corpus.json read); the same name again is the same domain, prepared again.  A domain of the
    manifest listing a file of that name (a hand-written corpus.json) is refused too."""
    # One pass over the manifest (run twice per domain prepared: its cost is the manifest's
    # size), with each name's first clash of either kind kept for the message.
    by_key: dict[str, list[str]] = {}
    by_target: dict[str, list[str]] = {}
    for name in names:
        by_key.setdefault(_file_name_key(name), []).append(name)
        by_target.setdefault(_file_name_key(f"{name}.bin"), []).append(name)
    named: dict[str, str] = {}  # name -> the manifest's domain its name clashes with
    listed: dict[str, tuple[str, str]] = {}  # name -> (domain, file) its token file clashes with
    for other, info in manifest["domains"].items():
        for name in by_key.get(_file_name_key(other), ()):
            if other != name:
                named.setdefault(name, other)
        files = info.get("files") if isinstance(info, Mapping) else None
        for file in files if isinstance(files, list) else ():
            if isinstance(file, str):
                for name in by_target.get(_file_name_key(file), ()):
                    if other != name:
                        listed.setdefault(name, (other, file))
    for name in names:
        if name in named:
            where = f" ({named[name]!r} is already in corpus.json)"
            raise ValueError(_name_clash(name, named[name], where))
        if name in listed:
            other, file = listed[name]
            target = f"{name}.bin"
            one_file = "" if file == target else " (one file on a case-insensitive file system)"
            raise ValueError(
                f"domain {name!r} would write {target!r}, but corpus.json lists {file!r} for "
                f"domain {other!r}{one_file}; choose another name"
            )


def _name_clash(name: str, other: str, where: str) -> str:
    return (
        f"domain names {name!r} and {other!r} differ only in letter case or Unicode "
        f"normalisation{where}: their token files, named after them, would be one file on a "
        "case-insensitive file system (the default on macOS and Windows), where one domain's "
        "tokens would overwrite the other's; give the domains names that differ otherwise"
    )


def _load_or_new_manifest(out: Path, tok: Tokenizer) -> dict[str, Any]:
    path = out / CORPUS_MANIFEST
    if path.is_file():
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise CorpusError(f"{str(path)!r} cannot be read: {e}") from None
        except RecursionError:  # json gives up on deep nesting with this, not a JSON error
            raise CorpusError(f"{str(path)!r} cannot be read: JSON nested too deeply") from None
        except UnicodeDecodeError as e:  # its message names neither the file nor the problem
            raise CorpusError(
                f"{str(path)!r} cannot be read: not UTF-8 text (byte {e.start}: {e.reason})"
            ) from None
        except ValueError as e:  # a number past int's digit limit: not a JSON error
            raise CorpusError(f"{str(path)!r} cannot be read: {e}") from None
        if (
            not isinstance(manifest, dict)
            or manifest.get("format") != MANIFEST_FORMAT
            or not isinstance(manifest.get("domains"), dict)
        ):
            raise CorpusError(f"{str(path)!r} is not a {MANIFEST_FORMAT} manifest")
        theirs = tuple(manifest.get(k) for k in ("tokenizer", "dtype", "vocab_size", "eos_id"))
        ours = (tok.name, tok.dtype.name, int(tok.vocab_size), int(tok.eos_id))
        if theirs != ours:  # (a spec names a file: the same name may be another tokenizer now)
            raise CorpusError(
                f"{str(path)!r} was written with tokenizer {theirs[0]!r} ({theirs[1]}, vocab "
                f"{theirs[2]}, end-of-document {theirs[3]}); cannot add domains tokenised with "
                f"{ours[0]!r} ({ours[1]}, vocab {ours[2]}, end-of-document {ours[3]}) - use "
                "another output directory"
            )
        return manifest
    return {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "dtype": tok.dtype.name,
        "tokenizer": tok.name,
        "vocab_size": int(tok.vocab_size),
        "eos_id": int(tok.eos_id),
        "domains": {},
    }


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the ``prepare`` arguments to ``parser``."""
    parser.description = (
        "Tokenise text or JSONL files into one token file per domain plus corpus.json, "
        "loadable with fastmix.TokenCorpus.from_dir(OUT)."
    )
    parser.add_argument(
        "inputs",
        nargs="+",
        metavar="DOMAIN=FILE[,FILE...]",
        help="a domain and its input files; a bare FILE makes a domain named after the file, up "
        "to its first '.' (wiki.en.txt: wiki); a domain given twice reads the files of both; a "
        "FILE list that names one existing file (a path with a comma) is that file",
    )
    parser.add_argument("-o", "--out", required=True, help="output directory")
    parser.add_argument(
        "--tokenizer",
        default="byte",
        help="byte (built in, default) | tiktoken:<encoding> | hf:<tokenizer.json or hub name>",
    )
    parser.add_argument(
        "--text-field", default="text", help="JSONL field holding the text (default: text)"
    )
    parser.add_argument(
        "--lines",
        action="store_true",
        help="plain-text files: one document per non-empty line (a JSONL record is always one "
        "document, whatever --lines)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def parse_inputs(specs: Sequence[str]) -> dict[str, list[str]]:
    """``["web=a.jsonl,b.jsonl", "code.txt"]`` -> ``{"web": [...], "code": ["code.txt"]}``.

    A file list that names one existing file as a whole is that file, commas and all (a path
    holding a comma could not be given at all)."""
    domains: dict[str, list[str]] = {}
    for spec in specs:
        name, sep, files = spec.partition("=")
        if not sep:
            files, name = spec, Path(spec).name.split(".")[0]
        paths = [files] if "," in files and Path(files).is_file() else [
            p for p in files.split(",") if p
        ]
        if not name or not paths:
            raise ValueError(f"input {spec!r}: expected DOMAIN=FILE[,FILE...] or FILE")
        domains.setdefault(name, []).extend(paths)
    return domains


def run(args: argparse.Namespace) -> int:
    """Run ``fastmix prepare``; returns the exit status (2 on bad input, 1 if writing fails)."""
    try:
        domains = parse_inputs(args.inputs)
        manifest = prepare_corpus(
            domains,
            args.out,
            args.tokenizer,
            text_field=args.text_field,
            lines=args.lines,
            show_progress=not args.no_progress,
        )
    except (ValueError, TypeError) as e:
        print(f"fastmix prepare: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # writing failed midway (disk full, permissions changed, ...)
        print(f"fastmix prepare: error: {e}", file=sys.stderr)
        return 1
    for name in domains:
        entry = manifest["domains"][name]
        empty = entry.get("empty_documents", 0)
        skipped = f" ({empty:,} empty skipped)" if empty else ""
        print(f"{name}: {entry['documents']:,} documents, {entry['tokens']:,} tokens{skipped}")
    # (a path's bytes that are not UTF-8 shown escaped: a strict stdout cannot print them)
    wrote = os.fsencode(Path(args.out) / CORPUS_MANIFEST).decode("utf-8", "backslashreplace")
    print(f"wrote {wrote} ({manifest['tokenizer']}, {manifest['dtype']})")
    return 0
