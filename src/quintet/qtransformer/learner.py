"""The Q-Transformer objective: per-dimension TD learning (eq. 1), a conservative regulariser (eq. 2)
and Monte-Carlo returns as a lower bound on the target (Chebotar et al. 2023, sec. 4).

Shape glossary: ``b`` batch, ``d`` action dimensions, ``a`` bins per dimension, ``n`` n-step horizon.

Batch (a dict of tensors, what :class:`~quintet.qtransformer.data.ReplayDataset` yields):

- ``obs``, ``next_obs``: observations as the model takes them; ``next_obs`` is ``n`` steps later
  (or the last observation of the episode, ``horizon`` steps later, when it ends sooner).
- ``actions``: bins ``(b, d)`` (``(b,)`` for one dimension).
- ``rewards``: scaled rewards ``(b, n)`` for n-step returns (zeros past the episode end), or ``(b,)``:
  one-step transitions (``next_obs`` one step later) whatever the learner's ``n``.
- ``dones``: ``(b,)``, True where the episode *terminated* within the window (no bootstrap);
  a truncated episode is not done: its value is bootstrapped from ``next_obs``.
- optional ``horizon (b,)`` steps from ``obs`` to ``next_obs`` (default ``n``), ``returns_to_go (b,)``
  (discounted Monte-Carlo return from ``obs``, the lower bound), ``text_embeds (b, e)`` or
  ``text_ids (b, L)`` (an instruction's word ids, for a model with its own instruction encoder).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from quintet.core.validation import check_tensor
from quintet.qtransformer.model import QTransformer

REQUIRED_KEYS = ("obs", "actions", "rewards", "next_obs", "dones")


class QLearner:
    """``learner.loss(batch) -> (loss, metrics)``; ``learner.update_target()`` after each optimizer step.

    The target network is an exponential moving average of the online model:
    ``target <- target_ema * target + (1 - target_ema) * online``. It is a whole copy on every
    process: under FSDP (the online model's parameters sharded ``DTensor``s) each update gathers the
    online weights, so every rank's target stays the same whole network (one all-gather per step, as
    a forward pass makes; the Q-Transformer's models are small enough to keep a whole target).
    """

    def __init__(
        self,
        model: QTransformer,
        *,
        gamma: float = 0.98,
        conservative_weight: float = 1.0,
        n_step: int = 1,
        target_ema: float = 0.99,
        mc_lower_bound: bool = True,
        min_reward: float = 0.0,
        terminal_value: float = 0.0,
    ):
        if not isinstance(model, QTransformer):
            raise TypeError(f"model: expected a QTransformer, got {type(model).__name__}")
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"gamma: expected a discount in [0, 1], got {gamma!r}")
        if conservative_weight < 0:
            raise ValueError(f"conservative_weight: expected >= 0, got {conservative_weight!r}")
        if isinstance(n_step, bool) or not isinstance(n_step, int) or n_step < 1:
            raise ValueError(f"n_step: expected an integer >= 1, got {n_step!r}")
        if not 0.0 <= target_ema < 1.0:
            raise ValueError(f"target_ema: expected a value in [0, 1), got {target_ema!r}")
        self.model = model
        self.gamma, self.conservative_weight, self.n_step = gamma, conservative_weight, n_step
        if not 0.0 <= terminal_value <= 1.0:
            raise ValueError(f"terminal_value: expected a value in [0, 1], got {terminal_value!r}")
        self.target_ema, self.mc_lower_bound, self.min_reward = target_ema, mc_lower_bound, min_reward
        self.terminal_value = terminal_value
        self.target = copy.deepcopy(model).eval()
        self.target.requires_grad_(False)

    @torch.no_grad()
    def update_target(self) -> None:
        online = [whole(parameter) for parameter in self.model.parameters()]
        target = list(self.target.parameters())
        torch._foreach_lerp_(target, online, 1.0 - self.target_ema)

    # ---------------------------------------------------------------- batch checks

    def _check_batch(self, batch: dict) -> dict:
        if not isinstance(batch, dict):
            raise TypeError(f"batch: expected a dict of tensors, got {type(batch).__name__}")
        missing = [key for key in REQUIRED_KEYS if key not in batch]
        if missing:
            raise ValueError(f"batch: missing key(s) {missing}; expected {list(REQUIRED_KEYS)}")
        b = batch["obs"].shape[0]
        rewards = check_tensor(batch["rewards"], "batch['rewards']", ndim=(1, 2), dtype="float")
        if rewards.shape[0] != b or (rewards.ndim == 2 and rewards.shape[1] != self.n_step):
            raise ValueError(
                f"batch['rewards']: expected (b={b},) or (b={b}, n_step={self.n_step}), got {tuple(rewards.shape)}"
            )
        dones = check_tensor(batch["dones"], "batch['dones']", ndim=1)
        if dones.shape[0] != b:
            raise ValueError(f"batch['dones']: expected (b={b},), got {tuple(dones.shape)}")
        for key in ("horizon", "returns_to_go"):
            if key in batch and tuple(batch[key].shape) != (b,):
                raise ValueError(f"batch[{key!r}]: expected (b={b},), got {tuple(batch[key].shape)}")
        if tuple(batch["next_obs"].shape) != tuple(batch["obs"].shape):
            raise ValueError(
                f"batch['next_obs']: expected the shape of obs {tuple(batch['obs'].shape)}, "
                f"got {tuple(batch['next_obs'].shape)}"
            )
        actions = batch["actions"]
        num_actions = self.model.config.num_actions
        expected = (b,) if num_actions == 1 else (b, num_actions)
        if isinstance(actions, torch.Tensor) and tuple(actions.shape) not in (expected, (b, num_actions)):
            raise ValueError(f"batch['actions']: expected bins {expected}, got {tuple(actions.shape)}")
        return batch

    # ---------------------------------------------------------------- targets and loss

    @torch.no_grad()
    def targets(self, batch: dict) -> torch.Tensor:
        """Regression targets for the Q-value of each taken bin, ``(b, d)``, from the target network."""
        batch = self._check_batch(batch)
        text, text_ids = batch.get("text_embeds"), batch.get("text_ids")
        b = batch["obs"].shape[0]
        actions = batch["actions"].reshape(b, -1)
        q_along_actions = None
        if actions.shape[1] == 1:
            next_q = self.target(batch["next_obs"], text_embeds=text, text_ids=text_ids)
        else:
            # one target pass over s and s': the first dimension's Q-values come before any action token
            # of the causal decoder, so s' can carry the data's actions without changing them
            both = self.target(
                torch.cat((batch["obs"], batch["next_obs"])),
                actions=actions.repeat(2, 1),
                text_embeds=None if text is None else text.repeat(2, 1),
                text_ids=None if text_ids is None else text_ids.repeat(2, 1),
            )
            q_along_actions, next_q = both[:b], both[b:, 0]
        return td_targets(
            next_q,
            q_along_actions,
            batch["rewards"],
            batch["dones"],
            gamma=self.gamma,
            horizon=batch.get("horizon"),
            returns_to_go=batch.get("returns_to_go") if self.mc_lower_bound else None,
            terminal_value=self.terminal_value,
        )

    def loss(self, batch: dict, module: nn.Module | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """TD error on taken bins + conservative penalty on the others. ``module``: the model as the
        Trainer wraps it (DDP / compiled); defaults to the online model."""
        module = self.model if module is None else module
        targets = self.targets(batch)
        b = batch["obs"].shape[0]
        actions = batch["actions"].reshape(b, -1).long()
        given = actions if actions.shape[1] > 1 else None
        q = module(
            batch["obs"], actions=given, text_embeds=batch.get("text_embeds"), text_ids=batch.get("text_ids")
        ).reshape(b, actions.shape[1], -1)
        td, conservative = q_losses(q, actions, targets, min_reward=self.min_reward)
        loss = td + self.conservative_weight * conservative
        metrics = {  # tensors: the Trainer reads them only when it logs (no device sync per step)
            "td_loss": td.detach(),
            "conservative_loss": conservative.detach(),
            "q_mean": q.detach().gather(-1, actions[..., None]).mean(),
            "target_mean": targets.mean(),
        }
        return loss, metrics


def whole(parameter: torch.Tensor) -> torch.Tensor:
    """A parameter's whole value: an FSDP-sharded ``DTensor`` gathered from every rank, else itself."""
    return parameter.full_tensor() if isinstance(parameter, DTensor) else parameter


def td_targets(
    next_q_first_dim: torch.Tensor,
    q_along_actions: torch.Tensor | None,
    rewards: torch.Tensor,
    dones: torch.Tensor,
    *,
    gamma: float,
    horizon: torch.Tensor | None = None,
    returns_to_go: torch.Tensor | None = None,
    terminal_value: float = 0.0,
) -> torch.Tensor:
    """Targets ``(b, d)`` of paper eq. 1 from target-network Q-values.

    - ``next_q_first_dim (b, a)``: ``Q_target(s', a_1)`` over the first dimension's bins;
    - ``q_along_actions (b, d, a)``: ``Q_target(s, a_1..a_{i-1}, .)`` teacher-forced on the data's
      actions (None for one dimension);
    - ``rewards (b,)`` or ``(b, n)``, ``dones (b,)`` (terminated), ``horizon (b,)`` (default ``n``),
      ``returns_to_go (b,)`` for the Monte-Carlo lower bound;
    - ``terminal_value``: the value of the state after a termination (see ``RewardScaler.terminal_value``:
      0 when raw reward 0 scales to 0).
    """
    rewards = rewards.float()
    if rewards.ndim == 1:
        rewards = rewards[:, None]
    discounts = gamma ** torch.arange(rewards.shape[1], device=rewards.device, dtype=rewards.dtype)
    horizon = torch.full_like(rewards[:, 0], rewards.shape[1]) if horizon is None else horizon.to(rewards.dtype)
    done = dones.to(rewards.dtype)
    # eq. 1, last dimension: sum_k gamma^k r_k + gamma^n (1 - done) max_{a_1} Q_target(s', a_1); a terminated
    # episode continues in an absorbing state worth terminal_value (0 unless the reward scale shifts 0)
    bootstrap = (1.0 - done) * next_q_first_dim.amax(dim=-1) + done * terminal_value
    targets = ((rewards * discounts).sum(dim=1) + gamma**horizon * bootstrap)[:, None]
    if q_along_actions is not None:
        # eq. 1, dimensions i < d: max_{a_{i+1}} Q_target(s, a_1..a_i, a_{i+1})
        targets = torch.cat((q_along_actions[:, 1:].amax(dim=-1), targets), dim=1)
    if returns_to_go is not None:
        # sec. 4.3: the data's Monte-Carlo return lower-bounds Q*(s, a_1..a_i) for every dimension i
        targets = torch.maximum(targets, returns_to_go.to(targets.dtype)[:, None])
    return targets


def q_losses(
    q: torch.Tensor, actions: torch.Tensor, targets: torch.Tensor, *, min_reward: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both terms of paper eq. 2 for Q-values ``q (b, d, a)``, data bins ``actions (b, d)`` and
    ``targets (b, d)``: the TD error of the taken bins and the conservative penalty of the others."""
    q_taken = q.gather(-1, actions[..., None])[..., 0]
    td = 0.5 * (q_taken - targets).pow(2).mean()  # eq. 2, first term: TD regression on the data's bins
    not_taken = torch.ones_like(q).scatter(-1, actions[..., None], 0.0)
    # eq. 2, second term: bins the data did not take are pushed down to the minimum reward
    conservative = 0.5 * ((q - min_reward).pow(2) * not_taken).sum(-1) / not_taken.sum(-1)
    return td, conservative.mean()
