"""rlt: Hydra-configured RL post-training of language models (GRPO and teacher-student RLT) on TRL."""

__version__ = "0.1.0"
