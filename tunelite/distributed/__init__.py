"""Running a recipe over several processes: the process group (process.py) and FSDP2 sharding,
sharded loading and saving (sharding.py). The rank queries shared code needs in any process are
in tunelite.runtime.ranks, and cutting whole tensors into shards in tunelite.runtime.shards."""
