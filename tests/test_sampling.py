"""Tests of sampling.py: data order and per-sample seeds that depend only on (seed, global step),
split across ranks so that N processes see exactly the global batches of 1 process."""
import itertools

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from runtime.sampling import GlobalBatchSampler, SeededTransformDataset, ShardSampler, mix_seed, steps_per_epoch


def take(sampler, steps):
    return list(itertools.islice(iter(sampler), steps))


def test_two_ranks_together_give_the_one_rank_global_batches():
    single = take(GlobalBatchSampler(50, 8, seed=3), 20)  # 6 steps per epoch: crosses 3 epochs
    rank0 = take(GlobalBatchSampler(50, 8, rank=0, world_size=2, seed=3), 20)
    rank1 = take(GlobalBatchSampler(50, 8, rank=1, world_size=2, seed=3), 20)
    for whole, part0, part1 in zip(single, rank0, rank1):
        assert len(whole) == 8 and len(part0) == len(part1) == 4
        assert part0 + part1 == whole  # indices and per-sample seeds alike
    four = [take(GlobalBatchSampler(50, 8, rank=r, world_size=4, seed=3), 20) for r in range(4)]
    assert [sum(parts, []) for parts in zip(*four)] == single


def test_resume_at_step_k_continues_the_sequence():
    uninterrupted = take(GlobalBatchSampler(50, 8, seed=1), 25)
    for k in (0, 1, 5, 6, 13):
        assert take(GlobalBatchSampler(50, 8, seed=1, start_step=k), 25 - k) == uninterrupted[k:]
    resumed_rank1 = take(GlobalBatchSampler(50, 8, rank=1, world_size=2, seed=1, start_step=7), 3)
    assert resumed_rank1 == [batch[4:] for batch in uninterrupted[7:10]]


def test_epochs_are_distinct_permutations_without_repeats():
    sampler = GlobalBatchSampler(50, 8, seed=0)
    assert len(sampler) == 6 == steps_per_epoch(50, 8)
    batches = take(sampler, 18)
    epochs = [[index for batch in batches[e * 6:(e + 1) * 6] for index, _ in batch] for e in range(3)]
    for order in epochs:
        assert len(order) == 48 and len(set(order)) == 48 and set(order) <= set(range(50))
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]
    # the same index gets a different augmentation seed in another epoch
    seeds = [{index: seed for batch in batches[e * 6:(e + 1) * 6] for index, seed in batch} for e in range(2)]
    shared = set(seeds[0]) & set(seeds[1])
    assert shared and all(seeds[0][i] != seeds[1][i] for i in shared)
    # and a different seed changes the order
    assert take(GlobalBatchSampler(50, 8, seed=1), 6) != batches[:6]


def test_finite_sampler_gives_one_epoch_and_dataloader_accepts_it():
    finite = GlobalBatchSampler(20, 4, seed=2, infinite=False)
    assert len(list(finite)) == len(finite) == 5
    assert list(finite) == take(GlobalBatchSampler(20, 4, seed=2), 5)
    loader = DataLoader(SeededTransformDataset(IntegerImages(20), None), batch_sampler=finite,
                        collate_fn=lambda items: items)
    seen = [label for batch in loader for _, label in batch]
    assert sorted(seen) == list(range(20))


def test_global_batch_sampler_rejects_bad_settings():
    with pytest.raises(ValueError, match="divisible"):
        GlobalBatchSampler(50, 10, world_size=3)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        GlobalBatchSampler(5, 8)


@pytest.mark.parametrize("num_samples", [0, 1, 7, 10, 13])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_shard_sampler_covers_every_index_once_without_padding(num_samples, world_size):
    shards = [list(ShardSampler(num_samples, rank, world_size)) for rank in range(world_size)]
    assert sum(shards, []) == list(range(num_samples))
    assert [len(ShardSampler(num_samples, r, world_size)) for r in range(world_size)] == [len(s) for s in shards]
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


class IntegerImages(Dataset):
    """Tiny real PIL images; label = index."""

    def __init__(self, n: int):
        rng = np.random.default_rng(0)
        self.images = [Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)) for _ in range(n)]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.images[index], index


class BatchFetching(IntegerImages):
    def __init__(self, n: int):
        super().__init__(n)
        self.batched_calls = 0

    def __getitems__(self, indices):
        self.batched_calls += 1
        return [self[i] for i in indices]


def random_transform():
    return v2.Compose([
        v2.RandomResizedCrop(8, scale=(0.2, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ColorJitter(0.4, 0.4, 0.4, 0.1),
        v2.PILToTensor(),
    ])


def test_seeded_transform_is_a_function_of_index_and_seed():
    dataset = SeededTransformDataset(IntegerImages(6), random_transform())
    keys = [(i, mix_seed(7, i)) for i in range(6)]
    forward = {key: dataset[key][0] for key in keys}
    torch.manual_seed(123)  # the caller's RNG state must not matter
    backward = {key: dataset[key][0] for key in reversed(keys)}
    for key in keys:
        assert torch.equal(forward[key], backward[key])
    # the transform really is random: other seeds give other crops
    others = [dataset[(0, seed)][0] for seed in range(1, 6)]
    assert any(not torch.equal(forward[keys[0]], other) for other in others)
    assert dataset[(3, 5)][1] == 3 and len(dataset) == 6


def test_seeded_transform_leaves_global_rng_alone_and_batched_fetch_matches():
    dataset = SeededTransformDataset(BatchFetching(5), random_transform())
    torch.manual_seed(0)
    expected_next = torch.rand(3)
    torch.manual_seed(0)
    dataset[(2, 11)]
    assert torch.equal(torch.rand(3), expected_next)

    keys = [(4, 1), (0, 2), (2, 3)]
    batched = dataset.__getitems__(keys)
    assert dataset.base.batched_calls == 1
    for (image, label), key in zip(batched, keys):
        single_image, single_label = dataset[key]
        assert torch.equal(image, single_image) and label == single_label == key[0]
    # plain integer indices (evaluation) use seed 0
    assert torch.equal(dataset[1][0], dataset[(1, 0)][0])


def test_seed_table_streams_are_distinct_within_each_kind():
    """Streams seeded the same way must differ, or two draws would share random numbers."""
    from runtime.sampling import SeedStream as S

    for kind in ((S.TEST_SPLIT, S.VALIDATION_SPLIT, S.LABEL_SUBSET),
                 (S.VIEW1, S.VIEW2, S.HEAD_VARIANT, S.EVALUATION_VIEWS),
                 (S.HEAD_FEATURE_ORDER, S.RANDOM_ENCODER)):
        assert len(set(kind)) == len(kind), kind
