"""domainlm.finetune: instruction data, the chat template, PEFT SFT and adapter merging."""
