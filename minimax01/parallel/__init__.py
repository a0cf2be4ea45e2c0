"""torch.distributed parallelism applied to a built model from outside: FSDP2, expert parallel, LASP+, ring attention."""
