"""Generation backends for the RL recipes (a vLLM engine colocated with the trainer: `rlt.generation.vllm_colocate`)."""
