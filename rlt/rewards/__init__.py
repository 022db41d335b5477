"""Reward functions for RL trainers, TRL-compatible: called with prompts, completions, completion_ids and the
dataset's extra columns as keyword lists; each returns one float per completion.

Exports are resolved lazily so `import rlt.rewards` stays cheap (the teacher reward needs torch models).
"""

_EXPORTS = {
    "TeacherKLReward": "rlt.rewards.teacher",
    "correctness_reward": "rlt.rewards.gsm8k",
    "format_reward": "rlt.rewards.gsm8k",
    "guard_reward": "rlt.rewards.guard",
}


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'rlt.rewards' has no attribute {name!r}")
