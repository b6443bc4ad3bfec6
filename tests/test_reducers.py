"""Tests of reducers.py: metrics over N Determined slots equal the metrics of 1 slot over the same
data, and the linear-evaluation model choice of appendix C.1 (head picked on validation, reported
on test)."""
import math

import numpy as np
import pytest

from reducers import ValidatedAccuracyReducer, WeightedMeanReducer, combine_means


def feed_mean(reducer: WeightedMeanReducer, values: np.ndarray, batch: int) -> None:
    for start in range(0, len(values), batch):
        chunk = values[start:start + batch]
        reducer.update(chunk.sum(), len(chunk))


def test_weighted_mean_two_slots_equal_one_slot_with_unequal_shards():
    values = np.random.default_rng(0).normal(size=23) * 3 + 1
    shards = [values[:20], values[20:]]  # very unequal shards
    slots = []
    for shard in shards:
        reducer = WeightedMeanReducer()
        feed_mean(reducer, shard, batch=4)
        slots.append(reducer.per_slot_reduce())
    single = WeightedMeanReducer()
    feed_mean(single, values, batch=5)
    one_slot = single.cross_slot_reduce([single.per_slot_reduce()])
    two_slots = WeightedMeanReducer().cross_slot_reduce(slots)
    assert two_slots == pytest.approx(one_slot)
    assert two_slots == pytest.approx(values.mean())
    naive = np.mean([shard.mean() for shard in shards])  # the wrong answer (mean of slot means)
    assert abs(naive - values.mean()) > 1e-3


def test_weighted_mean_reset_and_empty():
    reducer = WeightedMeanReducer()
    reducer.update(10.0, 4)
    reducer.reset()
    assert reducer.per_slot_reduce() == (0.0, 0)
    assert math.isnan(combine_means([(0.0, 0), (0.0, 0)]))
    assert combine_means([(6.0, 3), (0.0, 0)]) == pytest.approx(2.0)


def make_correct(rng, n, accuracies):
    """Per-head, per-sample correctness (top-1 and top-5) with roughly the given accuracies."""
    top1 = np.stack([rng.random(n) < a for a in accuracies])            # [heads, n]
    top5 = top1 | np.stack([rng.random(n) < 0.5 for _ in accuracies])  # top-5 hits include top-1
    return top1, top5


def feed_accuracy(reducer, split, top1, top5, batch):
    for start in range(0, top1.shape[1], batch):
        t1, t5 = top1[:, start:start + batch], top5[:, start:start + batch]
        reducer.update(split, t1.sum(1), t5.sum(1), t1.shape[1])


def test_validated_accuracy_two_slots_equal_one_slot_over_union():
    rates = [0.4, 0.2, 0.1]
    rng = np.random.default_rng(1)
    val1, val5 = make_correct(rng, 31, [0.3, 0.8, 0.5])
    test1, test5 = make_correct(rng, 47, [0.6, 0.4, 0.9])
    single = ValidatedAccuracyReducer(rates)
    feed_accuracy(single, "validation", val1, val5, batch=8)
    feed_accuracy(single, "test", test1, test5, batch=8)
    one_slot = single.cross_slot_reduce([single.per_slot_reduce()])

    slots = []
    for val_part, test_part in ((slice(0, 25), slice(0, 10)), (slice(25, 31), slice(10, 47))):
        reducer = ValidatedAccuracyReducer(rates)
        feed_accuracy(reducer, "validation", val1[:, val_part], val5[:, val_part], batch=3)
        feed_accuracy(reducer, "test", test1[:, test_part], test5[:, test_part], batch=3)
        slots.append(reducer.per_slot_reduce())
    two_slots = ValidatedAccuracyReducer(rates).cross_slot_reduce(slots)
    assert two_slots.keys() == one_slot.keys()
    for key in one_slot:
        assert two_slots[key] == pytest.approx(one_slot[key]), key

    # and both equal the direct computation over the union
    best = int(np.argmax(val1.mean(1)))
    assert one_slot["best_classifier_lr"] == rates[best]
    assert one_slot["validation_accuracy"] == pytest.approx(val1[best].mean())
    assert one_slot["test_accuracy"] == pytest.approx(test1[best].mean())
    assert one_slot["test_top5_accuracy"] == pytest.approx(test5[best].mean())
    for head, lr in enumerate(rates):
        assert one_slot[f"test_accuracy_lr{lr:g}"] == pytest.approx(test1[head].mean())
        assert one_slot[f"validation_accuracy_lr{lr:g}"] == pytest.approx(val1[head].mean())


def test_head_chosen_by_validation_reported_on_test():
    reducer = ValidatedAccuracyReducer([0.1, 0.01])
    # head 1 is best on validation, head 0 is best on test: test_accuracy must be head 1's
    reducer.update("validation", [2, 9], [5, 10], 10)
    reducer.update("test", [18, 6], [20, 15], 20)
    metrics = reducer.cross_slot_reduce([reducer.per_slot_reduce()])
    assert metrics["best_classifier_lr"] == 0.01
    assert metrics["validation_accuracy"] == pytest.approx(0.9)
    assert metrics["test_accuracy"] == pytest.approx(0.3)
    assert metrics["test_top5_accuracy"] == pytest.approx(0.75)


def test_ties_go_to_the_first_head():
    reducer = ValidatedAccuracyReducer([0.4, 0.2, 0.1])
    reducer.update("validation", [3, 7, 7], [9, 9, 9], 10)
    reducer.update("test", [1, 2, 3], [4, 5, 6], 10)
    metrics = reducer.cross_slot_reduce([reducer.per_slot_reduce()])
    assert metrics["best_classifier_lr"] == 0.2
    assert metrics["test_accuracy"] == pytest.approx(0.2)


def test_slot_without_data_and_reset():
    rates = [0.3, 0.1]
    busy, idle = ValidatedAccuracyReducer(rates), ValidatedAccuracyReducer(rates)
    busy.update("validation", [1, 4], [4, 4], 4)
    busy.update("test", [3, 2], [4, 4], 4)
    metrics = busy.cross_slot_reduce([busy.per_slot_reduce(), idle.per_slot_reduce()])
    assert metrics["best_classifier_lr"] == 0.1 and metrics["test_accuracy"] == pytest.approx(0.5)
    busy.reset()
    empty = busy.cross_slot_reduce([busy.per_slot_reduce()])
    assert "test_accuracy" not in empty  # nothing to choose from
