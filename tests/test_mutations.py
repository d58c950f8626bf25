"""The planted-bug switch: names are checked, occasional ones are reproducible, and a
mutated host says so in its results."""

from __future__ import annotations

import pytest

from vtick.host import mutations as mut


@pytest.fixture
def planted(monkeypatch) -> None:
    monkeypatch.setitem(
        mut.MUTATIONS, "test-bug", mut.Mutation("test-bug", "nothing", "this test", one_in=4)
    )


def test_unknown_names_are_refused_in_one_line() -> None:
    with pytest.raises(ValueError, match="unknown mutation 'nope'"):
        mut.Mutations(["nope"])


def test_inactive_mutations_never_act(planted) -> None:
    m = mut.Mutations()
    assert not m
    assert not any(m.sometimes("test-bug") or m.on("test-bug") for _ in range(100))


def test_occasional_mutations_are_reproducible_and_counted(planted) -> None:
    runs = []
    for _ in range(2):
        m = mut.Mutations(["test-bug"], seed=7)
        runs.append([m.sometimes("test-bug") for _ in range(400)])
        assert m.as_dict() == {"test-bug": sum(runs[-1])}
    assert runs[0] == runs[1]
    assert 50 < sum(runs[0]) < 150  # about one in four
