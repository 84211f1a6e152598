"""What DoReMi and ODM share (fastmix/mixers/_common.py): the size check of their state."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from ops_helpers import run_with_capped_memory

from fastmix import ODM, DoReMi
from fastmix.mixers import _common, doremi, odm

# (class, its module, float32 values per domain in its state, GiB at K = 2**31 - 1)
MIXERS = [(DoReMi, doremi, 6, "48.0"), (ODM, odm, 3, "24.0")]


@pytest.mark.parametrize(("cls", "module", "rows", "gib"), MIXERS, ids=["DoReMi", "ODM"])
def test_a_state_too_large_to_allocate_is_an_error_naming_num_domains(
    monkeypatch, cls, module, rows, gib
):
    # K is at most 2**31 - 1, tens of GiB of state: the constructor ended in torch's
    # out-of-memory error, or the process was killed for memory.  The size is probed before
    # anything is allocated (here the probe answers no: on a large machine it would not).
    name = cls.__name__
    probed = []

    def probe(shape, dtype):
        probed.append((shape, dtype))
        return False

    def not_called(*args):
        raise AssertionError("allocated before the size check")

    monkeypatch.setattr(_common, "allocatable", probe)
    monkeypatch.setattr(module, "initial_weights", not_called)
    with pytest.raises(ValueError, match=rf"num_domains=2147483647: the {name} state \({rows} x "
                       rf"2,147,483,647 float32 values, {gib} GiB\) is more than can be "
                       r"allocated on cpu"):  # fmt: skip
        cls(2**31 - 1)
    assert probed == [((rows, 2**31 - 1), np.float32)]
    monkeypatch.undo()
    # moving the state probes too (from "meta", which stands in for a GPU: nothing is copied)
    mixer = cls(3).to("meta")
    monkeypatch.setattr(_common, "allocatable", probe)
    with pytest.raises(ValueError, match=f"num_domains=3: the {name} state .* on cpu"):
        mixer.to("cpu")
    assert mixer.device.type == "meta"
    monkeypatch.undo()

    # on a GPU, torch's out-of-memory error becomes the same error
    def out_of_memory(*args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")

    monkeypatch.setattr(module, "initial_weights", out_of_memory)
    with pytest.raises(ValueError, match=f"num_domains=5: the {name} state") as info:
        cls(5)
    assert isinstance(info.value.__cause__, torch.cuda.OutOfMemoryError)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_the_size_probe_allocates_nothing():
    # With the address space capped a little above what the process holds, the states of
    # K = 2**31 - 1 (48 GiB for DoReMi, 24 GiB for ODM) fail the real probe on any machine.
    out = run_with_capped_memory(
        "from fastmix import DoReMi, ODM",
        "for cls in (DoReMi, ODM):\n"
        "    try:\n"
        "        cls(2**31 - 1)\n"
        "    except ValueError as exc:\n"
        "        print(exc)\n",
    )
    assert out.stdout.splitlines() == [
        f"num_domains=2147483647: the {cls.__name__} state ({rows} x 2,147,483,647 float32 "
        f"values, {gib} GiB) is more than can be allocated on cpu"
        for cls, _, rows, gib in MIXERS
    ]
