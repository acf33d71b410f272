"""domainlm.pretrain.kernels: Triton fused kernels for training."""
