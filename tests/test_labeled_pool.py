"""LabeledPool: the labeled mask, its complement, the labels, the state round trip, the refusals."""

from __future__ import annotations

import pytest
import torch

from dltest.data import LabeledPool
from dltest.errors import DltestError


def pool_of_10() -> LabeledPool:
    pool = LabeledPool(10)
    pool.label(torch.tensor([7, 2, 5]), torch.tensor([1, 0, 9]))
    pool.label([0], [4])
    return pool


def test_mask_complement_and_labels_have_known_values():
    pool = pool_of_10()
    assert len(pool) == 4 and pool.size == 10
    assert pool.labeled().tolist() == [0, 2, 5, 7]
    assert pool.unlabeled().tolist() == [1, 3, 4, 6, 8, 9]
    assert pool.labels().tolist() == [4, 0, 9, 1]  # in labeled()'s order, not the order given
    assert pool.mask.tolist() == [True, False, True, False, False, True, False, True, False, False]
    assert pool.labeled().dtype == pool.unlabeled().dtype == torch.long
    assert repr(pool) == "LabeledPool(4 of 10 labeled)"


def test_an_empty_and_a_full_pool():
    empty = LabeledPool(3)
    assert len(empty) == 0 and empty.labeled().tolist() == [] and empty.unlabeled().tolist() == [0, 1, 2]
    empty.label([], [])
    assert len(empty) == 0
    empty.label([2, 1, 0], [5, 5, 5])
    assert empty.unlabeled().tolist() == [] and empty.labels().tolist() == [5, 5, 5]


def test_the_mask_is_a_copy():
    pool = pool_of_10()
    pool.mask[:] = True
    assert len(pool) == 4


def test_state_round_trip_through_torch_save_and_weights_only_load(tmp_path):
    pool = pool_of_10()
    state = pool.state_dict()
    assert set(state) == {"size", "labeled", "labels"} and state["size"] == 10
    torch.save(state, tmp_path / "pool.pt")
    loaded = torch.load(tmp_path / "pool.pt", weights_only=True)
    again = LabeledPool.from_state_dict(loaded)
    assert again.labeled().tolist() == [0, 2, 5, 7] and again.labels().tolist() == [4, 0, 9, 1]
    assert again.unlabeled().tolist() == [1, 3, 4, 6, 8, 9] and again.size == 10
    other = LabeledPool(3)
    other.load_state_dict(loaded)  # replaces size, mask and labels
    assert other.size == 10 and other.labeled().tolist() == [0, 2, 5, 7]


@pytest.mark.parametrize("positions, labels, message", [
    ([2], [3], r"positions \[2\] are labeled already; a position is labeled once"),
    ([10], [3], r"positions \[10\] lie outside the pool of 10 \(allowed: 0 to 9\)"),
    ([-1, 3], [3, 3], r"positions \[-1\] lie outside the pool of 10"),
    ([3, 3], [1, 1], r"positions \[3\] are given more than once"),
    ([3, 4], [1], "label got 2 positions but 1 labels"),
    ([3], [-2], r"labels must be class indices >= 0, got \[-2\]"),
    (torch.tensor([3.0]), [1], "positions must be integers, got a torch.float32 tensor"),
    ([1.5], [1], "positions must be integers, got 1.5"),
    ([True], [1], "positions must be integers, got True"),
    (torch.tensor([[3]]), [1], r"positions must be one-dimensional, got shape \(1, 1\)"),
    ([2**70], [1], "positions must fit in 64 bits"),
])
def test_bad_labels_are_refused_in_one_line_and_change_nothing(positions, labels, message):
    pool = pool_of_10()
    with pytest.raises(DltestError, match=message) as caught:
        pool.label(positions, labels)
    assert "\n" not in str(caught.value)
    assert pool.labeled().tolist() == [0, 2, 5, 7] and pool.labels().tolist() == [4, 0, 9, 1]


def test_a_refused_batch_labels_none_of_its_positions():
    pool = pool_of_10()
    with pytest.raises(DltestError, match="labeled already"):
        pool.label([3, 4, 7], [1, 1, 1])  # 3 and 4 are new, 7 is not: none is labeled
    assert len(pool) == 4 and pool.unlabeled().tolist() == [1, 3, 4, 6, 8, 9]


@pytest.mark.parametrize("state, message", [
    ({"size": 4, "labeled": torch.tensor([0, 4]), "labels": torch.tensor([1, 1])}, "outside the pool of 4"),
    ({"size": 4, "labeled": torch.tensor([1, 1]), "labels": torch.tensor([1, 1])}, "given more than once"),
    ({"size": 4, "labeled": torch.tensor([1]), "labels": torch.tensor([1, 2])}, "1 positions but 2 labels"),
    ({"size": 4, "labeled": torch.tensor([1.0]), "labels": torch.tensor([1])}, "'labeled' must be a 1-D int64 tensor"),
    ({"size": -1, "labeled": torch.tensor([1]), "labels": torch.tensor([1])}, "size must be an integer >= 0, got -1"),
    ({"size": 4, "labeled": torch.tensor([1])}, "holds size, labeled, labels, got"),
    ([1, 2], "holds size, labeled, labels, got list"),
])
def test_a_bad_state_is_refused_and_leaves_the_pool_as_it_was(state, message):
    pool = pool_of_10()
    with pytest.raises(DltestError, match=message):
        pool.load_state_dict(state)
    assert pool.size == 10 and pool.labeled().tolist() == [0, 2, 5, 7]


def test_a_bad_size_is_refused():
    for size in (-3, 2.5, True, "10"):
        with pytest.raises(DltestError, match="size must be an integer >= 0"):
            LabeledPool(size)
