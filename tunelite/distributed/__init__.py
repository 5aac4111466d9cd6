"""Running a recipe over several processes: the process group (process.py), FSDP2 sharding and
sharded loading and saving (sharding.py), and cutting full tensors into shards (tensors.py).

Kept free of imports so that the shared training and checkpointing code can import
`tunelite.distributed.process` without pulling the sharding code, which imports them in turn.
"""
