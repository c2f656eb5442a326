"""textrl: reinforcement learning for text generation.

The shared core: language-model loading and pre-training, configs, rewards, the policy and logging.
Environments live in the ``envs`` package, algorithms in ``agents``.
"""

from textrl.lm import EMBEDDED_MODELS, LMNotFoundError, NotACausalLMError, generate, load_lm

__version__ = "0.1.0"
__all__ = ["EMBEDDED_MODELS", "LMNotFoundError", "NotACausalLMError", "__version__", "generate", "load_lm"]
