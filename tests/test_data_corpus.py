"""TokenCorpus and load_weights: formats, sizes, windows and bad input."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from fastmix.data import CorpusError, TokenCorpus, load_weights

# DoReMi's published weight configs (reference data beside the project; tests skip without it).
PUBLISHED = Path(__file__).resolve().parents[2] / "shared" / "data" / "doremi"


def write_bin(path, tokens, dtype="<u2"):
    np.asarray(tokens, dtype=dtype).tofile(path)
    return path


def test_bin_and_npy_files_sizes_and_windows(tmp_path):
    a1 = write_bin(tmp_path / "a1.bin", np.arange(21))  # 21 tokens -> (21 - 1) // 4 = 5 windows
    a2 = write_bin(tmp_path / "a2.bin", np.arange(100, 110))  # 10 tokens -> 2 windows
    b = tmp_path / "b.npy"
    np.save(b, np.arange(1000, 1017, dtype=np.uint32))  # 17 tokens -> 4 windows
    corpus = TokenCorpus({"a": [a1, a2], "b": str(b)}, dtype="uint16")
    assert corpus.names == ["a", "b"]
    assert corpus.tokens == {"a": 31, "b": 17}
    assert corpus.num_windows(4) == {"a": 7, "b": 4}
    n_windows, file_begin, ends = corpus.window_table(4)
    assert n_windows.tolist() == [7, 4] and file_begin.tolist() == [0, 2, 3]
    assert ends.tolist() == [5, 7, 4]
    assert corpus.read(1, 4, 5).tolist() == [104, 105, 106, 107, 108]
    assert corpus.read(2, 0, 3).tolist() == [1000, 1001, 1002]
    assert corpus.tokens_of(0).dtype == np.dtype("<u2") and isinstance(
        corpus.tokens_of(0), np.memmap
    )


def test_uint32_and_dtype_from_manifest(tmp_path):
    write_bin(tmp_path / "x.bin", [70000, 1, 2], dtype="<u4")
    (tmp_path / "corpus.json").write_text(
        json.dumps({"dtype": "uint32", "domains": {"x": {"files": ["x.bin"]}}})
    )
    corpus = TokenCorpus.from_dir(tmp_path)
    assert corpus.read(0, 0, 3).tolist() == [70000, 1, 2]
    assert corpus.manifest == {"dtype": "uint32", "domains": {"x": {"files": ["x.bin"]}}}
    assert TokenCorpus({"x": tmp_path / "x.bin"}).tokens == {"x": 3}  # dtype from the manifest
    # Not loaded from a directory: no manifest (the attribute was missing: AttributeError).
    assert TokenCorpus({"x": tmp_path / "x.bin"}).manifest is None
    # An explicit dtype that contradicts the manifest listing the file would misread every token.
    with pytest.raises(CorpusError, match=r"dtype='uint16' but .*corpus.json' says 'uint32'"):
        TokenCorpus({"x": tmp_path / "x.bin"}, dtype="uint16")
    assert TokenCorpus({"x": tmp_path / "x.bin"}, dtype="uint32").tokens == {"x": 3}
    # A file the manifest does not list, or a corpus.json that is not fastmix's: no opinion.
    write_bin(tmp_path / "y.bin", [1, 2])
    assert TokenCorpus({"y": tmp_path / "y.bin"}, dtype="uint16").tokens == {"y": 2}
    (tmp_path / "corpus.json").write_text("[1, 2]")
    assert TokenCorpus({"x": tmp_path / "x.bin"}, dtype="uint16").tokens == {"x": 6}
    for files in (3, "xx.bin"):  # not fastmix's shape: no crash, no substring match
        (tmp_path / "corpus.json").write_text(
            json.dumps({"dtype": "uint32", "domains": {"x": {"files": files}}})
        )
        assert TokenCorpus({"x": tmp_path / "x.bin"}, dtype="uint16").tokens == {"x": 6}


def test_raw_files_are_little_endian(tmp_path):
    path = write_bin(tmp_path / "x.bin", [1, 2, 3])
    with pytest.raises(ValueError, match="little-endian"):
        TokenCorpus({"x": path}, dtype=">u2")
    assert TokenCorpus({"x": path}, dtype="<u2").read(0, 0, 3).tolist() == [1, 2, 3]


def test_pickle_drops_memory_maps(tmp_path):
    import pickle

    corpus = TokenCorpus({"a": write_bin(tmp_path / "a.bin", np.arange(5000))}, dtype="uint16")
    corpus.read(0, 0, 10)
    blob = pickle.dumps(corpus)
    assert len(blob) < 2000  # the 10 kB of tokens did not travel
    assert pickle.loads(blob).read(0, 4990, 10).tolist() == list(range(4990, 5000))


def test_bad_files_name_domain_and_file(tmp_path):
    good = write_bin(tmp_path / "good.bin", np.arange(10))
    with pytest.raises(CorpusError, match=r"domain 'web', file .*missing.bin.*no such file"):
        TokenCorpus({"web": [good, tmp_path / "missing.bin"]}, dtype="uint16")
    (tmp_path / "odd.bin").write_bytes(b"\x00" * 7)
    with pytest.raises(CorpusError, match=r"domain 'code', file .*odd.bin.*not a multiple"):
        TokenCorpus({"code": tmp_path / "odd.bin"}, dtype="uint16")
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(CorpusError, match=r"domain 'e' is empty.*empty.bin"):
        TokenCorpus({"e": tmp_path / "empty.bin"}, dtype="uint16")
    (tmp_path / "adir").mkdir()
    with pytest.raises(CorpusError, match=r"domain 'd', file .*adir.*not a regular file"):
        TokenCorpus({"d": tmp_path / "adir"}, dtype="uint16")
    with pytest.raises(CorpusError, match=r"domain 'g', file .*good.bin.*needs dtype"):
        TokenCorpus({"g": good})
    with pytest.raises(ValueError, match="dtype must be 'uint16' or 'uint32'"):
        TokenCorpus({"g": good}, dtype="float32")
    np.save(tmp_path / "two_d.npy", np.zeros((2, 3), np.uint16))
    with pytest.raises(CorpusError, match=r"domain 'm', file .*two_d.npy.*1-D integer"):
        TokenCorpus({"m": tmp_path / "two_d.npy"})
    with pytest.raises(CorpusError, match="lists no files"):
        TokenCorpus({"n": []})
    with pytest.raises(TypeError, match="non-empty mapping"):
        TokenCorpus({})
    with pytest.raises(CorpusError, match="no corpus.json"):
        TokenCorpus.from_dir(tmp_path)
    with pytest.raises(CorpusError, match=r"from_dir: .*good.bin' is not a directory"):
        TokenCorpus.from_dir(good)
    with pytest.raises(CorpusError, match=r"from_dir: .*nowhere' does not exist"):
        TokenCorpus.from_dir(tmp_path / "nowhere")
    big = np.array([1, 2**63 + 5], np.uint64)  # would come out negative as int64 input_ids
    np.save(tmp_path / "u64.npy", big)
    with pytest.raises(CorpusError, match=r"domain 'u', file .*u64.npy.*uint64"):
        TokenCorpus({"u": tmp_path / "u64.npy"})


def test_a_bin_file_starting_like_npy_is_raw(tmp_path):
    # The uint16 tokens 20115, 19797, 22864 (ids of a 50k vocabulary) are the bytes of the .npy
    # magic: a prepared domain whose first document began with them failed to load ("not a
    # valid .npy file"), as would any file its header happened to parse as.
    from fastmix.prepare import Tokenizer, prepare_domain

    magic = np.frombuffer(b"\x93NUMPY", "<u2").tolist()
    tok = Tokenizer("custom", lambda text: [*magic, len(text)], 50_257, 50_256)
    prepare_domain("web", ["a", "bb"], tmp_path, tok)
    corpus = TokenCorpus.from_dir(tmp_path)
    assert corpus.tokens_of(0).tolist() == [*magic, 1, 50_256, *magic, 2, 50_256]
    np.save(tmp_path / "real.npy", np.arange(5, dtype=np.int32))
    (tmp_path / "real.npy").rename(tmp_path / "real.tokens")  # another suffix: still sniffed
    assert TokenCorpus({"n": tmp_path / "real.tokens"}).tokens_of(0).tolist() == [0, 1, 2, 3, 4]


def test_an_empty_shard_reads_as_an_empty_array(tmp_path):
    # mmap refuses a length of 0: tokens_of on an empty .bin shard (a domain with other files
    # loads fine) raised numpy's bare "cannot mmap an empty file".
    write_bin(tmp_path / "full.bin", np.arange(10))
    (tmp_path / "empty.bin").write_bytes(b"")
    np.save(tmp_path / "empty.npy", np.zeros(0, np.int32))
    corpus = TokenCorpus(
        {"a": [tmp_path / "empty.bin", tmp_path / "full.bin", tmp_path / "empty.npy"]},
        dtype="uint16",
    )
    assert corpus.num_windows(4) == {"a": 2}
    for i, dtype in ((0, np.uint16), (2, np.int32)):
        tokens = corpus.tokens_of(i)
        assert tokens.dtype == dtype and tokens.shape == (0,) and not tokens.flags.writeable
    assert corpus.read(0, 0, 0).tolist() == [] and corpus.read(1, 8, 2).tolist() == [8, 9]
    fresh = TokenCorpus({"a": [tmp_path / "empty.bin", tmp_path / "full.bin"]}, dtype="uint16")
    write_bin(tmp_path / "other.bin", [1, 2])
    os.replace(tmp_path / "other.bin", tmp_path / "empty.bin")  # still checked when replaced
    with pytest.raises(CorpusError, match=r"empty.bin' has changed since the corpus was opened"):
        fresh.tokens_of(0)


def test_corpus_specs_and_reads_are_checked(tmp_path):
    write_bin(tmp_path / "a.bin", np.arange(10))
    for spec in (5, None):
        with pytest.raises(TypeError, match="domain 'a': expected a path or a list of paths"):
            TokenCorpus({"a": spec}, dtype="uint16")
    corpus = TokenCorpus({"a": os.fsencode(tmp_path / "a.bin")}, dtype="uint16")  # bytes path
    assert corpus.read(0, 7, 3).tolist() == [7, 8, 9]
    # read(-1, ...) used to read the last file, read(0, -5, 5) gave an empty array
    for args, error, match in [
        ((-1, 0, 3), ValueError, r"file_index must be in \[0, 1\), got -1"),
        ((1, 0, 3), ValueError, "file_index"),
        ((0, -5, 5), ValueError, "offset must be >= 0"),
        ((0, 0, -1), ValueError, "length must be >= 0"),
        ((0, 8, 3), ValueError, "past the end of file 0"),
        ((0.0, 0, 3), TypeError, "file_index must be an int"),
    ]:
        with pytest.raises(error, match=match):
            corpus.read(*args)
    with pytest.raises(ValueError, match="file_index"):
        corpus.tokens_of(-1)
    # file_path(-1) (or True) named the last (second) file, file_path(1) raised an IndexError
    assert corpus.file_path(np.int64(0)) == tmp_path / "a.bin"
    for index, error in ((-1, ValueError), (1, ValueError), (True, TypeError), (0.0, TypeError)):
        with pytest.raises(error, match="file_index"):
            corpus.file_path(index)
    with pytest.raises(ValueError, match="no domain 'zz'"):
        corpus.domain_files("zz")


@pytest.mark.parametrize(
    "manifest, match",
    [
        ({"domains": {"a": {"files": ["a.bin"]}}}, "no 'dtype'"),
        ({"dtype": "uint16", "domains": {"a": {}}}, "domain 'a' needs 'files'"),
        ({"dtype": "uint16", "domains": {"a": {"files": "a.bin"}}}, "domain 'a' needs 'files'"),
        ({"dtype": "uint16", "domains": {"a": ["a.bin"]}}, "domain 'a' needs 'files'"),
        ({"dtype": "float32", "domains": {"a": {"files": ["a.bin"]}}}, "dtype must be"),
    ],
)
def test_a_malformed_manifest_is_a_corpus_error(tmp_path, manifest, match):
    write_bin(tmp_path / "a.bin", np.arange(10))
    (tmp_path / "corpus.json").write_text(json.dumps(manifest))
    with pytest.raises(CorpusError, match=match):
        TokenCorpus.from_dir(tmp_path)


def test_load_weights_every_source(tmp_path):
    names = ["a", "b", "c"]
    path = tmp_path / "weights.json"
    path.write_text(json.dumps({"weights": {"a": 0.5, "c": 1.5}, "meta": "ignored"}))
    assert load_weights(path, names).tolist() == [0.5, 0.0, 1.5]
    assert load_weights(str(path)) == {"a": 0.5, "c": 1.5}
    assert load_weights({"b": 2}, names).tolist() == [0.0, 2.0, 0.0]
    assert load_weights([1, 2, 3], names).tolist() == [1.0, 2.0, 3.0]
    assert load_weights(torch.tensor([1.0, 0.0, 1.0]), names).tolist() == [1.0, 0.0, 1.0]
    assert load_weights(np.array([3, 1, 0]), names).dtype == np.float64


def test_load_weights_reads_doremi_configs_and_a_domain_named_weights(tmp_path):
    # DoReMi's published configs hold {"train_domain_weights": {...}, "eval_domain_weights": {...}}:
    # they were refused ("weights['train_domain_weights'] must be a number"), and a plain mapping
    # with a domain named "weights" lost every other domain.
    names = ["a", "b", "weights"]
    path = tmp_path / "doremi.json"
    doremi = {"train_domain_weights": {"a": 0.25, "b": 0.75}, "eval_domain_weights": {"a": 1.0}}
    path.write_text(json.dumps(doremi))
    assert load_weights(path, names).tolist() == [0.25, 0.75, 0.0]
    path.write_text(json.dumps({"a": 0.5, "weights": 0.5}))
    assert load_weights(path, names).tolist() == [0.5, 0.0, 0.5]
    path.write_text(json.dumps({"weights": [1, 2, 3]}))
    assert load_weights(path, names).tolist() == [1.0, 2.0, 3.0]


@pytest.mark.parametrize(
    "config", sorted(PUBLISHED.glob("*.json")) or [None], ids=lambda p: p and p.name
)
def test_load_weights_reads_the_published_doremi_configs(config):
    if config is None:
        pytest.skip(f"no published configs at {PUBLISHED}")
    weights = load_weights(config)
    domains = json.loads(config.read_text())["train_domain_weights"]
    assert weights == domains and len(weights) in (7, 22)
    assert abs(sum(weights.values()) - 1) < 0.01  # published rounded to 4 decimals
    names = sorted(weights)
    assert load_weights(config, names).tolist() == [weights[n] for n in names]


def test_load_weights_bad_input(tmp_path):
    names = ["a", "b"]
    # A name twice gave one domain's weight twice: {"a": 1} under ["a", "a"] was [1, 1].
    with pytest.raises(ValueError, match="names must be distinct, got 'a' more than once"):
        load_weights({"a": 1}, ["a", "a"])
    with pytest.raises(ValueError, match="names must be distinct, got 'b' more than once"):
        load_weights([1, 2, 3], ("a", "b", "b"))
    for bad in ("ab", [1, 2], 5):
        with pytest.raises(TypeError, match="names must be a list of domain names"):
            load_weights([1, 2], bad)
    with pytest.raises(ValueError, match=r"unknown domains \['zzz'\]"):
        load_weights({"a": 1, "zzz": 1}, names)
    for raw in (b"\x01\x02", bytearray(b"\x01\x02")):  # a bytearray was the weights [1, 2]
        with pytest.raises(TypeError, match=f"weights must be a path.*got {type(raw).__name__}"):
            load_weights(raw, names)
    with pytest.raises(ValueError, match="2 domains"):
        load_weights([1, 2, 3], names)
    with pytest.raises(ValueError, match=r">= 0; domain 'b'"):
        load_weights([1, -1], names)
    with pytest.raises(ValueError, match="finite"):
        load_weights([1, float("nan")], names)
    with pytest.raises(ValueError, match="positive sum"):
        load_weights([0, 0], names)
    with pytest.raises(ValueError, match="does not exist"):
        load_weights(tmp_path / "nope.json", names)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read"):
        load_weights(tmp_path / "bad.json", names)
    # A domain listed twice in a file: json kept the second weight without a word.
    for text in ('{"a": 1, "b": 2, "a": 3}', '{"weights": {"a": 1, "a": 3}}'):
        (tmp_path / "twice.json").write_text(text)
        with pytest.raises(ValueError, match="cannot read .*the key 'a' appears twice"):
            load_weights(tmp_path / "twice.json", names)
    with pytest.raises(TypeError, match="must be a number"):
        load_weights({"a": "x"}, names)
    # Strings and booleans convert to floats, but they are not weights.
    with pytest.raises(TypeError, match=r"weights\['a'\] must be a number"):
        load_weights({"a": "0.5", "b": 1}, names)
    with pytest.raises(TypeError, match=r"weights\['b'\] must be a number"):
        load_weights({"a": 1, "b": True}, names)
    for bad in (["1", "2"], [True, False], [1 + 0j, 1], np.array(["1", "2"]), torch.tensor([True])):
        with pytest.raises(TypeError, match="real numbers"):
            load_weights(bad, names)
    with pytest.raises(ValueError, match="overflows"):
        load_weights([1e308, 1e308], names)
    with pytest.raises(ValueError, match=r"weights\['a'\] must be finite"):
        load_weights({"a": 10**400, "b": 1}, names)  # an int float64 cannot hold
    assert load_weights([2**70, 2**70], names).tolist() == [2.0**70] * 2  # ints past int64
    with pytest.raises(ValueError, match=r"weights\[0\] must be finite"):
        load_weights([10**400, 1], names)
    with pytest.raises(TypeError, match=r"weights\[1\] must be a number"):
        load_weights([2**70, "x"], names)
    with pytest.raises(TypeError, match="bool among them"):
        load_weights([True, 1], names)  # (numpy makes it [1, 1])
    (tmp_path / "bools.json").write_text("[true, 1]")
    with pytest.raises(TypeError, match="bool among them"):
        load_weights(tmp_path / "bools.json", names)
    with pytest.raises(TypeError, match="masked entries"):
        load_weights(np.ma.array([1.0, 9.0], mask=[0, 1]), names)  # the masked 9 was used
    assert load_weights(np.ma.array([1.0, 9.0]), names).tolist() == [1.0, 9.0]
    with pytest.raises(ValueError, match="meta tensor"):
        load_weights(torch.ones(2, device="meta"), names)
    # (numpy() refused a sparse tensor with torch's message, naming no argument)
    assert load_weights(torch.tensor([1.0, 3.0]).to_sparse(), names).tolist() == [1.0, 3.0]
    os.mkfifo(tmp_path / "fifo.json")  # opening it would wait for a writer forever
    for bad in ("fifo.json", "."):
        with pytest.raises(ValueError, match="not a regular file"):
            load_weights(tmp_path / bad, names)
    # JSON nested past the recursion limit, and bytes that are not UTF-8: named, not raw errors
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    (tmp_path / "latin1.json").write_bytes(b"\xff\xfe{}")
    for bad, why in (("deep.json", "nested too deeply"), ("latin1.json", "not UTF-8 text")):
        with pytest.raises(ValueError, match=f"{bad}.*{why}"):
            load_weights(tmp_path / bad, names)
        (tmp_path / "corpus.json").write_bytes((tmp_path / bad).read_bytes())
        with pytest.raises(CorpusError, match="corpus.json.* cannot be read"):
            TokenCorpus.from_dir(tmp_path)


class _CountingList(list):
    """A manifest's file list that counts how often it is searched or walked."""

    uses = 0

    def __contains__(self, item):
        _CountingList.uses += 1
        return super().__contains__(item)

    def __iter__(self):
        _CountingList.uses += 1
        return super().__iter__()


def test_from_dir_reads_the_manifest_listing_once_not_once_per_file(tmp_path, monkeypatch):
    # Each file's dtype check searched every domain's file list: O(files) per file, O(files^2)
    # for the corpus (20,000 files: 4 s of a 7 s from_dir; 100,000: minutes).
    import fastmix.data as data

    files = 300
    names = []
    for i in range(files):
        write_bin(tmp_path / f"s{i}.bin", [1, 2, 3])
        names.append(f"s{i}.bin")
    manifest = {
        "dtype": "uint16",
        "domains": {"a": {"files": names[:150]}, "b": {"files": names[150:]}},
    }
    (tmp_path / "corpus.json").write_text(json.dumps(manifest))
    read = data._read_manifest

    def counting(root):
        found = read(root)
        if found is not None:
            for info in found["domains"].values():
                info["files"] = _CountingList(info["files"])
        return found

    monkeypatch.setattr(data, "_read_manifest", counting)
    _CountingList.uses = 0
    corpus = TokenCorpus.from_dir(tmp_path)
    assert corpus.tokens == {"a": 450, "b": 450}
    assert _CountingList.uses <= 10, _CountingList.uses  # a few walks per domain, not per file
    # The check itself still applies: a listed file under another dtype is refused.
    with pytest.raises(CorpusError, match="says 'uint16'"):
        TokenCorpus({"a": tmp_path / "s0.bin"}, dtype="uint32")


def test_open_maps_are_bounded_and_reads_stay_right(tmp_path):
    # Every file read stayed mapped for the life of the process, each map holding a file
    # descriptor: a corpus of more files than the descriptor limit (1024 by default) ended in
    # "Too many open files" part-way through a run.
    files = [write_bin(tmp_path / f"f{i}.bin", np.arange(i * 10, i * 10 + 9)) for i in range(40)]
    corpus = TokenCorpus({"a": files[:25], "b": files[25:]}, dtype="uint16")
    corpus.max_open_maps = 4
    fd_dir = Path("/proc/self/fd")
    fds_before = len(os.listdir(fd_dir)) if fd_dir.is_dir() else None
    for _sweep in range(3):
        for i in range(40):
            assert corpus.read(i, 2, 3).tolist() == [i * 10 + 2, i * 10 + 3, i * 10 + 4]
    assert len(corpus._maps) <= 4
    if fds_before is not None:
        assert len(os.listdir(fd_dir)) <= fds_before + 4
    # The most recently read stay mapped: reading one again maps nothing new.
    held = corpus.tokens_of(39)
    assert corpus.tokens_of(39) is held
    # The default follows the descriptor limit, within [16, 32768].
    from fastmix.data import _max_open_maps

    assert 16 <= _max_open_maps(None) <= 32768 and _max_open_maps(7) == 7
    # A setting that is no count of files is an error naming it (0 meant 1, 2.7 meant 2), set on
    # the corpus or on the class.
    for bad, error in ((0, ValueError), (2.7, TypeError), ("64", TypeError), (True, TypeError)):
        with pytest.raises(error, match="TokenCorpus.max_open_maps"):
            corpus.max_open_maps = bad
        with pytest.raises(error, match="TokenCorpus.max_open_maps"):
            _max_open_maps(bad)
    corpus.max_open_maps = None  # back to the default
    assert corpus.read(5, 0, 1).tolist() == [50]


def _replace(path, tokens):
    """Give ``path``'s name to a new file, as `fastmix prepare` does (write, then rename)."""
    write_bin(path.with_suffix(".new"), tokens)
    os.replace(path.with_suffix(".new"), path)


def test_a_file_replaced_or_resized_since_opening_is_refused(tmp_path, monkeypatch):
    import pickle

    import fastmix.data

    path = write_bin(tmp_path / "a.bin", np.arange(10))
    corpus = TokenCorpus({"a": path}, dtype="uint16")
    blob = pickle.dumps(corpus)
    _replace(path, np.arange(100, 110))  # same size, other tokens
    with pytest.raises(CorpusError, match=r"a.bin' has changed since the corpus was opened"):
        corpus.read(0, 0, 3)
    assert TokenCorpus({"a": path}, dtype="uint16").read(0, 0, 3).tolist() == [100, 101, 102]
    # On another host inodes mean nothing, so only the size is compared there.
    monkeypatch.setattr(fastmix.data.socket, "gethostname", lambda: "elsewhere")
    assert pickle.loads(blob).read(0, 0, 3).tolist() == [100, 101, 102]
    _replace(path, np.arange(12))
    with pytest.raises(CorpusError, match=r"20 bytes then, 24 now"):
        pickle.loads(blob).read(0, 0, 3)
    monkeypatch.undo()
    # resized in place (same inode)
    corpus = TokenCorpus({"a": path}, dtype="uint16")
    with open(path, "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(CorpusError, match=r"24 bytes then, 26 now"):
        corpus.read(0, 0, 3)


def test_a_file_replaced_while_the_corpus_opens_it_is_not_read_as_the_old_one(
    tmp_path, monkeypatch
):
    """What the corpus records of a file (length, identity) comes from one open descriptor:
    replaced between the two, it read the new file under the old file's length."""
    path = write_bin(tmp_path / "a.bin", np.arange(10))
    manifest_beside = TokenCorpus._manifest_beside

    def replace_midway(self, p):  # called while a raw file is inspected
        _replace(path, np.arange(100, 120))
        return manifest_beside(self, p)

    monkeypatch.setattr(TokenCorpus, "_manifest_beside", replace_midway)
    corpus = TokenCorpus({"a": path}, dtype="uint16")
    monkeypatch.undo()
    assert corpus.tokens == {"a": 10}  # the file inspected
    with pytest.raises(CorpusError, match="has changed since the corpus was opened"):
        corpus.read(0, 0, 10)


def test_a_file_replaced_between_its_check_and_its_map_is_not_mapped(tmp_path, monkeypatch):
    path = write_bin(tmp_path / "a.bin", np.arange(10))
    corpus = TokenCorpus({"a": path}, dtype="uint16")
    memmap = np.memmap

    def replace_first(*args, **kwargs):
        _replace(path, np.arange(100, 110))
        return memmap(*args, **kwargs)

    monkeypatch.setattr(np, "memmap", replace_first)
    got = corpus.read(0, 0, 3).tolist()
    monkeypatch.undo()
    assert got == [0, 1, 2]  # the checked file (still open), not its replacement


def test_npy_headers_are_read_and_their_length_checked(tmp_path):
    np.save(tmp_path / "ok.npy", np.arange(50, dtype=">i4"))  # big-endian: read as such
    corpus = TokenCorpus({"ok": tmp_path / "ok.npy"})
    assert corpus.read(0, 47, 3).tolist() == [47, 48, 49]
    whole = (tmp_path / "ok.npy").read_bytes()
    (tmp_path / "short.npy").write_bytes(whole[:-6])  # cut inside the last tokens
    with pytest.raises(CorpusError, match=r"short.npy.*truncated .npy.*promises 50 tokens"):
        TokenCorpus({"s": tmp_path / "short.npy"})
    (tmp_path / "head.npy").write_bytes(whole[:40])  # cut inside the header
    (tmp_path / "magic.npy").write_bytes(b"\x93NUMPY\x09\x00" + whole[8:])  # version 9.0
    for bad in ("head.npy", "magic.npy"):
        with pytest.raises(CorpusError, match=rf"{bad}.*not a valid .npy file"):
            TokenCorpus({"b": tmp_path / bad})
    os.mkfifo(tmp_path / "fifo.npy")  # opening it would wait for a writer
    with pytest.raises(CorpusError, match="fifo.npy.*not a regular file"):
        TokenCorpus({"f": tmp_path / "fifo.npy"})


def test_from_dir_checks_each_domain_against_its_manifest(tmp_path):
    from fastmix.prepare import prepare_domain

    prepare_domain("web", ["hello world", "more text here"], tmp_path)
    prepare_domain("code", ["def f(): pass"], tmp_path)
    corpus = TokenCorpus.from_dir(tmp_path)
    web = corpus.files["web"][0]
    held = corpus.tokens["web"]
    tokens = np.fromfile(web, dtype=corpus._flat_dtypes[0])
    tokens[:-3].tofile(web)  # a copy cut short at a token boundary
    with pytest.raises(CorpusError, match=rf"domain 'web' has {held:,} tokens, its files .* hold"):
        TokenCorpus.from_dir(tmp_path)


def test_negative_ids_in_a_signed_file_are_refused_where_they_are_read(tmp_path):
    from fastmix.data import MixtureDataset

    ok = np.arange(400, dtype=np.int32)
    padded = ok.copy()
    padded[250] = -1  # a pad id saved with the tokens
    np.save(tmp_path / "ok.npy", ok)
    np.save(tmp_path / "padded.npy", padded)
    write_bin(tmp_path / "web.bin", np.arange(400))
    clean = TokenCorpus({"web": tmp_path / "web.bin", "code": tmp_path / "ok.npy"}, dtype="uint16")
    batches = list(MixtureDataset(clean, 9, [1, 1], batch_size=4, on_exhausted="stop"))
    assert len(batches) > 10 and min(int(b["input_ids"].min()) for b in batches) >= 0
    corpus = TokenCorpus({"web": tmp_path / "web.bin", "code": tmp_path / "padded.npy"},
                         dtype="uint16")
    with pytest.raises(CorpusError, match=r"padded.npy' holds a negative token id \(-1\) in "
                                          r"tokens \[\d+, \d+\): token ids must be >= 0"):
        list(MixtureDataset(corpus, 9, [1, 1], batch_size=4, on_exhausted="stop"))
    assert corpus.read(1, 250, 1).tolist() == [-1]  # the raw read gives the file as it is


def test_from_dir_names_two_domains_whose_files_are_one_file(tmp_path):
    # On a case-insensitive file system Code.bin and code.bin are one file: a corpus prepared
    # elsewhere (or by an older fastmix) with domains "Code" and "code" said "domain 'Code' has
    # 4 tokens, its files hold 2: a file is truncated or was replaced".  A hard link stands in
    # for such a file system here.
    from fastmix.prepare import prepare_domain

    prepare_domain("Code", ["abc"], tmp_path)
    prepare_domain("other", ["x"], tmp_path)  # what "code" would have written over Code.bin
    os.replace(tmp_path / "other.bin", tmp_path / "Code.bin")
    os.link(tmp_path / "Code.bin", tmp_path / "code.bin")
    manifest = json.loads((tmp_path / "corpus.json").read_text())
    manifest["domains"]["code"] = dict(manifest["domains"].pop("other"), files=["code.bin"])
    (tmp_path / "corpus.json").write_text(json.dumps(manifest))
    with pytest.raises(
        CorpusError,
        match=r"domains 'Code' \('Code.bin'\) and 'code' \('code.bin'\) .*one file on this file "
        r"system, .*letter case",
    ):
        TokenCorpus.from_dir(tmp_path)
    # Two files whose names differ only in case, on a file system that tells them apart: fine.
    os.unlink(tmp_path / "code.bin")
    os.unlink(tmp_path / "Code.bin")
    write_bin(tmp_path / "Code.bin", [97, 98, 99, 256])
    write_bin(tmp_path / "code.bin", [120, 256])
    assert TokenCorpus.from_dir(tmp_path).tokens == {"Code": 4, "code": 2}


def _read_first_tokens(corpus, queue):
    queue.put(corpus.read(0, 0, 3).tolist())


@pytest.mark.skipif(not hasattr(os, "register_at_fork"), reason="needs fork")
def test_a_process_forked_while_another_thread_maps_a_file_can_read(tmp_path):
    # A DataLoader worker forked while another thread of the parent held the corpus's map lock
    # (mapping a file) got the lock held, and waited for it forever at its first read.
    import multiprocessing

    corpus = TokenCorpus({"a": write_bin(tmp_path / "a.bin", np.arange(7, 20))}, dtype="uint16")
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    with corpus._maps_lock:  # held, as by the other thread, at the moment of the fork
        child = ctx.Process(target=_read_first_tokens, args=(corpus, queue))
        child.start()
    child.join(timeout=30)
    if child.is_alive():
        child.kill()
        child.join()
        pytest.fail("the forked process waited for a lock held by a thread it does not have")
    assert child.exitcode == 0
    assert queue.get(timeout=10) == [7, 8, 9]
    assert corpus.read(0, 1, 2).tolist() == [8, 9]  # the parent's own lock still works
