"""textrl: reinforcement learning for text generation.

The shared core: language-model loading and pre-training, the engine, configs, rewards, the policy,
rollouts and logging. Environments live in the ``envs`` package, algorithms and the command line in
``agents``; the core imports neither (layers point one way: ``agents`` -> ``envs`` -> ``textrl``).
"""

from textrl.lm import EMBEDDED_MODELS, LMNotFoundError, NotACausalLMError, generate, load_lm

__version__ = "0.1.0"
__all__ = ["EMBEDDED_MODELS", "LMNotFoundError", "NotACausalLMError", "__version__", "generate", "load_lm"]
