"""Tests of ``fastmix demo``: the corpus builder, the model, the outputs of a tiny end-to-end run,
``weights.json`` read back, determinism and bad output folders."""

from __future__ import annotations

import argparse
import json
import math
import os
import string
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from fastmix.demo import cli as demo_cli
from fastmix.demo import report
from fastmix.demo.corpus import (
    DOMAINS,
    CorpusSpec,
    build_corpus,
    build_domain,
    corpus_digest,
)
from fastmix.demo.model import GPTConfig, TinyGPT

ROOT = Path(__file__).resolve().parents[1]
SMALL_SPEC = CorpusSpec(seed=3, train_bytes=8192, heldout_bytes=2048)
# A run that takes a few seconds on two CPU cores.
TINY_FLAGS = [
    "--steps", "12", "--d-model", "32", "--layers", "1", "--heads", "2", "--seq-len", "32",
    "--batch-size", "4", "--train-bytes", "8192", "--heldout-bytes", "2048",
    "--eval-windows", "8", "--threads", "1", "--no-progress",
]


def _demo(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    demo_cli.configure(parser)
    return demo_cli.run(parser.parse_args(list(argv)))


# --------------------------------------------------------------------------- corpus


def test_domains_are_deterministic_and_seeded() -> None:
    for name in DOMAINS:
        train, heldout = build_domain(name, SMALL_SPEC)
        assert (train, heldout) == build_domain(name, SMALL_SPEC), name
        train_text, heldout_text = "".join(train).encode(), "".join(heldout).encode()
        assert len(train_text) == SMALL_SPEC.train_bytes, name
        assert len(heldout_text) == SMALL_SPEC.heldout_bytes, name
        # Held-out documents are not in the train part (a 200-byte slice never reappears).
        probe = heldout_text[100:300]
        assert probe not in train_text, name
    # Generated domains follow the seed; the stdlib-based ones are reshuffled by it.
    other = CorpusSpec(seed=4, train_bytes=8192, heldout_bytes=2048)
    for name in DOMAINS:
        assert build_domain(name, SMALL_SPEC)[0] != build_domain(name, other)[0], name


def test_no_prose_document_is_inside_a_code_document() -> None:
    # Module docstrings are prose documents; their files stay out of the code domain, or a prose
    # training document could be scored again inside code's held-out part.
    spec = CorpusSpec(seed=0, train_bytes=1_000_000, heldout_bytes=50_000)
    code = "\n".join(sum(build_domain("code", spec), []))
    prose = sum(build_domain("prose", spec), [])
    assert len(code) > 1_000_000 and len(prose) > 100
    assert not [doc[:60] for doc in prose if doc in code]


def test_domains_have_their_character() -> None:
    code, prose, math_, data, noise = (
        "".join(build_domain(name, SMALL_SPEC)[0]).encode()
        for name in ("code", "prose", "math", "data", "noise")
    )
    assert b"def " in code or b"class " in code or b"import " in code
    assert prose.count(b" the ") > 10
    assert math_.count(b"Answer: ") > 20
    assert b'{"id": ' in data or b"id,date,city" in data
    allowed = set((string.ascii_letters + string.digits + string.punctuation + " \n").encode())
    assert set(noise) <= allowed
    # Uniform noise: every character of the alphabet shows up, none dominates.
    counts = np.bincount(np.frombuffer(noise, np.uint8), minlength=256)
    assert counts[ord("a")] > 0 and counts.max() < 0.05 * len(noise)


def test_corpus_is_cached_and_keyed(tmp_path: Path) -> None:
    a = build_corpus(tmp_path / "a", SMALL_SPEC, progress=False)
    b = build_corpus(tmp_path / "b", SMALL_SPEC, progress=False)
    digest = corpus_digest(a)
    assert digest == corpus_digest(b)
    assert a.domains == list(DOMAINS)
    for name in DOMAINS:
        # fastmix prepare's byte tokenizer: bytes 0..255, every document ended by eos_id.
        train_docs, heldout_docs = build_domain(name, SMALL_SPEC)
        for folder, docs in ((a.train_dir, train_docs), (a.heldout_dir, heldout_docs)):
            tokens = np.fromfile(folder / f"{name}.bin", dtype=np.uint16)
            assert tokens.max() == a.eos_id == 256
            assert int((tokens == a.eos_id).sum()) == len(docs)
            assert tokens[tokens != a.eos_id].astype(np.uint8).tobytes() == "".join(docs).encode()
    # Cached: the second call reuses the files untouched.
    mtime = a.files()[0].stat().st_mtime_ns
    again = build_corpus(tmp_path / "a", SMALL_SPEC, progress=False)
    assert again.key == a.key and again.files()[0].stat().st_mtime_ns == mtime
    # Another spec is another key: rebuilt.
    other_spec = CorpusSpec(seed=4, train_bytes=8192, heldout_bytes=2048)
    other = build_corpus(tmp_path / "a", other_spec, progress=False)
    assert other.key != a.key and corpus_digest(other) != digest
    # A damaged file invalidates the cache.
    damaged = other.train_dir / "math.bin"
    size = damaged.stat().st_size
    with open(damaged, "r+b") as f:
        f.truncate(10)
    rebuilt = build_corpus(tmp_path / "a", other_spec, progress=False)
    assert rebuilt.key == other_spec.cache_key()
    assert damaged.stat().st_size == size and corpus_digest(rebuilt) == corpus_digest(other)
    # So does a part's corpus.json deleted or damaged (it was reused, then failed to load).
    for part, damage in ((rebuilt.train_dir, None), (rebuilt.heldout_dir, "{")):
        if damage is None:
            (part / "corpus.json").unlink()
        else:
            (part / "corpus.json").write_text(damage)
        again = build_corpus(tmp_path / "a", other_spec, progress=False)
        assert corpus_digest(again) == corpus_digest(other)
        again.train_corpus()
        assert set(again.heldout_tokens()) == set(DOMAINS)
    # Bytes overwritten in place, same size: ids past the vocabulary would crash the model.
    with open(again.train_dir / "code.bin", "r+b") as f:
        f.write(b"\xff" * 64)
    again = build_corpus(tmp_path / "a", other_spec, progress=False)
    assert corpus_digest(again) == corpus_digest(other)
    # No temporary folders are left behind.
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["corpus"]


def test_a_manifest_of_another_shape_rebuilds_the_cache(tmp_path: Path) -> None:
    # Valid JSON of the wrong shape crashed every later run: 'list' object has no attribute 'get'.
    built = build_corpus(tmp_path, SMALL_SPEC, progress=False)
    digest = corpus_digest(built)
    manifest_path = built.root / "manifest.json"
    good = json.loads(manifest_path.read_text())
    damages = [[], "x", 3, None, {}, {**good, "key": 1}, {**good, "domains": "abcde"},
               {**good, "domains": [1, 2]}, {**good, "vocab_size": "257"},
               {**good, "eos_id": True}, {**good, "file_bytes": {"a": 1}},
               {**good, "file_bytes": [[1]] * 10}]
    for damage in damages:
        manifest_path.write_text(json.dumps(damage))
        again = build_corpus(tmp_path, SMALL_SPEC, progress=False)
        assert corpus_digest(again) == digest, damage
        assert json.loads(manifest_path.read_text()) == good
    manifest_path.write_text("[" * 100_000)  # nested past the JSON decoder's recursion limit
    assert corpus_digest(build_corpus(tmp_path, SMALL_SPEC, progress=False)) == digest


def test_a_corpus_folder_the_demo_did_not_write_is_kept(tmp_path: Path) -> None:
    # `fastmix demo --out .` in a project with a corpus/ of its own deleted that folder (the
    # rebuild replaced out/corpus whatever it held).
    mine = tmp_path / "corpus"
    (mine / "train").mkdir(parents=True)
    (mine / "notes.txt").write_text("precious")
    (mine / "train" / "web.bin").write_bytes(b"\x01\x00")
    for force in (False, True):
        with pytest.raises(ValueError, match="notes.txt.*--out"):
            build_corpus(tmp_path, SMALL_SPEC, progress=False, force=force)
    (mine / "notes.txt").unlink()
    with pytest.raises(ValueError, match="'train/web.bin'"):
        build_corpus(tmp_path, SMALL_SPEC, progress=False)
    assert (mine / "train" / "web.bin").read_bytes() == b"\x01\x00"
    (mine / "train" / "web.bin").unlink()
    (mine / "train").rmdir()
    mine.rmdir()
    mine.write_text("a file")
    with pytest.raises(ValueError, match=r"corpus is a file, not a folder, which the demo did"):
        build_corpus(tmp_path, SMALL_SPEC, progress=False)
    assert mine.read_text() == "a file"
    # The demo's own folder, half written by a crash (a temporary token file left), is rebuilt.
    mine.unlink()
    built = build_corpus(tmp_path, SMALL_SPEC, progress=False)
    (built.train_dir / ".code.bin.tmp-abcd1234").write_bytes(b"")
    (built.root / ".DS_Store").write_bytes(b"")
    (built.root / "manifest.json").unlink()
    again = build_corpus(tmp_path, SMALL_SPEC, progress=False)
    assert corpus_digest(again) == corpus_digest(built)
    assert not (again.train_dir / ".code.bin.tmp-abcd1234").exists()


def test_corpus_spec_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="seed"):
        CorpusSpec(seed=-1)
    with pytest.raises(ValueError, match="train_bytes"):
        CorpusSpec(train_bytes=10)
    with pytest.raises(ValueError, match="unknown domain"):
        build_domain("poetry", SMALL_SPEC)


# --------------------------------------------------------------------------- model


def test_model_returns_per_token_loss() -> None:
    torch.manual_seed(0)
    model = TinyGPT(GPTConfig(d_model=32, n_layers=1, n_heads=2, seq_len=16))
    tokens = torch.randint(0, 256, (3, 17))
    loss = model(tokens)
    assert loss.shape == (3, 16)
    # At initialisation the prediction is close to uniform over 256 bytes: ln 256 = 5.55 nats.
    assert abs(loss.mean().item() - math.log(256)) < 0.2
    # Causal: the loss at position t does not depend on tokens after t + 1.
    changed = tokens.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 256
    assert torch.allclose(model(changed)[:, :9], loss[:, :9])
    with pytest.raises(ValueError, match="seq_len"):
        model(torch.randint(0, 256, (1, 40)))
    with pytest.raises(ValueError, match="multiple of n_heads"):
        GPTConfig(d_model=30, n_heads=4)


# --------------------------------------------------------------------------- weights files


def test_load_weights_accepts_and_rejects(tmp_path: Path) -> None:
    domains = ["a", "b", "c"]
    path = tmp_path / "w.json"
    path.write_text(report.weights_json({"a": 2.0, "b": 1.0, "c": 1.0}, method="test"))
    assert report.load_weights(path, domains) == {"a": 0.5, "b": 0.25, "c": 0.25}
    path.write_text(json.dumps({"a": 1, "c": 3}))  # bare mapping, a domain left out
    assert report.load_weights(path, domains) == {"a": 0.25, "b": 0.0, "c": 0.75}
    for bad, match in (
        ({"weights": {"a": 1, "z": 1}}, "unknown domains"),
        ({"weights": {"a": -1, "b": 2}}, ">= 0; domain 'a'"),
        ({"weights": {"a": 0, "b": 0}}, "positive sum"),
        ({"weights": {"a": "x"}}, "must be a number"),
        # A list has no names, and the demo prints domains in its own order, not the corpus's.
        ([1, 2], "a list names no domains"),
        ([1, 2, 3], "a list names no domains"),
        ({"weights": [1, 2, 3]}, "a list names no domains"),
        ("a", "must hold"),
        (3, "must hold"),
    ):
        path.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=match) as info:
            report.load_weights(path, domains)
        assert str(info.value).startswith("--weights ")
    path.write_text("{not json")
    with pytest.raises(ValueError, match="cannot read"):
        report.load_weights(path, domains)
    path.write_text('{"weights": {"a": 1, "b": 1, "a": 2}}')  # the second 'a' won silently
    with pytest.raises(ValueError, match="--weights .*the key 'a' appears twice"):
        report.load_weights(path, domains)


# --------------------------------------------------------------------------- bad --out


def test_out_that_is_a_file_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    target = tmp_path / "taken"
    target.write_text("x")
    assert _demo("--out", str(target), *TINY_FLAGS) == 2
    assert "--out" in capsys.readouterr().err and target.read_text() == "x"
    # A folder under a file cannot be created.
    assert _demo("--out", str(target / "sub"), *TINY_FLAGS) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "cannot create" in err


def test_an_empty_out_is_an_error_not_the_current_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    # `--out "$OUT"` with OUT unset: Path("") is ".", and the corpus and outputs went to the cwd.
    monkeypatch.chdir(tmp_path)
    assert _demo("--out", "", *TINY_FLAGS) == 2
    assert "--out: empty path" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_read_only_out_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    # Tests run as root, for whom permission bits do not stop writes: simulate both checks.
    folder = tmp_path / "ro"
    folder.mkdir()
    real_access = os.access
    monkeypatch.setattr(
        demo_cli.os, "access",
        lambda p, mode: False if Path(p) == folder else real_access(p, mode),
    )
    assert _demo("--out", str(folder), *TINY_FLAGS) == 2
    assert "not writable" in capsys.readouterr().err
    monkeypatch.setattr(demo_cli.os, "access", real_access)

    def read_only(self: Path, data: bytes) -> int:
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(Path, "write_bytes", read_only)
    assert _demo("--out", str(folder), *TINY_FLAGS) == 2
    err = capsys.readouterr().err
    assert "not writable" in err and "Read-only" in err
    assert list(folder.iterdir()) == []


def test_bad_flags_are_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = str(tmp_path / "o")
    # Plain decimal numbers only, as fastmix optimize takes them (int() read 1_000 as 1000).
    for flag, text, what in (("--steps", "1_000", "integer"), ("--seed", "\u0661", "integer"),
                             ("--lr", "1_0e-3", "number")):
        with pytest.raises(SystemExit):
            _demo("--out", out, flag, text)
        assert f"argument {flag}: invalid {what}: {text!r}" in capsys.readouterr().err
    assert _demo("--out", out, *TINY_FLAGS, "--d-model", "30", "--heads", "4") == 2
    assert "multiple of n_heads" in capsys.readouterr().err
    assert _demo("--out", out, *TINY_FLAGS, "--steps", "0") == 2
    assert "steps" in capsys.readouterr().err
    assert _demo("--out", out, *TINY_FLAGS, "--weights", str(tmp_path / "missing.json")) == 2
    assert "--weights" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text('{"weights": {"code": 1, "poetry": 1}}')  # was read once the corpus was built
    assert _demo("--out", out, *TINY_FLAGS, "--weights", str(bad)) == 2
    assert "--weights" in (err := capsys.readouterr().err) and "'poetry'" in err
    for device in ("meta", "mps", "xpu"):  # checked before the corpus is built
        assert _demo("--out", out, *TINY_FLAGS, "--device", device) == 2
        assert "the demo runs on 'cpu' or 'cuda'" in capsys.readouterr().err
    assert not (tmp_path / "o" / "corpus").exists()


def test_quick_preset_and_explicit_flags() -> None:
    from fastmix.demo.options import QUICK, DemoOptions

    parser = argparse.ArgumentParser()
    demo_cli.configure(parser)
    default = demo_cli.options_from_args(parser.parse_args([]))
    assert default == DemoOptions(out=Path("fastmix-demo"))
    quick = demo_cli.options_from_args(parser.parse_args(["--quick"]))
    assert quick.quick and all(getattr(quick, k) == v for k, v in QUICK.items())
    assert quick.steps < default.steps
    # An explicit flag wins over the preset.
    mixed = demo_cli.options_from_args(parser.parse_args(["--quick", "--steps", "7"]))
    assert mixed.steps == 7 and mixed.d_model == QUICK["d_model"]


def test_help_is_reachable_with_python_m() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "fastmix", "demo", "--help"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    for flag in ("--quick", "--out", "--steps", "--d-model", "--resample", "--weights"):
        assert flag in proc.stdout


def test_version_flag() -> None:
    import fastmix

    proc = subprocess.run(
        [sys.executable, "-m", "fastmix", "--version"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"fastmix {fastmix.__version__}"


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("fastmix.sampler")
    out = tmp_path_factory.mktemp("demo")
    before = (torch.are_deterministic_algorithms_enabled(), torch.get_num_threads(),
              torch.random.get_rng_state())
    assert _demo("--out", str(out), *TINY_FLAGS) == 0
    # The run leaves torch's global settings and RNG as it found them.
    assert torch.are_deterministic_algorithms_enabled() == before[0]
    assert torch.get_num_threads() == before[1]
    assert torch.equal(torch.random.get_rng_state(), before[2])
    return out


def test_end_to_end_outputs_are_well_formed(tiny_run: Path) -> None:
    saved = json.loads((tiny_run / "weights.json").read_text())
    weights = saved["weights"]
    assert list(weights) == list(DOMAINS)
    assert all(w > 0 for w in weights.values())
    assert math.isclose(math.fsum(weights.values()), 1.0, rel_tol=0, abs_tol=1e-12)
    assert saved["method"] == "doremi" and saved["proxy_steps"] == 12

    results = json.loads((tiny_run / "results.json").read_text())
    trajectory = np.array(results["weight_trajectory"])
    assert trajectory.shape == (13, len(DOMAINS))
    assert np.allclose(trajectory.sum(axis=1), 1.0, atol=1e-5)
    assert np.allclose(trajectory[0], 1 / len(DOMAINS))
    # The main run's weights are DoReMi's running average of α (initial α excluded).
    average = trajectory[1:].mean(axis=0)
    assert np.allclose(average / average.sum(), [weights[d] for d in DOMAINS], atol=1e-5)
    for key in ("uniform_model_bpb", "doremi_model_bpb", "reference_bpb"):
        values = results[key]
        assert set(values) == set(DOMAINS)
        # A barely trained model: between 1 and 10 bits per byte on every domain.
        assert all(1.0 < v < 10.0 for v in values.values()), (key, values)

    png = (tiny_run / "doremi.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    image = matplotlib.image.imread(tiny_run / "doremi.png")
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 400

    table = (tiny_run / "table.md").read_text()
    for name in DOMAINS:
        assert f"| {name} | 0.200 | {weights[name]:.3f} |" in table
    text = (tiny_run / "report.md").read_text()
    assert "(weights.json)" in text and "(doremi.png)" in text and table in text
    assert "shows how much a result moves with the seed" in text
    # Everything was renamed into place: no temporary file is left.
    assert not [p.name for p in tiny_run.iterdir() if p.name.startswith(".")]


def test_weights_json_loads_into_mixture_dataset(tiny_run: Path) -> None:
    from fastmix.data import MixtureDataset, TokenCorpus

    corpus = TokenCorpus.from_dir(tiny_run / "corpus" / "train")
    saved = json.loads((tiny_run / "weights.json").read_text())["weights"]
    dataset = MixtureDataset(corpus, 32, tiny_run / "weights.json", seed=1, batch_size=8)
    assert np.allclose(dataset.weights, [saved[n] for n in corpus.names])
    batch = next(iter(dataset))
    assert batch["input_ids"].shape == (8, 33)
    assert int(batch["domain"].max()) < len(DOMAINS)


def test_same_seed_same_results_and_weights_flag(tiny_run: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    assert _demo("--out", str(again), *TINY_FLAGS) == 0
    first = json.loads((tiny_run / "results.json").read_text())
    second = json.loads((again / "results.json").read_text())
    for key in ("doremi_weights", "weight_trajectory", "uniform_model_bpb", "doremi_model_bpb"):
        assert first[key] == second[key], key  # bit for bit
    # --weights skips the reference and the proxy and trains the main models on those weights.
    reused = tmp_path / "reused"
    code = _demo("--out", str(reused), *TINY_FLAGS, "--weights", str(tiny_run / "weights.json"))
    assert code == 0
    third = json.loads((reused / "results.json").read_text())
    assert third["weight_trajectory"] is None and third["reference_bpb"] is None
    assert third["doremi_weights"] == pytest.approx(first["doremi_weights"], rel=1e-12)
    assert third["doremi_model_bpb"] == pytest.approx(first["doremi_model_bpb"], rel=1e-9)
    assert json.loads((reused / "weights.json").read_text())["method"] == "file"
    # No reference was trained: the report does not describe one.
    text = (reused / "report.md").read_text()
    assert "No reference model was trained" in text and "The reference is" not in text
    # Nor does it call weights from a file DoReMi's, or give them DoReMi's settings.
    assert "DoReMi" not in text and "proxy" not in text.replace("no reference or proxy run", "")
    assert "| given weight |" in (reused / "table.md").read_text()
    saved = json.loads((reused / "weights.json").read_text())
    assert saved["model"] is None and saved["step_size"] is None and saved["resample"] is None
    assert "| DoReMi weight |" in (tiny_run / "table.md").read_text()


def test_report_says_what_the_reference_column_measures() -> None:
    domains = ["a", "b"]
    loss = {"a": 1.0, "b": 2.0}

    def text(reference: str | None) -> str:
        return report.report_markdown(
            table="| table |\n", domains=domains, doremi_weights={"a": 0.5, "b": 0.5},
            uniform_loss=loss, doremi_loss=loss, settings={}, timings={},
            weights_source="test", reference=reference,
        )  # fmt: skip

    # Only a reference of the main models' shape and length measures the seed's effect.
    assert "moves with the seed" in text("same")
    other = text("other")
    assert "moves with the seed" not in other and "not the seed's effect alone" in other
    # Weights read from a file: no reference run, so no claim about one.
    none = text(None)
    assert "The reference is" not in none and "No reference model was trained" in none
    with pytest.raises(ValueError, match="reference"):
        text("yes")


def test_resample_mode_runs(tmp_path: Path) -> None:
    pytest.importorskip("fastmix.sampler")
    out = tmp_path / "resample"
    assert _demo("--out", str(out), *TINY_FLAGS, "--resample", "--steps", "6") == 0
    saved = json.loads((out / "weights.json").read_text())
    assert saved["resample"] is True
    assert math.isclose(math.fsum(saved["weights"].values()), 1.0, abs_tol=1e-12)


def test_resample_hands_alpha_to_the_sampler_and_trains_on_the_mean_loss(monkeypatch) -> None:
    from fastmix.demo.train import TrainConfig, train_proxy
    from fastmix.mixers import DoReMi

    class Recorder:  # the dataset side: records what the proxy hands it
        def __init__(self) -> None:
            self.next_step, self.calls = 0, []

        def set_weights(self, weights: torch.Tensor, *, step: int) -> None:
            self.calls.append((step, weights.clone()))
            self.next_step += 1

    backpropagated = []  # what each backward() starts from
    original = torch.Tensor.backward

    def recording(self, *args, **kwargs):
        backpropagated.append(type(self.grad_fn).__name__)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "backward", recording)
    cfg = GPTConfig(d_model=32, n_layers=1, n_heads=2, seq_len=16)
    batches = [{"input_ids": torch.randint(0, 256, (4, 17)), "domain": torch.tensor([0, 1, 2, 0])}
               for _ in range(3)]  # fmt: skip
    for resample in (True, False):
        torch.manual_seed(0)
        proxy, reference = TinyGPT(cfg), TinyGPT(cfg)
        sink, mixer = Recorder(), DoReMi(3, step_size=1.0, device="cpu")
        result = train_proxy(proxy, reference, batches, mixer, TrainConfig(steps=3),
                             resample_to=sink if resample else None, progress=False)  # fmt: skip
        if resample:
            assert [step for step, _ in sink.calls] == [0, 1, 2]  # one change a step, at next_step
            for i, (_, weights) in enumerate(sink.calls):  # the α of that step's update
                np.testing.assert_allclose(weights.numpy(), result.trajectory[i + 1], rtol=1e-6)
        else:
            assert sink.calls == []
    # with resample the plain mean loss trains; without, DoReMi's α-reweighted objective
    assert backpropagated[:3] == ["MeanBackward0"] * 3
    assert "MeanBackward0" not in backpropagated[3:] and len(backpropagated) == 6



def test_a_run_failing_while_writing_keeps_the_last_runs_outputs(
    tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
    full_disk_at: Callable[[str], None],
) -> None:
    # The outputs were written one by one: a full disk at the figure left a new weights.json,
    # results.json and table.md beside the previous run's figure and report.
    import shutil

    out = tmp_path / "again"
    shutil.copytree(tiny_run, out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert {"weights.json", "table.md", "doremi.png", "report.md"} <= set(before)
    full_disk_at("doremi.png")
    assert _demo("--out", str(out), *TINY_FLAGS, "--seed", "5") == 1
    assert "No space left on device" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before

def test_diverged_training_stops_before_writing_outputs(
    tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    from fastmix import mixers

    outputs = {"weights.json", "results.json", "table.md", "doremi.png", "report.md"}
    # NaN from the reference's second step: NaN tables and a uniform "DoReMi average" were
    # written, then matplotlib failed on NaN axis limits.
    out = tmp_path / "lr"
    assert _demo("--out", str(out), *TINY_FLAGS, "--lr", "1e30") == 2
    err = capsys.readouterr().err.strip()
    assert err == ("fastmix demo: error: training diverged: the reference model's training loss "
                   "is nan at step 2 of 12; lower --lr (now 1e+30)")
    assert not outputs & {p.name for p in out.iterdir()}
    # The main models alone (--weights): the first one diverges.
    out = tmp_path / "main"
    assert _demo("--out", str(out), *TINY_FLAGS, "--lr", "1e30",
                 "--weights", str(tiny_run / "weights.json")) == 2  # fmt: skip
    assert "the main (uniform) model's training loss is nan" in capsys.readouterr().err
    assert not outputs & {p.name for p in out.iterdir()}
    # Parameters gone NaN in the last step: only the held-out loss shows it.
    from fastmix.demo import pipeline

    with monkeypatch.context() as patch:
        patch.setattr(pipeline, "evaluate", lambda *a, **k: {"code": 1.0, "math": math.inf})
        assert _demo("--out", str(out), *TINY_FLAGS,
                     "--weights", str(tiny_run / "weights.json")) == 2  # fmt: skip
    assert "the main (uniform) model's held-out loss on math is inf" in capsys.readouterr().err
    assert not outputs & {p.name for p in out.iterdir()}

    # Finite losses, but every DoReMi update skipped: the "average α" is the initial one.
    class NaNReference(mixers.DoReMi):
        def step(self, loss, ref_loss, domain, mask=None):
            return super().step(loss, torch.full_like(ref_loss, math.nan), domain, mask)

    monkeypatch.setattr(mixers, "DoReMi", NaNReference)
    out = tmp_path / "skipped"
    assert _demo("--out", str(out), *TINY_FLAGS) == 2
    assert ("training diverged: DoReMi skipped 12 of its 12 updates (a non-finite excess loss "
            "or α); lower --lr (now 0.002) or --step-size (now 1)") in capsys.readouterr().err
    assert not outputs & {p.name for p in out.iterdir()}


def test_shape_and_seed_errors_name_the_flags(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = str(tmp_path / "o")
    assert _demo("--out", out, *TINY_FLAGS, "--main-d-model", "100", "--main-heads", "3") == 2
    assert "d_model 100 (--main-d-model) must be a multiple of n_heads 3 (--main-heads)" in (
        capsys.readouterr().err
    )
    assert _demo("--out", out, *TINY_FLAGS, "--main-heads", "3") == 2  # width from --d-model
    assert "d_model 32 (--d-model) must be a multiple of n_heads 3 (--main-heads)" in (
        capsys.readouterr().err
    )
    for seed in ("-1", str(2**64)):
        assert _demo("--out", out, *TINY_FLAGS, "--seed", seed) == 2
        assert f"(--seed) must be an integer in [0, 2**64 - 3], got {seed}" in (
            capsys.readouterr().err
        )
    assert not Path(out).exists()  # refused before anything was created


@pytest.mark.parametrize("flag, value", [
    ("--steps", "0"), ("--main-steps", "-3"), ("--d-model", "-4"), ("--layers", "0"),
    ("--heads", "0"), ("--main-d-model", "0"), ("--main-layers", "-1"), ("--main-heads", "0"),
    ("--seq-len", "0"), ("--batch-size", "0"), ("--eval-windows", "0"), ("--threads", "0"),
    ("--lr", "nan"), ("--step-size", "-1"), ("--smoothing", "1"), ("--train-bytes", "0"),
    ("--heldout-bytes", "-1"), ("--heldout-bytes", "1000"),
])
def test_bad_values_are_errors_naming_their_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture, flag: str, value: str
) -> None:
    # "n_layers must be a positive integer" named no flag the user typed (--layers), and the
    # corpus's limits (--train-bytes 0) came only after --out was created and torch imported.
    out = tmp_path / "o"
    assert _demo("--out", str(out), *TINY_FLAGS, flag, value) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastmix demo: error: ") and f"({flag})" in err, err
    assert not out.exists()  # refused before anything was created


@pytest.mark.parametrize("flags, named", [
    (["--steps", str(10**12)], "(--steps)"),
    (["--main-steps", str(10**12)], "(--main-steps)"),
    (["--d-model", str(10**8), "--heads", "1"], "--d-model 100000000"),
    (["--layers", str(10**9)], "--layers 1000000000"),
    (["--main-layers", str(10**9)], "--main-layers 1000000000"),
    (["--main-d-model", str(10**8), "--heads", "1"], "--main-d-model 100000000"),
])
def test_sizes_beyond_memory_are_errors_naming_their_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture, flags: list[str], named: str
) -> None:
    # --steps 10**12 or --d-model 10**8: an allocator's RuntimeError traceback after the corpus
    # was built; --layers 10**9: minutes of building blocks, then out of memory.
    out = tmp_path / "o"
    assert _demo("--out", str(out), *TINY_FLAGS, *flags) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastmix demo: error: ") and named in err, err
    assert "more than can be allocated here" in err
    assert not out.exists()  # refused before anything was created


def test_the_parameter_count_the_memory_check_uses_is_the_model_s() -> None:
    from fastmix.demo.options import N_DOMAINS

    assert N_DOMAINS == len(DOMAINS)
    for cfg in (GPTConfig(), GPTConfig(96, 2, 4, 96), GPTConfig(32, 1, 2, 32),
                GPTConfig(64, 3, 8, 50, 300)):
        assert cfg.num_parameters == TinyGPT(cfg).num_parameters(), cfg


def test_threads_beyond_the_usable_cpus_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from fastmix.demo import options

    # Far more threads than CPUs hung or crashed the process inside OpenMP (SIGSEGV).
    monkeypatch.setattr(options.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert options.usable_cpus() == 2
    out = str(tmp_path / "o")
    assert _demo("--out", out, *TINY_FLAGS, "--threads", "3") == 2
    assert "threads (--threads) must be at most 2, the CPUs this process may use, got 3" in (
        capsys.readouterr().err
    )
    assert not Path(out).exists()  # refused before anything was created
    assert options.DemoOptions(threads=2).threads == 2
    with pytest.raises(ValueError, match="--threads"):
        options.DemoOptions(threads=100_000)
    # Without an affinity mask (not Linux): the CPU count.
    monkeypatch.delattr(options.os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(options.os, "cpu_count", lambda: 3)
    assert options.usable_cpus() == 3


def test_ctrl_c_while_torch_settings_are_applied_stays_a_keyboard_interrupt(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Ctrl-C inside the first use_deterministic_algorithms (while it imports torch._inductor)
    # left torch half-imported; the restore called it again and an AttributeError traceback
    # hid the KeyboardInterrupt.
    from fastmix.demo import train

    before = (torch.are_deterministic_algorithms_enabled(), torch.get_num_threads())
    calls: list[bool] = []

    def interrupted(mode: bool, *, warn_only: bool = False) -> None:
        calls.append(mode)
        if len(calls) == 1:
            raise KeyboardInterrupt
        raise AttributeError("partially initialized module 'torch._dynamo'")

    monkeypatch.setattr(train.torch, "use_deterministic_algorithms", interrupted)
    with pytest.raises(KeyboardInterrupt):
        with train.deterministic_torch(0, torch.device("cpu"), threads=1):
            pass  # pragma: no cover - never entered
    assert calls == [True]  # what was never applied is not restored
    monkeypatch.undo()
    # Ctrl-C in the body while a restore fails: still the KeyboardInterrupt, the rest restored.
    calls.clear()

    def restore_fails(mode: bool, *, warn_only: bool = False) -> None:
        calls.append(mode)
        if len(calls) > 1:
            raise AttributeError("partially initialized module 'torch._dynamo'")

    monkeypatch.setattr(train.torch, "use_deterministic_algorithms", restore_fails)
    with pytest.raises(KeyboardInterrupt):
        with train.deterministic_torch(0, torch.device("cpu"), threads=1):
            assert torch.get_num_threads() == 1
            raise KeyboardInterrupt
    assert len(calls) == 2 and torch.get_num_threads() == before[1]
    assert torch.are_deterministic_algorithms_enabled() == before[0]


@pytest.mark.parametrize("name", ["weights.json", "results.json", "table.md", "doremi.png",
                                  "report.md"])
def test_an_output_name_taken_by_a_folder_fails_before_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture, name: str
) -> None:
    # Found only after the training, with the temporary file's name in the message.
    (tmp_path / name).mkdir()
    assert _demo("--out", str(tmp_path), *TINY_FLAGS) == 2
    err = capsys.readouterr().err
    assert f"--out: {tmp_path / name} is a directory" in err and ".tmp" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no corpus was built


def test_a_run_stopped_while_rendering_leaves_the_earlier_outputs_whole(
    tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # weights.json, results.json and table.md were written before the figure was drawn (~1 s
    # of matplotlib): a run stopped there left them beside an older run's figure and report.
    import shutil

    from fastmix.demo import report

    out = tmp_path / "out"
    shutil.copytree(tiny_run, out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert set(report.OUTPUT_FILES) <= set(before)

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "figure_png", stopped)
    with pytest.raises(KeyboardInterrupt):
        _demo("--out", str(out), *TINY_FLAGS, "--weights", str(tiny_run / "weights.json"))
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
