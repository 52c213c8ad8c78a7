"""Pipeline parallelism: the model's layers split into contiguous stages, one per ``mx.distributed`` rank.

Each rank loads only its stage's resident weights and opens only its stage's expert files; hidden states
go around the ring (rank 0 -> 1 -> ... -> n-1 -> 0); rank 0 embeds, runs the output head, samples and is
the front end.
"""
