from mnist_mlops.stages.retrain import member_seeds


def test_member_seeds_start_at_the_pipeline_seed_and_never_repeat():
    assert member_seeds(42, 1) == [42]
    seeds = {seed: member_seeds(seed, 3) for seed in (1, 2, 42)}
    assert seeds[42][0] == 42 and seeds[42] == member_seeds(42, 3)
    everything = [s for run in seeds.values() for s in run]
    # Nearby pipeline seeds (1 and 2) must not share a member, or their runs are not independent.
    assert len(set(everything)) == len(everything)
    assert all(0 <= s < 2**32 for s in everything)
