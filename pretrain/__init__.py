"""domainlm.pretrain: the megatron-core model spec, Triton kernels, the shard loader, the training
loop, checkpoints and Hugging Face conversion."""
