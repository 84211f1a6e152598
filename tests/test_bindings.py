"""The compiled classes (fastmix._C) on an instance whose C++ object was never constructed.

``cls.__new__(cls)`` makes the Python object without running ``__init__``; so does a subclass made
that way, and an ``__init__`` that raised leaves the instance as ``__new__`` made it.  Every public
method and property must then raise TypeError.  They used to read unconstructed memory (a garbage
``num_domains``, a segfault in ``StratifiedTable.block``), so the cases run in a child interpreter:
a crash fails the case it happened in, not the whole test session.
"""

from __future__ import annotations

import copy
import json
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from fastmix import _C

# Every public method and property of each class, as code run on the instance `obj`.
MEMBERS = {
    "AliasTable": {
        "num_domains": "obj.num_domains",
        "fill": "obj.fill(1, 0, np.empty(4, np.int32))",
    },
    "StratifiedTable": {
        "num_domains": "obj.num_domains",
        "block": "obj.block",
        "fill": "obj.fill(1, 0, 0, np.empty(4, np.int32))",
        "block_ids": "obj.block_ids(1, 0, 0)",
    },
    "WindowTable": {
        "num_domains": "obj.num_domains",
        "num_files": "obj.num_files",
        "seq_len": "obj.seq_len",
        "map": "obj.map(np.zeros(2, np.int32), i64(1), i64(1), 1, 0, 2, *[i64(2)] * 4)",
    },
}

# Constructor arguments that build an instance, and ones __init__ refuses with ValueError.
GOOD_ARGS = {
    "AliasTable": "np.ones(3)",
    "StratifiedTable": "np.ones(3), 8",
    "WindowTable": "a64(4), a64(0, 1), a64(4), 2",
}
BAD_ARGS = {
    "AliasTable": "np.zeros(3)",
    "StratifiedTable": "np.ones(3), 0",
    "WindowTable": "i64(1), i64(2), i64(0), 0",
}

# Ways to hold an instance of `cls` whose C++ object was never constructed.
UNINITIALISED = {
    "new": "obj = cls.__new__(cls)",
    "subclass": textwrap.dedent(
        """
        class Sub(cls):
            def __init__(self, *args):
                pass  # never calls super().__init__
        obj = Sub.__new__(Sub)
        """
    ),
    "failed_init": textwrap.dedent(
        """
        obj = cls.__new__(cls)
        try:
            obj.__init__({bad})
        except ValueError:
            pass
        else:
            raise AssertionError("__init__ took {bad}")
        """
    ),
}

CASES = [
    (name, member, way)
    for name, members in MEMBERS.items()
    for member in members
    for way in UNINITIALISED
]

PRELUDE = textwrap.dedent(
    """
    import numpy as np
    from fastmix import _C

    def i64(n):
        return np.zeros(n, np.int64)

    def a64(*values):
        return np.array(values, np.int64)
    """
)


def _case_code(name: str, member: str, way: str) -> str:
    make = UNINITIALISED[way].replace("{bad}", BAD_ARGS[name])
    body = "\n".join(
        [f"cls = _C.{name}", make, "try:", f"    got = {MEMBERS[name][member]}",
         "except Exception as e:", "    print(json.dumps([type(e).__name__, str(e)]))",
         "else:", "    print(json.dumps(['returned', repr(got)]))"]
    )  # fmt: skip
    return f"def case():\n{textwrap.indent(body, '    ')}\n"


def _run(cases: list[tuple[str, str, str]]) -> subprocess.CompletedProcess:
    """Run `cases` in order in one child; one line of output per finished case."""
    parts = [PRELUDE, "import json, sys"]
    for case in cases:
        parts += [_case_code(*case), "case()", "sys.stdout.flush()"]
    return subprocess.run(
        [sys.executable, "-X", "faulthandler", "-c", "\n".join(parts)],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def outcomes() -> dict[tuple[str, str, str], tuple[str, str]]:
    """(kind, text) per case: (exception type, message), ('returned', repr) or ('crashed', why).

    One child runs every case; when one crashes it, the cases after it run in a fresh child.
    """
    results: dict[tuple[str, str, str], tuple[str, str]] = {}
    todo = list(CASES)
    while todo:
        proc = _run(todo)
        lines = proc.stdout.splitlines()
        for case, line in zip(todo, lines, strict=False):
            results[case] = tuple(json.loads(line))
        done = len(lines)
        if proc.returncode == 0 and done == len(todo):
            break
        if done < len(todo):
            why = f"exit status {proc.returncode}: {proc.stderr.strip()[-2000:]}"
            results[todo[done]] = ("crashed", why)
        todo = todo[done + 1 :]
    return results


@pytest.mark.parametrize(("name", "member", "way"), CASES)
def test_members_of_an_uninitialised_instance_raise_type_error(outcomes, name, member, way):
    kind, text = outcomes[(name, member, way)]
    assert kind == "TypeError", f"{name}.{member} ({way}) {kind}: {text}"
    owner = "Sub" if way == "subclass" else name
    assert text.startswith(f"{owner} is not initialised: construct it with {owner}(...)"), text
    if way == "subclass":
        assert text.endswith(f"whose __init__ must call {name}.__init__"), text


@pytest.mark.parametrize("name", MEMBERS)
def test_every_public_member_has_a_case(name):
    cls = getattr(_C, name)
    assert {m for m in dir(cls) if not m.startswith("_")} == set(MEMBERS[name])


def _args(code: str) -> tuple:
    """The arguments `code` (from GOOD_ARGS or BAD_ARGS) spells, made here."""
    helpers = {"np": np, "i64": lambda n: np.zeros(n, np.int64)}
    helpers["a64"] = lambda *values: np.array(values, np.int64)
    return eval(f"({code},)", helpers)


@pytest.mark.parametrize("name", MEMBERS)
def test_construction_after_new_or_a_failed_init_still_works(name):
    cls = getattr(_C, name)
    obj = cls.__new__(cls)
    with pytest.raises(ValueError):
        obj.__init__(*_args(BAD_ARGS[name]))
    obj.__init__(*_args(GOOD_ARGS[name]))
    assert obj.num_domains == cls(*_args(GOOD_ARGS[name])).num_domains


@pytest.mark.parametrize("name", MEMBERS)
def test_a_subclass_init_that_skips_the_base_is_refused(name):
    class Sub(getattr(_C, name)):
        def __init__(self, *args):
            pass

    with pytest.raises(TypeError, match="__init__"):
        Sub()


@pytest.mark.parametrize("name", MEMBERS)
@pytest.mark.parametrize("clone", [copy.copy, copy.deepcopy, pickle.dumps])
def test_copy_and_pickle_are_refused(name, clone):
    cls = getattr(_C, name)
    for obj in (cls.__new__(cls), cls(*_args(GOOD_ARGS[name]))):
        with pytest.raises(TypeError, match="pickle"):
            clone(obj)


@pytest.mark.parametrize("n,k", [(5, 3), (40, 1000), (100_000, 22), (64, 4)])
def test_accumulate_counts_adds_a_histogram(n, k):
    # Both of its ways: a batch short against K is counted straight into `counts`, a long one
    # through four partial histograms.
    ids = np.random.default_rng(n).integers(0, k, n).astype(np.int32)
    counts = np.arange(k, dtype=np.int64)
    _C.accumulate_counts(ids, counts)
    assert np.array_equal(counts, np.arange(k) + np.bincount(ids, minlength=k))
    # With `also`, the same histogram goes into both arrays (one pass over the ids).
    also = np.full(k, 7, dtype=np.int64)
    _C.accumulate_counts(ids, counts, also)
    assert np.array_equal(counts, np.arange(k) + 2 * np.bincount(ids, minlength=k))
    assert np.array_equal(also, 7 + np.bincount(ids, minlength=k))


def test_accumulate_counts_refuses_a_second_array_of_another_length_or_kind():
    ids = np.zeros(5, np.int32)
    counts = np.zeros(3, np.int64)
    with pytest.raises(ValueError, match="also must have the length of counts"):
        _C.accumulate_counts(ids, counts, np.zeros(4, np.int64))
    with pytest.raises(TypeError, match="also"):
        _C.accumulate_counts(ids, counts, np.zeros(3, np.int32))
    assert not counts.any()


@pytest.mark.parametrize("n", [5, 100_000])
@pytest.mark.parametrize("bad", [-1, 22, 2**31 - 1])
def test_accumulate_counts_refuses_an_id_out_of_range_before_writing(n, bad):
    ids = np.zeros(n, np.int32)
    ids[n // 2] = bad
    counts = np.full(22, 9, np.int64)
    also = np.full(22, 4, np.int64)
    with pytest.raises(ValueError, match="outside"):
        _C.accumulate_counts(ids, counts, also)
    assert np.array_equal(counts, np.full(22, 9))
    assert np.array_equal(also, np.full(22, 4))

