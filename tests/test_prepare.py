"""fastmix prepare: tokenisation, layout, the command line and crash safety."""

import codecs
import gzip
import json

import numpy as np
import pytest

from fastmix import cli
from fastmix.data import TokenCorpus
from fastmix.prepare import (
    Tokenizer,
    get_tokenizer,
    parse_inputs,
    prepare_corpus,
    prepare_domain,
    read_documents,
)


def test_round_trip_text_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("héllo")
    (tmp_path / "b.jsonl").write_text(
        json.dumps({"body": "ab"}) + "\n\n" + json.dumps({"body": "c"}) + "\n"
    )
    out = tmp_path / "out"
    rc = cli.main(
        ["prepare", f"prose={tmp_path / 'a.txt'}", f"chat={tmp_path / 'b.jsonl'}",
         "-o", str(out), "--text-field", "body", "--no-progress"]
    )  # fmt: skip
    assert rc == 0
    corpus = TokenCorpus.from_dir(out)
    assert corpus.names == ["prose", "chat"]
    prose = list("héllo".encode()) + [256]
    assert corpus.tokens_of(0).tolist() == prose
    assert corpus.tokens_of(1).tolist() == [97, 98, 256, 99, 256]
    manifest = json.loads((out / "corpus.json").read_text())
    assert manifest["dtype"] == "uint16" and manifest["tokenizer"] == "byte"
    assert manifest["eos_id"] == 256 and manifest["vocab_size"] == 257
    assert manifest["domains"]["chat"] == {
        "files": ["chat.bin"], "tokens": 5, "documents": 2, "sources": [str(tmp_path / "b.jsonl")],
    }  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == ["chat.bin", "corpus.json", "prose.bin"]



def test_corpus_json_is_indented_json_with_one_line_per_domain(tmp_path):
    # (written by prepare's own formatter, which calls json's C encoder once per domain)
    prepare_domain("café", ["x"], tmp_path, sources=['a "quoted"\nname'])
    prepare_domain("二", ["yz"], tmp_path)
    text = (tmp_path / "corpus.json").read_text()
    manifest = json.loads(text)
    rows = [line for line in text.splitlines() if line.startswith("    ")]
    assert [json.loads("{" + row.rstrip(",") + "}") for row in rows] == [
        {name: entry} for name, entry in manifest["domains"].items()
    ]
    assert text.startswith('{\n  "format": ') and text.endswith("\n  }\n}\n")
    assert list(manifest["domains"]) == ["café", "二"]
    assert manifest["domains"]["café"]["sources"] == ['a "quoted"\nname']
    assert TokenCorpus.from_dir(tmp_path).tokens == {"café": 2, "二": 3}

def test_python_api_adds_domains_and_lines_mode(tmp_path):
    prepare_domain("one", ["x", "yz"], tmp_path)
    prepare_domain("two", iter(["w"]), tmp_path)
    corpus = TokenCorpus.from_dir(tmp_path)
    assert corpus.tokens == {"one": 5, "two": 2}
    (tmp_path / "l.txt").write_text("first\n\nsecond\n")
    manifest = prepare_corpus(
        {"lines": [tmp_path / "l.txt"]}, tmp_path, lines=True, show_progress=False
    )
    assert manifest["domains"]["lines"]["documents"] == 2
    assert set(manifest["domains"]) == {"one", "two", "lines"}
    # One path (a str, not a list of one-character paths) is a domain of one file.
    manifest = prepare_corpus({"single": str(tmp_path / "l.txt")}, tmp_path, show_progress=False)
    assert manifest["domains"]["single"]["sources"] == [str(tmp_path / "l.txt")]


def test_empty_documents_are_skipped_and_counted(tmp_path, capsys):
    # An empty text would otherwise be stored as a lone end-of-document token.
    entry = prepare_domain("web", ["", "ab", "", "c"], tmp_path)
    assert entry["documents"] == 2 and entry["tokens"] == 5 and entry["empty_documents"] == 2
    assert TokenCorpus.from_dir(tmp_path).tokens_of(0).tolist() == [97, 98, 256, 99, 256]
    assert "empty_documents" not in prepare_domain("full", ["x"], tmp_path)
    with pytest.raises(ValueError, match=r"domain 'none': no documents, 3 empty"):
        prepare_domain("none", ["", "", ""], tmp_path)
    (tmp_path / "e.jsonl").write_text('{"text": ""}\n{"text": "hi"}\n')
    (tmp_path / "empty.txt").write_text("")
    rc = cli.main(
        ["prepare", f"j={tmp_path / 'e.jsonl'},{tmp_path / 'empty.txt'}", "-o",
         str(tmp_path / "o"), "--no-progress"]
    )  # fmt: skip
    assert rc == 0
    assert "j: 1 documents, 3 tokens (2 empty skipped)" in capsys.readouterr().out


def test_failure_midway_leaves_nothing_that_loads(tmp_path):
    def documents():
        yield "a complete document"
        raise RuntimeError("simulated crash while tokenising")

    with pytest.raises(RuntimeError, match="simulated crash"):
        prepare_domain("web", documents(), tmp_path)
    assert list(tmp_path.iterdir()) == []  # no token file, no temporary file, no manifest
    prepare_domain("code", ["ok"], tmp_path)
    with pytest.raises(RuntimeError, match="simulated crash"):
        prepare_domain("code", documents(), tmp_path)  # the old file stays intact
    assert TokenCorpus.from_dir(tmp_path).tokens == {"code": 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["code.bin", "corpus.json"]


def test_a_leftover_temporary_file_is_never_loaded(tmp_path, monkeypatch):
    # A hard crash (no cleanup) leaves only the temporary name behind, which nothing reads.
    import os

    def crash(src, dst):
        raise OSError("simulated power loss before the rename")

    monkeypatch.setattr(os, "replace", crash)
    monkeypatch.setattr(os, "unlink", lambda *a, **k: None)
    monkeypatch.setattr("pathlib.Path.unlink", lambda *a, **k: None)
    with pytest.raises(OSError, match="power loss"):
        prepare_domain("web", ["text"], tmp_path)
    monkeypatch.undo()
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert leftovers and all(n.startswith(".web.bin.tmp-") for n in leftovers)
    with pytest.raises(ValueError, match="no corpus.json"):
        TokenCorpus.from_dir(tmp_path)


def test_bad_input_is_clear(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"domain 'e': no documents"):
        prepare_domain("e", [], tmp_path)
    with pytest.raises(ValueError, match="plain file name"):
        prepare_domain("../x", ["a"], tmp_path)
    with pytest.raises(ValueError, match=r"domain name must not contain a NUL .*'w\\x00eb'"):
        prepare_domain("w\x00eb", ["a"], tmp_path / "n")
    assert not (tmp_path / "n").exists()
    with pytest.raises(ValueError, match="domain name must not contain a NUL"):
        prepare_corpus({"w\x00eb": tmp_path / "bad.jsonl"}, tmp_path / "n", show_progress=False)
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"other": 1}\n')
    rc = cli.main(
        ["prepare", f"d={tmp_path / 'bad.jsonl'}", "-o", str(tmp_path / "o"), "--no-progress"]
    )
    assert rc == 2
    assert "bad.jsonl" in capsys.readouterr().err and not (tmp_path / "o" / "d.bin").exists()
    rc = cli.main(["prepare", f"d={tmp_path / 'missing.txt'}", "-o", str(tmp_path / "new")])
    assert rc == 2 and "missing.txt" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()  # (it was made before the inputs were looked at)
    with pytest.raises(ValueError, match="expected DOMAIN=FILE"):
        parse_inputs(["d="])
    with pytest.raises(TypeError, match="texts must be an iterable of documents"):
        prepare_domain("x", "hello", tmp_path / "s")  # not five one-letter documents
    with pytest.raises(TypeError, match="texts: a set of documents has no fixed order"):
        prepare_domain("x", {"hello", "world"}, tmp_path / "s")
    assert not (tmp_path / "s").exists()
    # Corrupt and truncated gzip input, an out_dir that is a file: one line, no traceback.
    (tmp_path / "corrupt.jsonl.gz").write_bytes(b"\x1f\x8b" + b"garbage" * 10)
    whole = gzip.compress(b'{"text": "abc"}\n' * 1000)
    (tmp_path / "cut.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "afile").write_text("x")
    (tmp_path / "ok.txt").write_text("some text")
    for inputs, out, named in (
        ([f"d={tmp_path / 'corrupt.jsonl.gz'}"], tmp_path / "o2", "corrupt.jsonl.gz"),
        ([f"d={tmp_path / 'cut.jsonl.gz'}"], tmp_path / "o2", "cut.jsonl.gz"),
        ([f"d={tmp_path / 'ok.txt'}"], tmp_path / "afile", "afile"),
        ([f"d={tmp_path / 'ok.txt'}"], tmp_path / "afile" / "sub", "afile"),
    ):
        rc = cli.main(["prepare", *inputs, "-o", str(out), "--no-progress"])
        err = capsys.readouterr().err
        assert rc == 2 and named in err and "Traceback" not in err
        assert not (tmp_path / "o2" / "d.bin").exists()
    assert parse_inputs(["web=a.jsonl,b.jsonl", "dir/code.txt"]) == {
        "web": ["a.jsonl", "b.jsonl"],
        "code": ["dir/code.txt"],
    }



def test_a_path_with_a_comma_is_one_file_when_it_exists(tmp_path):
    # It was split into "x" and "y.txt" (neither a file): such a path could not be given.
    odd = tmp_path / "x,y.txt"
    odd.write_text("hi")
    other = tmp_path / "z.txt"
    other.write_text("yo")
    assert parse_inputs([f"web={odd}", str(odd)]) == {"web": [str(odd)], "x,y": [str(odd)]}
    # a list of existing files is still split
    assert parse_inputs([f"web={other},{other}"]) == {"web": [str(other), str(other)]}
    out = tmp_path / "out"
    assert cli.main(["prepare", f"web={odd}", "-o", str(out), "--no-progress"]) == 0
    assert TokenCorpus.from_dir(out).tokens == {"web": 3}

def test_json_nested_too_deeply_is_clear(tmp_path, capsys):
    # json raises RecursionError (not a JSON error) past the recursion limit: still one line.
    deep = "[" * 100_000 + "\n"
    (tmp_path / "deep.jsonl").write_text('{"text": "ok"}\n' + deep)
    (tmp_path / "ok.txt").write_text("fine")
    (tmp_path / "o2").mkdir()
    (tmp_path / "o2" / "corpus.json").write_text(deep)
    for inputs, out, named in (
        (f"d={tmp_path / 'deep.jsonl'}", tmp_path / "o1", "deep.jsonl', line 2: invalid JSON"),
        (f"d={tmp_path / 'ok.txt'}", tmp_path / "o2", "corpus.json' cannot be read"),
    ):
        rc = cli.main(["prepare", inputs, "-o", str(out), "--no-progress"])
        err = capsys.readouterr().err
        assert rc == 2 and named in err and "nested too deeply" in err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1
        assert not (out / "d.bin").exists()


def test_tokenizer_specs(monkeypatch):
    import sys

    tok = get_tokenizer("byte")
    assert tok.dtype == np.dtype("<u2") and tok.eos_id == 256
    assert tok.encode("é").tolist() == [195, 169]
    with pytest.raises(ValueError, match="must be 'byte'"):
        get_tokenizer("sentencepiece:x")
    for spec, package in (("tiktoken:gpt2", "tiktoken"), ("hf:gpt2", "tokenizers")):
        monkeypatch.setitem(sys.modules, package, None)  # as if not installed, installed or not
        with pytest.raises(ValueError, match=f"needs the '{package}' package"):
            get_tokenizer(spec)


def test_a_custom_tokenizer_is_checked_when_made(tmp_path):
    def encode(text):
        return [1, 69_999]

    # An id past 2**32 would wrap in the uint32 token file; an eos_id past the vocabulary gave
    # numpy's OverflowError from inside prepare_domain.
    for vocab, eos, error, message in (
        (2**41, 256, ValueError, "'t': vocab_size must be between 1 and 2[*][*]32"),
        (0, 0, ValueError, "vocab_size must be between 1"),
        (257, 70_000, ValueError, r"'t': eos_id must be an id of the vocabulary \(0 to 256\)"),
        (257, 257, ValueError, "eos_id must be an id"),
        (257, -1, ValueError, "eos_id must be an id"),
        (257.0, 256, TypeError, "'t': vocab_size must be an integer, got float"),
        (257, True, TypeError, "eos_id must be an integer, got bool"),
    ):
        with pytest.raises(error, match=message):
            Tokenizer("t", encode, vocab, eos)
    with pytest.raises(TypeError, match="encode must be callable"):
        Tokenizer("t", None, 257, 256)
    with pytest.raises(TypeError, match="name must be a non-empty string"):
        Tokenizer("", encode, 257, 256)
    tok = Tokenizer("t", encode, np.int64(70_000), np.uint32(0))  # numpy integers are fine
    assert type(tok.vocab_size) is int and tok.dtype == np.dtype("<u4")
    assert prepare_domain("x", ["a"], tmp_path, tok)["tokens"] == 3
    manifest = json.loads((tmp_path / "corpus.json").read_text())
    assert manifest["vocab_size"] == 70_000 and manifest["dtype"] == "uint32"
    assert TokenCorpus.from_dir(tmp_path).tokens_of(0).tolist() == [1, 69_999, 0]
    largest = Tokenizer("t", encode, 2**32, 2**32 - 1)  # the largest a uint32 file can hold
    assert largest.dtype == np.dtype("<u4")


def test_tokenizer_output_is_checked(tmp_path):
    # Cast to the file's dtype, floats were truncated ([1.7, 2.2] -> [1, 2]) and what does not
    # fit wrapped: every id must be an integer of the vocabulary, or nothing is written.
    for returned, message in (
        ([1.7, 2.2], "token ids must be integers, got float 1.7"),
        (np.array([1.5, 2.0]), "token ids must be integers, got float 1.5"),
        (np.array([1.0, np.nan]), "token ids must be integers, got float 1.0"),
        ([True, False], "token ids must be integers, got bool True"),
        (["1"], "token ids must be integers, got str '1'"),
        ([1, None], "token ids must be integers, got NoneType None"),
        ([1, 257], r"id 257 is outside the vocabulary \(0 to 256\)"),
        ([-1, 2], "id -1 is outside the vocabulary"),
        ([2**64 + 1], f"id {2**64 + 1} is outside"),
        ([-1, 2**63], "id -1 is outside"),
        (np.array([2**40], dtype=np.int64), f"id {2**40} is outside"),
        ([[1, 2]], r"encode must return a flat sequence of ids, got list of shape \(1, 2\)"),
        ([[1, 2], [3]], "encode returned no flat sequence of ids"),
        (None, "encode must return a flat sequence of ids, got NoneType"),
        (7, "encode must return a flat sequence of ids, got int"),
        ((i for i in [1]), "encode must return a flat sequence of ids, got generator"),
    ):
        tok = Tokenizer("custom", lambda text, r=returned: r, 257, 256)
        with pytest.raises(ValueError, match=r"tokenizer 'custom' \(domain 'x'\): " + message):
            prepare_domain("x", ["a"], tmp_path, tok)
        assert list(tmp_path.iterdir()) == []
    # integers of any integer type (an object array of ints too) are fine
    # (a float array of whole numbers too: some tokenizers hand ids back as floats)
    for returned in ([1, 2], np.array([1, 2], dtype=np.int8), np.array([1, 2], dtype=object),
                     np.array([1.0, 2.0])):
        tok = Tokenizer("custom", lambda text, r=returned: r, 257, 256)
        prepare_domain("x", ["a"], tmp_path, tok)
        assert TokenCorpus.from_dir(tmp_path).tokens_of(0).tolist() == [1, 2, 256]


def test_mismatched_tokenizer_is_refused(tmp_path, capsys):
    prepare_domain("a", ["x"], tmp_path)
    manifest = json.loads((tmp_path / "corpus.json").read_text())
    manifest["tokenizer"] = "tiktoken:gpt2"
    (tmp_path / "corpus.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="cannot add domains tokenised with 'byte'"):
        prepare_domain("b", ["y"], tmp_path)
    # the same spec, but another vocabulary or end-of-document id (a file replaced since)
    for key, value in (("vocab_size", 300), ("eos_id", 0)):
        prepare_domain("a", ["x"], tmp_path / key)
        manifest = json.loads((tmp_path / key / "corpus.json").read_text())
        manifest[key] = value
        (tmp_path / key / "corpus.json").write_text(json.dumps(manifest))
        with pytest.raises(ValueError, match="cannot add domains tokenised with 'byte'"):
            prepare_domain("b", ["y"], tmp_path / key)
    # valid JSON that is not a manifest object
    (tmp_path / "list").mkdir()
    (tmp_path / "list" / "corpus.json").write_text("[]")
    with pytest.raises(ValueError, match="is not a fastmix-corpus manifest"):
        prepare_domain("b", ["y"], tmp_path / "list")
    # bytes that are not UTF-8: the file is named (the decoder's message names no file)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "corpus.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(ValueError, match=r"bin/corpus.json' cannot be read: not UTF-8"):
        prepare_domain("b", ["y"], tmp_path / "bin")
    (tmp_path / "y.txt").write_text("y")
    rc = cli.main(
        ["prepare", str(tmp_path / "y.txt"), "-o", str(tmp_path / "bin"), "--no-progress"]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "bin/corpus.json' cannot be read: not UTF-8" in err


def test_input_formats_are_read_as_written(tmp_path, recwarn):
    # .ndjson.gz is JSON lines; a BOM is not part of the JSON; plain text keeps its \r\n
    with gzip.open(tmp_path / "a.ndjson.gz", "wt") as f:
        f.write(json.dumps({"text": "one"}) + "\n" + json.dumps({"text": "two"}) + "\n")
    (tmp_path / "b.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps({"text": "bom"}).encode())
    (tmp_path / "c.txt").write_bytes(b"line\r\nnext\rend\n")
    manifest = prepare_corpus(
        {"a": tmp_path / "a.ndjson.gz", "b": tmp_path / "b.jsonl", "c": tmp_path / "c.txt"},
        tmp_path / "out", show_progress=False,
    )  # fmt: skip
    assert manifest["domains"]["a"]["documents"] == 2
    corpus = TokenCorpus.from_dir(tmp_path / "out")
    assert corpus.tokens_of(1).tolist() == list(b"bom") + [256]
    assert corpus.tokens_of(2).tolist() == list(b"line\r\nnext\rend\n") + [256]
    assert not recwarn.list
    # bytes that are not UTF-8 are replaced, and the file is named in a warning
    (tmp_path / "d.txt").write_bytes(b"caf\xe9")
    with pytest.warns(RuntimeWarning, match="d.txt.*1 byte sequence"):
        prepare_corpus({"d": tmp_path / "d.txt"}, tmp_path / "out", show_progress=False)
    assert TokenCorpus.from_dir(tmp_path / "out").tokens_of(3).tolist() == (
        list("caf\ufffd".encode()) + [256]
    )


def test_utf16_and_utf32_inputs_are_refused(tmp_path, capsys):
    # Read as UTF-8, UTF-16 text (Windows' "Unicode", PowerShell 5's `>`) is ASCII with a NUL
    # after each character: it was tokenised so, with a warning about 2 bytes only.
    text = "hello\r\nworld\r\n"
    for name, data, encoding in (
        ("a.txt", text.encode("utf-16"), "UTF-16"),
        ("b.txt", codecs.BOM_UTF16_BE + text.encode("utf-16-be"), "UTF-16"),
        ("c.jsonl", '{"text": "x"}\n'.encode("utf-16"), "UTF-16"),
        ("d.txt", text.encode("utf-32"), "UTF-32"),
        ("e.txt.gz", gzip.compress(text.encode("utf-16")), "UTF-16"),
    ):
        (tmp_path / name).write_bytes(data)
        rc = cli.main(["prepare", f"x={tmp_path / name}", "-o", str(tmp_path / "o"),
                       "--no-progress"])
        err = capsys.readouterr().err
        assert rc == 2 and f"{name}' is {encoding} text" in err and "save it as UTF-8" in err
        assert not (tmp_path / "o" / "x.bin").exists()
    # Text that merely starts with those characters in UTF-8 is text, and an empty file is empty.
    (tmp_path / "f.txt").write_text("\u00ff\u00fe after")
    (tmp_path / "g.txt").write_bytes(b"")
    (tmp_path / "h.txt").write_bytes(b"\xff")
    with pytest.warns(RuntimeWarning, match="h.txt.*1 byte sequence"):
        manifest = prepare_corpus({"f": tmp_path / "f.txt", "h": [tmp_path / "g.txt",
                                   tmp_path / "h.txt"]}, tmp_path / "o", show_progress=False)
    assert manifest["domains"]["f"]["documents"] == 1


def test_lone_surrogates_are_replaced_with_a_warning(tmp_path, recwarn):
    # UTF-8 cannot hold a lone surrogate: the byte tokenizer wrote a silent "?" for one.
    fffd = list("\ufffd".encode())
    with pytest.warns(RuntimeWarning, match=r"domain 'x': 3 lone surrogate\(s\)"):
        prepare_domain("x", ["a\ud800b", "ok", "\udc00\ud800\ud83d\ude00"], tmp_path / "o")
    assert TokenCorpus.from_dir(tmp_path / "o").tokens_of(0).tolist() == (
        [97, *fffd, 98, 256, 111, 107, 256, *fffd, *fffd, *"😀".encode(), 256]
    )  # a high-low pair is the character it spells
    # a JSON escape makes one; another tokenizer gets the replaced text too
    (tmp_path / "s.jsonl").write_text('{"text": "caf\\udce9"}\n')
    seen = []
    tok = Tokenizer("custom", lambda text: seen.append(text) or [1], 257, 256)
    with pytest.warns(RuntimeWarning, match="domain 's': 1 lone surrogate"):
        prepare_domain("s", read_documents(tmp_path / "s.jsonl"), tmp_path / "c", tok)
    assert seen == ["caf\ufffd"]
    assert get_tokenizer("byte").encode("a\ud800").tolist() == [97, *fffd]  # not "?"
    # text without any (U+FFFD itself, other non-ASCII) gets no warning and is kept as it is
    recwarn.clear()
    prepare_domain("y", ["\ufffd é 😀"], tmp_path / "o")
    assert not recwarn.list
    assert TokenCorpus.from_dir(tmp_path / "o").tokens_of(1).tolist() == (
        list("\ufffd é 😀".encode()) + [256]
    )


def test_concurrent_runs_into_one_directory_keep_every_domain(tmp_path):
    import subprocess
    import sys

    script = (
        "import sys; from fastmix.prepare import prepare_domain\n"
        "for i in range(150): prepare_domain(f'{sys.argv[1]}{i}', ['x' * i + 'y'], sys.argv[2])\n"
    )
    runs = [subprocess.Popen([sys.executable, "-c", script, tag, str(tmp_path)])
            for tag in ("a", "b")]  # fmt: skip
    assert [r.wait(timeout=120) for r in runs] == [0, 0]
    manifest = json.loads((tmp_path / "corpus.json").read_text())
    assert sorted(manifest["domains"]) == sorted(f"{t}{i}" for t in "ab" for i in range(150))
    assert len(TokenCorpus.from_dir(tmp_path).names) == 300


def test_long_domain_names_and_tokenizer_load_errors(tmp_path):
    with pytest.raises(ValueError, match="at most 200 bytes"):
        prepare_domain("d" * 260, ["x"], tmp_path)
    tokenizers = pytest.importorskip("tokenizers")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="cannot be loaded"):
        get_tokenizer(f"hf:{tmp_path / 'bad.json'}")
    # Text spelling the end-of-document token stays text: it must not forge a boundary.
    from tokenizers import models, pre_tokenizers

    tok = tokenizers.Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<|endoftext|>"])
    tok.save(str(tmp_path / "tok.json"))
    spec = get_tokenizer(f"hf:{tmp_path / 'tok.json'}")
    if not hasattr(tokenizers.Tokenizer, "encode_special_tokens"):
        pytest.skip("tokenizers < 0.19 cannot keep special-token text as text")
    ids = list(spec.encode("a <|endoftext|> b"))
    assert spec.eos_id not in ids and ids[0] == 0 and ids[-1] == 1


def test_sigterm_exits_cleanly_and_leaves_no_temporary_file(tmp_path, monkeypatch, capsys):
    # timeout, Slurm and docker stop send SIGTERM: it used to kill the process where it stood,
    # leaving a .<domain>.bin.tmp-* file behind for good.
    import os
    import signal

    from fastmix import prepare

    encode, calls = prepare._byte_encode, []

    def encode_then_terminate(text):
        calls.append(text)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return encode(text)

    monkeypatch.setattr(prepare, "_byte_encode", encode_then_terminate)
    (tmp_path / "web.txt").write_text("\n".join(["a document"] * 20))
    out = tmp_path / "out"
    argv = ["prepare", f"web={tmp_path / 'web.txt'}", "--lines", "-o", str(out), "--no-progress"]
    before = signal.getsignal(signal.SIGTERM)
    assert cli.main(argv) == 128 + signal.SIGTERM
    assert "fastmix: terminated" in capsys.readouterr().err
    assert len(calls) == 3 and [p.name for p in out.iterdir() if ".tmp-" in p.name] == []
    assert signal.getsignal(signal.SIGTERM) == before  # restored


def test_a_run_that_loses_a_race_leaves_the_token_file_alone(tmp_path, monkeypatch):
    # The token file was renamed into place before the manifest was read again under the lock:
    # a run that then met another tokenizer's corpus.json raised "cannot add domains", yet its
    # byte tokens had replaced the other run's file, listed under the other tokenizer.
    from fastmix import prepare

    other = Tokenizer("other", lambda text: [5] * len(text), 300, 299)

    def documents():
        yield "ab"
        prepare_domain("web", ["xy"], tmp_path / "a", other)  # another run, meanwhile

    with pytest.raises(ValueError, match="cannot add domains tokenised with 'byte'"):
        prepare_domain("web", documents(), tmp_path / "a")
    assert TokenCorpus.from_dir(tmp_path / "a").tokens_of(0).tolist() == [5, 5, 299]
    assert [p.name for p in (tmp_path / "a").iterdir() if ".tmp-" in p.name] == []
    # Two runs of one domain: the file and the manifest entry come from the same run (the one
    # renaming first lost its entry to the other's, which listed another token count).
    lock, calls = prepare._manifest_lock, []

    def lock_after_another_run(out):
        calls.append(out)
        if len(calls) == 1:
            prepare_domain("web", ["a longer text"], out)
        return lock(out)

    monkeypatch.setattr(prepare, "_manifest_lock", lock_after_another_run)
    prepare_domain("web", ["short"], tmp_path / "b")
    corpus = TokenCorpus.from_dir(tmp_path / "b")  # (said: 'web' has 14 tokens, files hold 6)
    assert corpus.tokens == {"web": len("short") + 1} and len(calls) == 2


def test_bad_domain_specs_and_out_dir_name_what_is_wrong(tmp_path):
    # These raised TypeErrors from deep inside pathlib ("'int' object is not iterable",
    # "expected str, bytes or os.PathLike object, not int") naming no domain or argument, and
    # bytes, a path everywhere else, were iterated into ints.
    (tmp_path / "a.txt").write_text("hello")
    out = tmp_path / "out"
    for domains, error, message in (
        ({"web": 5}, TypeError, "domain 'web': expected an input file or a list of them, got int"),
        ({"web": [5]}, TypeError, "domain 'web': an input file must be a path, got 5"),
        ({"web": [str(tmp_path / "a.txt"), None]}, TypeError, "must be a path, got None"),
        ({"web": []}, ValueError, "domain 'web' lists no input files"),
        # a set's order changes with PYTHONHASHSEED: the tokens' order changed per process
        ({"web": {str(tmp_path / "a.txt"), "b.txt"}}, TypeError,
         "domain 'web': a set of input files has no fixed order"),
    ):
        with pytest.raises(error, match=message):
            prepare_corpus(domains, out, show_progress=False)
        assert not out.exists()  # refused before anything is made
    for out_dir in (None, 5):
        with pytest.raises(TypeError, match="out_dir must be a path"):
            prepare_corpus({"web": tmp_path / "a.txt"}, out_dir, show_progress=False)
        with pytest.raises(TypeError, match="out_dir must be a path"):
            prepare_domain("web", ["x"], out_dir)
    manifest = prepare_corpus(
        {"web": bytes(tmp_path / "a.txt"), "two": (tmp_path / "a.txt", bytes(tmp_path / "a.txt"))},
        out,
        show_progress=False,
    )
    assert manifest["domains"]["web"]["sources"] == [str(tmp_path / "a.txt")]
    assert manifest["domains"]["two"]["sources"] == [str(tmp_path / "a.txt")] * 2
    assert TokenCorpus.from_dir(out).tokens == {"web": 6, "two": 12}


def test_an_integer_past_the_digit_limit_names_the_file(tmp_path, capsys):
    # int() refuses more than 4300 digits with a plain ValueError, not a JSON error: the message
    # named no file and no line (a metadata field of a JSONL record, or a corpus.json).
    huge = "9" * 5000
    (tmp_path / "big.jsonl").write_text(f'{{"text": "a"}}\n{{"text": "b", "id": {huge}}}\n')
    (tmp_path / "ok.txt").write_text("fine")
    (tmp_path / "o2").mkdir()
    (tmp_path / "o2" / "corpus.json").write_text(f'{{"format": "fastmix-corpus", "n": {huge}}}')
    for inputs, out, named in (
        (f"d={tmp_path / 'big.jsonl'}", tmp_path / "o1", "big.jsonl', line 2: invalid JSON"),
        (f"d={tmp_path / 'ok.txt'}", tmp_path / "o2", "corpus.json' cannot be read"),
    ):
        rc = cli.main(["prepare", inputs, "-o", str(out), "--no-progress"])
        err = capsys.readouterr().err
        assert rc == 2 and named in err and "digits" in err
        assert not (out / "d.bin").exists()


def test_an_empty_out_dir_is_refused(tmp_path, monkeypatch, capsys):
    # Path("") is ".": `-o "$OUT"` with OUT unset scattered token files over the current folder.
    (tmp_path / "web.txt").write_text("hello")
    monkeypatch.chdir(tmp_path)
    rc = cli.main(["prepare", "web.txt", "-o", "", "--no-progress"])
    assert rc == 2 and "out_dir: empty path" in capsys.readouterr().err
    with pytest.raises(ValueError, match="out_dir: empty path"):
        prepare_domain("web", ["x"], "")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["web.txt"]
    assert prepare_domain("web", ["x"], ".")["tokens"] == 2  # the current folder, said so


def test_file_names_that_are_not_utf8(tmp_path, capsys):
    # A bare FILE named with bytes that are not UTF-8 made a domain name holding a lone
    # surrogate: the run wrote everything, then printing the summary to a strict UTF-8 stdout
    # (any UTF-8 locale but C) raised UnicodeEncodeError - a traceback after a success.
    import os

    src = tmp_path / os.fsdecode(b"caf\xe9.txt")
    src.write_text("hello")
    out = tmp_path / os.fsdecode(b"out\xff")
    rc = cli.main(["prepare", str(src), "-o", str(out), "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 2 and "domain name must be text UTF-8 can hold" in captured.err
    assert "DOMAIN=FILE" in captured.err and not out.exists()
    with pytest.raises(ValueError, match="UTF-8 can hold"):
        prepare_domain("caf\udce9", ["x"], tmp_path / "o")
    rc = cli.main(["prepare", f"web={src}", "-o", str(out), "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "web: 1 documents, 6 tokens" in captured.out and "out\\xff/corpus.json" in captured.out
    corpus = TokenCorpus.from_dir(out)
    assert corpus.tokens == {"web": 6}
    assert corpus.manifest["domains"]["web"]["sources"] == [str(src)]


def test_a_json_array_is_named_as_such(tmp_path, capsys):
    # A .json file holding one JSON array (a common export) said "no 'text' field (choose the
    # field with --text-field)": no field choice helps; say what the file is.
    (tmp_path / "arr.json").write_text('[{"text": "a"}, {"text": "b"}]\n')
    (tmp_path / "str.jsonl").write_text('{"text": "a"}\n"just text"\n')
    for name, line, kind in (("arr.json", 1, "list"), ("str.jsonl", 2, "str")):
        argv = ["prepare", f"d={tmp_path / name}", "-o", str(tmp_path / "o"), "--no-progress"]
        rc = cli.main(argv)
        err = capsys.readouterr().err
        assert rc == 2 and f"{name}', line {line}: a JSON {kind}, not an object" in err
        assert "--text-field" not in err


def test_domain_names_one_file_apart_only_in_case_are_refused(tmp_path, capsys):
    # "Code" and "code" write Code.bin and code.bin: one file on a case-insensitive file system
    # (macOS, Windows), where the second prepare silently overwrote the first's tokens and
    # from_dir then said "a file is truncated or was replaced".
    import os

    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "b.txt").write_text("second")
    out = tmp_path / "out"
    clash = r"'code' and 'Code' .*differ only in letter case or Unicode normalisation"
    # several domains of one call: refused before anything is made
    with pytest.raises(ValueError, match=clash + r".*case-insensitive file system"):
        prepare_corpus(
            {"Code": tmp_path / "a.txt", "code": tmp_path / "b.txt"}, out, show_progress=False
        )
    assert not out.exists()
    rc = cli.main(
        ["prepare", f"Code={tmp_path / 'a.txt'}", str(tmp_path / "code.txt"), "-o", str(out),
         "--no-progress"]
    )  # fmt: skip
    assert rc == 2 and "'code' and 'Code'" in capsys.readouterr().err and not out.exists()
    # composed and decomposed accents: one name to macOS, which normalises file names
    with pytest.raises(ValueError, match="Unicode normalisation"):
        prepare_corpus(
            {"caf\u00e9": tmp_path / "a.txt", "cafe\u0301": tmp_path / "b.txt"},
            out,
            show_progress=False,
        )
    assert not out.exists()
    # against a domain already listed in corpus.json
    prepare_domain("Code", ["abc"], out)
    before = (out / "Code.bin").read_bytes()
    with pytest.raises(ValueError, match=clash + r".*'Code' is already in corpus.json"):
        prepare_domain("code", ["x"], out)
    with pytest.raises(ValueError, match=r"'CODE' and 'Code'"):
        prepare_corpus(
            {"web": tmp_path / "a.txt", "CODE": tmp_path / "b.txt"}, out, show_progress=False
        )
    assert sorted(os.listdir(out)) == ["Code.bin", "corpus.json"]  # web was not written either
    assert (out / "Code.bin").read_bytes() == before
    # the same name again is the same domain, prepared again
    assert prepare_domain("Code", ["abcd"], out)["tokens"] == 5
    assert TokenCorpus.from_dir(out).tokens == {"Code": 5}


def test_a_domain_name_clash_added_by_another_run_meanwhile_is_refused(tmp_path):
    # The manifest read again under the lock may list a domain another run added since.
    def documents():
        yield "ab"
        prepare_domain("Web", ["xyz"], tmp_path)  # another run, meanwhile

    with pytest.raises(ValueError, match=r"'web' and 'Web'"):
        prepare_domain("web", documents(), tmp_path)
    assert TokenCorpus.from_dir(tmp_path).tokens == {"Web": 4}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Web.bin", "corpus.json"]


def test_a_file_another_domain_lists_is_not_overwritten(tmp_path):
    # A hand-written corpus.json may list any file for a domain: preparing a domain whose token
    # file has that name (or one differing only in case) replaced the other domain's tokens.
    prepare_domain("web", ["abc"], tmp_path)
    manifest = json.loads((tmp_path / "corpus.json").read_text())
    (tmp_path / "web.bin").rename(tmp_path / "Shared.bin")
    manifest["domains"]["web"]["files"] = ["Shared.bin"]
    (tmp_path / "corpus.json").write_text(json.dumps(manifest))
    for name in ("Shared", "shared"):
        with pytest.raises(ValueError, match=rf"domain '{name}' would write '{name}.bin', .*"
                           r"lists 'Shared.bin' for domain 'web'"):  # fmt: skip
            prepare_domain(name, ["x"], tmp_path)
    assert TokenCorpus.from_dir(tmp_path).tokens == {"web": 4}


def test_an_input_that_is_a_file_the_run_writes_is_refused(tmp_path, capsys):
    # `web=out/web.bin -o out` read the file while writing its replacement, then replaced it:
    # a text file named like the token file (or an earlier run's tokens) was lost.
    out = tmp_path / "out"
    out.mkdir()
    (out / "web.bin").write_text("my text, not tokens")
    (tmp_path / "a.txt").write_text("abc")
    (tmp_path / "link.txt").symlink_to(out / "web.bin")
    for inputs in ([f"web={out / 'web.bin'}"], [f"a={tmp_path / 'a.txt'}", str(out / "web.bin")],
                   [f"a={tmp_path / 'link.txt'}", f"web={tmp_path / 'a.txt'}"]):
        rc = cli.main(["prepare", *inputs, "-o", str(out), "--no-progress"])
        err = capsys.readouterr().err
        assert rc == 2 and "is the token file of domain 'web'" in err and "would be lost" in err
        assert (out / "web.bin").read_text() == "my text, not tokens"
        assert not (out / "corpus.json").exists() and not (out / "a.bin").exists()
    # corpus.json as an input (it is rewritten), and after a run its token files.
    prepare_corpus({"b": str(tmp_path / "a.txt")}, out, show_progress=False)
    for spec in ({"c": str(out / "corpus.json")}, {"b": str(out / "b.bin")}):
        with pytest.raises(ValueError, match=r"input .* is (corpus.json|the token file of "
                                             r"domain 'b') in .*: the input would be lost"):
            prepare_corpus(spec, out, show_progress=False)
    assert TokenCorpus.from_dir(out).tokens == {"b": 4}
    # Another domain's token file, not rewritten by this run, is an input like any other file.
    prepare_corpus({"d": str(out / "b.bin")}, out, show_progress=False)


def test_lines_splits_plain_text_and_leaves_jsonl_records_whole(tmp_path, capsys):
    # A JSONL record is one document whatever --lines, so text and JSONL go in one run; the
    # help says so (it read "plain text: one document per non-empty line", and nothing on JSONL).
    (tmp_path / "t.txt").write_text("one\n\ntwo\n")
    (tmp_path / "r.jsonl").write_text(json.dumps({"text": "a\nb"}) + "\n")
    out = tmp_path / "out"
    argv = ["prepare", f"mixed={tmp_path / 't.txt'},{tmp_path / 'r.jsonl'}", "--lines",
            "-o", str(out), "--no-progress"]  # fmt: skip
    assert cli.main(argv) == 0
    assert "mixed: 3 documents" in capsys.readouterr().out
    assert TokenCorpus.from_dir(out).tokens_of(0).tolist() == [
        *b"one", 256, *b"two", 256, *b"a\nb", 256
    ]
    with pytest.raises(SystemExit):
        cli.main(["prepare", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "a JSONL record is always one document, whatever --lines" in help_text


def test_the_progress_bar_follows_the_bytes_read_and_never_passes_its_total(tmp_path, monkeypatch):
    # It counted the documents' characters: for a .gz input, several times the file's size, so
    # the bar ran to ~20x its total and fell back at the end of the file.
    import fastmix.prepare as prepare

    class Bar:
        def __init__(self, total):
            self.total, self.n, self.seen = total, 0, []

        def update(self, k):
            self.n += k
            self.seen.append(self.n)

        def refresh(self):
            self.seen.append(self.n)

        def set_description(self, name):
            pass

        def close(self):
            pass

    bars = []
    monkeypatch.setattr(prepare, "_progress", lambda total, enabled: bars.append(Bar(total))
                        or bars[-1])  # fmt: skip
    # random hex: ~0.5 MB compressed, read in several 128 KiB chunks
    rng = np.random.default_rng(0)
    records = "".join(json.dumps({"text": rng.bytes(100).hex()}) + "\n" for i in range(5000))
    (tmp_path / "big.jsonl.gz").write_bytes(gzip.compress(records.encode()))
    (tmp_path / "small.txt").write_text("hello\n" * 50)
    prepare_corpus({"web": [tmp_path / "big.jsonl.gz"], "txt": tmp_path / "small.txt"},
                   tmp_path / "out")  # fmt: skip
    (bar,) = bars
    assert bar.total == sum(p.stat().st_size for p in tmp_path.glob("*.*") if p.is_file())
    assert max(bar.seen) == bar.total == bar.n
    assert bar.seen == sorted(bar.seen)  # only forward
    assert len(set(bar.seen)) > 3  # moved within the .gz file, not only at its end
