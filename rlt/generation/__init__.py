"""Generation backends for the RL recipes: a vLLM engine colocated with the trainer (`rlt.generation.vllm_colocate`),
vLLM servers (`rlt.generation.vllm_server`), their client (`rlt.generation.vllm_client`) and the trainer-side backend
that uses it (`rlt.generation.server_patch`), and sampling log-probs recorded from HF generate
(`rlt.generation.hf_logprobs`); and decoding outside training, on HF or vLLM (`rlt.generation.sampling`: evaluation,
distillation)."""
