"""Generation backends for the RL recipes: a vLLM engine colocated with the trainer (`rlt.generation.vllm_colocate`),
vLLM servers (`rlt.generation.vllm_server`), and sampling log-probs recorded from HF generate
(`rlt.generation.hf_logprobs`)."""
