"""The stable-baselines3 bridge: an SB3 actor-critic policy on a causal LM, and a sample-logging callback.

Shape legend: N rows (sub-envs x steps in a minibatch), C observation width, E width, V vocabulary.

Stock SB3 trains the token env unmodified (its own ``DummyVecEnv``, ``make_vec_env``, callbacks,
``save``/``load``, TensorBoard logger)::

    from stable_baselines3 import PPO
    from agents.sb3 import TransformerActorCriticPolicy

    env = envs.TextGenEnv(lm="tiny", reward="keyword_reward", max_new_tokens=24)
    model = PPO(TransformerActorCriticPolicy, env, policy_kwargs={"lm": "tiny"}, tensorboard_log="runs")
    model.learn(20_000)

How it fits SB3's design: the features extractor is the LM trunk and returns the final hidden state at
each row's last valid token (E); ``net_arch=[]`` makes SB3's MLP extractor the identity; the action net
is the LM's own output layer (tied weights intact), so the policy starts as the pretrained LM; the value
net is ``Linear(E, 1)`` (zero-initialised, as in :class:`textrl.policy.ActorCritic`). SB3's orthogonal
init never touches the LM (``ortho_init=True`` only re-initialises the value net). Token ids reach the
trunk as integers (SB3's ``preprocess_obs`` would turn them to floats). The LM stays in eval mode (no
dropout), so rollout and update log-probs agree.

SB3 recomputes the policy over every sub-env's full observation at each step. During collection
(``torch.no_grad`` and eval mode) the trunk of every architecture the engine runs (:mod:`textrl.engine`:
GPT-2, Llama, Mistral, Qwen2/3, MoE) goes through :class:`textrl.prefix_cache.PrefixCache`:
a row that grew by one token runs only that token. The update (``evaluate_actions``, with gradients) is a
full forward over SB3's minibatch, in which an observation that is a prefix of another one in the
minibatch (an earlier step of the same episode) is read off that one's forward instead of being run
(:func:`textrl.prefix_cache.last_hidden`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from gymnasium import spaces
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.distributions import CategoricalDistribution
from stable_baselines3.common.logger import TensorBoardOutputFormat
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from torch import nn

from textrl.engine import Engine
from textrl.lm import load_lm
from textrl.logger import samples_markdown
from textrl.policy import sample
from textrl.prefix_cache import PrefixCache, last_hidden

OBS_KEYS = ("input_ids", "attention_mask")


def _check_spaces(observation_space: spaces.Space, action_space: spaces.Space) -> None:
    if not (isinstance(observation_space, spaces.Dict) and set(OBS_KEYS) <= set(observation_space.spaces)):
        raise ValueError(
            f"TransformerActorCriticPolicy needs a textrl token env: a Dict observation space with keys "
            f"{OBS_KEYS}, got {observation_space}"
        )
    if not isinstance(action_space, spaces.Discrete):
        raise ValueError(f"TransformerActorCriticPolicy needs a Discrete (token id) action space, got {action_space}")


class TransformerExtractor(BaseFeaturesExtractor):
    """The LM trunk: the final hidden state (N, E) at each row's last valid token.

    Args:
        observation_space: the env's ``Dict(input_ids, attention_mask)`` space.
        lm: ``"tiny"`` or a local HF causal-LM folder (anything :func:`textrl.load_lm` takes).
        use_cache: run rows through a :class:`PrefixCache` under ``torch.no_grad`` in eval mode (the
            architectures the engine runs).
    """

    def __init__(self, observation_space: spaces.Dict, lm: str = "tiny", use_cache: bool = True):
        model, tokenizer = load_lm(lm)
        super().__init__(observation_space, features_dim=model.get_input_embeddings().embedding_dim)
        self.model = model.eval()
        self.tokenizer = tokenizer
        core = Engine(model) if Engine.supports(model) else None
        self._core = [core]  # in a list: the core shares the model's parameters and must not be a submodule
        self.cache = PrefixCache(core) if use_cache and core is not None else None

    def forward(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        ids, mask = obs["input_ids"], obs["attention_mask"]
        ids = ids.round().long() if ids.is_floating_point() else ids.long()  # SB3's preprocess_obs makes floats
        mask = mask.long()
        if self.cache is not None and not self.training and not torch.is_grad_enabled():
            return self.cache(ids, mask)
        return last_hidden(self.model, self._core[0], ids, mask)  # (N, E)

    def train(self, mode: bool = True):
        """Keep the LM in eval mode (no dropout); entering training mode frees the cache."""
        self.training = mode
        if mode and self.cache is not None:
            self.cache.clear()
        return self


class LMHead(nn.Module):
    """The LM's own output layer as SB3's action net: logits (N, n) over the env's ``n`` token ids."""

    def __init__(self, head: nn.Module, n_actions: int):
        super().__init__()
        self.head = head
        self.n_actions = n_actions

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.head.weight.shape[0] == self.n_actions:
            return self.head(hidden)
        bias = self.head.bias[: self.n_actions] if getattr(self.head, "bias", None) is not None else None
        return F.linear(hidden, self.head.weight[: self.n_actions], bias)


class TokenDistribution(CategoricalDistribution):
    """SB3's categorical distribution, sampled by inverse CDF (one uniform draw per row).

    ``torch.multinomial`` (what SB3 samples with) draws one number per vocabulary entry, several times the
    cost of one draw per row at a vocabulary of thousands. The distribution is the same; ``mode`` is the
    argmax of the logits (greedy decoding).
    """

    def sample(self) -> torch.Tensor:
        return sample(self.distribution.probs)

    def mode(self) -> torch.Tensor:
        return self.distribution.logits.argmax(-1)


class TransformerActorCriticPolicy(ActorCriticPolicy):
    """SB3 actor-critic on a causal LM: actor = the LM head, critic = ``Linear(E, 1)`` on the last hidden state.

    Args:
        observation_space, action_space, lr_schedule: given by SB3.
        lm: ``"tiny"`` or a local HF causal-LM folder; its tokenizer must be the env's
            (``PPO.load`` reads the architecture and tokenizer from it again, the weights from the zip).
        use_cache: the prefix KV cache during rollouts (architectures the engine runs; others always run the
            full forward).
        share_features_extractor: one trunk for actor and critic (default), or a second LM copy for the critic.
        ortho_init: orthogonally initialise the value net (never the LM); default a zero value net.
        **kwargs: the other :class:`ActorCriticPolicy` keywords (``optimizer_class``, ``optimizer_kwargs``, ...).
    """

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        lr_schedule,
        lm: str = "tiny",
        use_cache: bool = True,
        share_features_extractor: bool = True,
        ortho_init: bool = False,
        **kwargs: Any,
    ):
        _check_spaces(observation_space, action_space)
        fixed = {"net_arch", "features_extractor_class", "features_extractor_kwargs"} & kwargs.keys()
        if fixed:
            raise ValueError(f"TransformerActorCriticPolicy builds its own network; remove {sorted(fixed)}")
        self.lm, self.use_cache = str(lm), use_cache
        super().__init__(
            observation_space,
            action_space,
            lr_schedule,
            net_arch=[],  # the MLP extractor is the identity: actor and critic read the LM's hidden state
            ortho_init=ortho_init,
            features_extractor_class=TransformerExtractor,
            features_extractor_kwargs={"lm": self.lm, "use_cache": use_cache},
            share_features_extractor=share_features_extractor,
            **kwargs,
        )

    def _build(self, lr_schedule) -> None:
        """SB3's ``_build`` for a categorical policy, with the LM head as the action net."""
        self._build_mlp_extractor()
        extractor = self.pi_features_extractor
        head = extractor.model.get_output_embeddings()
        n, vocab, n_tokens = int(self.action_space.n), head.weight.shape[0], len(extractor.tokenizer)
        if vocab < n or n_tokens != n:
            raise ValueError(
                f"the policy LM {self.lm!r} does not fit the env: its tokenizer has {n_tokens} tokens and its "
                f"head {vocab} outputs, but the env's action space has {n} token ids (build the env and the "
                "policy on the same LM)"
            )
        self.action_dist = TokenDistribution(n)
        self.action_net = LMHead(head, n)
        self.value_net = nn.Linear(self.mlp_extractor.latent_dim_vf, 1)
        if self.ortho_init:
            self.init_weights(self.value_net, gain=1.0)
        else:
            nn.init.zeros_(self.value_net.weight)
            nn.init.zeros_(self.value_net.bias)
        self.optimizer = self.optimizer_class(self.parameters(), lr=lr_schedule(1), **self.optimizer_kwargs)

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        for key in ("net_arch", "features_extractor_class", "features_extractor_kwargs"):
            data.pop(key)
        data.update(lm=self.lm, use_cache=self.use_cache, share_features_extractor=self.share_features_extractor)
        return data

    # SB3 preprocesses observations (Box -> float) in BaseModel.extract_features, which get_distribution and
    # predict_values call directly; all three go straight to the trunk here, token ids stay integers.

    def extract_features(self, obs, features_extractor: BaseFeaturesExtractor | None = None):
        if self.share_features_extractor:
            return (features_extractor or self.features_extractor)(obs)
        return self.pi_features_extractor(obs), self.vf_features_extractor(obs)

    def get_distribution(self, obs):
        return self._get_action_dist_from_latent(self.mlp_extractor.forward_actor(self.pi_features_extractor(obs)))

    def predict_values(self, obs) -> torch.Tensor:
        return self.value_net(self.mlp_extractor.forward_critic(self.vf_features_extractor(obs)))

    @property
    def cache_stats(self) -> dict[str, int]:
        """Rows the prefix cache served, per kind (``reused``, ``extended``, ``recomputed``, ``uncached``)."""
        extractors = {id(e): e for e in (self.pi_features_extractor, self.vf_features_extractor)}.values()
        total: dict[str, int] = {}
        for e in extractors:
            if e.cache is not None:
                for key, value in e.cache.stats.items():
                    total[key] = total.get(key, 0) + value
        return total


class SampleLoggingCallback(BaseCallback):
    """Every ``every_n_rollouts`` rollouts (and after the first), log completions of the current policy.

    The completions are sampled by the policy (SB3's ``predict``) on a separate batched copy of the training
    env (:class:`envs.TextGenVectorEnv` built from its keywords), so the rewards are the env's own episode
    returns and the training env is left untouched. They go to TensorBoard's text tab under ``samples`` as a
    markdown table, written straight to the writer of SB3's TensorBoard output (``logger.record`` of a
    string would reach TensorBoard only at the algorithm's next log dump, every 100 iterations for A2C).

    Args:
        every_n_rollouts: rollouts between logs.
        prompts: prompts to complete (default: the first ``n`` of the env's prompt set); the env's rewards
            must not need extra prompt fields for these.
        n: completions per log.
        deterministic: greedy completions instead of sampled ones.
        verbose: 1 prints the table too.
    """

    def __init__(
        self,
        every_n_rollouts: int = 10,
        prompts: list[str] | None = None,
        n: int = 4,
        deterministic: bool = False,
        verbose: int = 0,
    ):
        super().__init__(verbose)
        if every_n_rollouts < 1 or n < 1:
            raise ValueError("every_n_rollouts and n must be >= 1")
        self.every_n_rollouts, self.prompts, self.n, self.deterministic = every_n_rollouts, prompts, n, deterministic
        self.rollouts = 0
        self.last_samples: list[tuple[str, str, float]] = []
        """(prompt, completion, return) of the latest log."""
        self._env = None

    def _on_step(self) -> bool:
        return True

    def _on_rollout_end(self) -> None:
        self.rollouts += 1
        if self.rollouts == 1 or self.rollouts % self.every_n_rollouts == 0:
            self.log_samples()

    def _sample_env(self):
        if self._env is None:
            from envs import TextGenVectorEnv

            try:
                kwargs = dict(self.training_env.get_attr("init_kwargs", indices=[0])[0])
            except AttributeError:
                raise TypeError("SampleLoggingCallback needs a textrl env (TextGenEnv) as the training env") from None
            if self.prompts is not None:
                kwargs["prompts"] = list(self.prompts)
            kwargs["context_length"] = self.model.observation_space["input_ids"].shape[0]  # the policy's width
            self._env = TextGenVectorEnv(num_envs=self.n, **kwargs)
        return self._env

    def log_samples(self) -> list[tuple[str, str, float]]:
        """Complete ``n`` prompts with the current policy, write them to TensorBoard and return them."""
        env = self._sample_env()
        index = np.arange(self.n) % len(env.prompts)
        obs, _ = env.reset(options={"prompt_index": index})
        prompts = [env.prompt_text(i) for i in range(self.n)]
        completions = [""] * self.n
        returns, alive = np.zeros(self.n), np.ones(self.n, dtype=bool)
        while alive.any():
            actions, _ = self.model.predict(obs, deterministic=self.deterministic)
            obs, reward, terminated, truncated, info = env.step(actions)
            returns += reward * alive
            for i in np.flatnonzero((terminated | truncated) & alive):
                completions[i] = info["completion"][i]
            alive &= ~(terminated | truncated)
        self.last_samples = list(zip(prompts, completions, returns.tolist(), strict=True))
        text = samples_markdown(prompts, completions, returns, self.n)
        for fmt in self.logger.output_formats:
            if isinstance(fmt, TensorBoardOutputFormat):
                fmt.writer.add_text("samples", text, self.num_timesteps)
                fmt.writer.flush()
        if self.verbose:
            print(text)
        return self.last_samples
