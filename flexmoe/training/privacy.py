"""DP-SGD for an owner's expert (Abadi et al., 2016), with Opacus, inside the Lightning run.

:class:`PrivateTraining` is what :class:`~flexmoe.ExpertModule` holds when its
:class:`~flexmoe.spec.PrivacyRecipe` trains the expert privately. The protected unit is one packed
training row. Each step:

1. rows are drawn by Poisson sampling (each row independently with probability
   ``sample_rate = batch_size / rows``; :meth:`PrivateTraining.poisson_loader`), as the accountant
   assumes;
2. each row's gradient of exactly the trainable parameters (the expert's MLP, or its LoRA factors,
   and the router tensors, of which only the owner's row and bias move) is taken on its own, one
   row at a time, and clipped to ``max_grad_norm`` by Opacus's ``DPOptimizer``, which sums them;
3. ``DPOptimizer`` adds Gaussian noise of ``noise_multiplier * max_grad_norm`` and divides by the
   expected batch size; the noise on the frozen router rows (the public ``r_0``) is then zeroed,
   so they stay frozen bit for bit; AdamW steps on the result;
4. Opacus's accountant records the step; :meth:`PrivateTraining.epsilon` is the budget spent.

Why one row at a time: :class:`~flexmoe.core.moe.MoEBlock` flattens ``[B, S, H]`` to ``[B*S, H]``
before its experts, so per-layer hooks (Opacus's hooks, functorch and expanded-weights modes) see
tokens, not rows, and the frozen public model needs no per-sample gradient at all. A loop over the
rows costs the parallelism of one batch (docs/privacy.md measures it) and works for every decoder,
router and adapter without a per-module rule.

The noise and the sampling draw from a generator seeded from the operating system, never from
``seed_everything``: a seed in a published config would give the noise back and void the guarantee.
"""

from __future__ import annotations

import math
import secrets
import warnings
from collections.abc import Callable, Mapping

import torch
from torch import nn
from torch.utils.data import DataLoader

from flexmoe.core.errors import InputError
from flexmoe.data.private_statistics import accountant_epsilon, require_opacus
from flexmoe.spec import PrivacyRecipe


def private_generator() -> torch.Generator:
    """A CPU generator seeded from the operating system's entropy (:mod:`secrets`)."""
    return torch.Generator().manual_seed(secrets.randbits(63))


class PrivateTraining:
    """The DP-SGD state of one owner's run: the recipe, the noise multiplier, the sampling rate
    and Opacus's accountant, saved in every checkpoint so a resumed run goes on spending the same
    budget (:meth:`state_dict`).

    Args:
        recipe: the :class:`~flexmoe.spec.PrivacyRecipe` (``trains_privately`` must be true).
    """

    def __init__(self, recipe: PrivacyRecipe):
        if not recipe.trains_privately:
            raise ValueError("the privacy recipe does not train the expert privately (no epsilon or noise multiplier)")
        require_opacus()
        from opacus.accountants import create_accountant  # deferred: an optional extra that loads scipy

        self.recipe = recipe
        self.accountant = create_accountant(recipe.accountant)
        self.noise_multiplier: float | None = recipe.noise_multiplier
        self.sample_rate: float | None = None
        self.generator = private_generator()

    # -- set-up -----------------------------------------------------------------------
    def calibrate(self, num_rows: int, batch_size: int, max_steps: int) -> float:
        """Fix the sampling rate (``batch_size / num_rows``) and, for a target epsilon, the
        smallest noise multiplier that meets it at ``delta`` after ``max_steps`` steps (a resumed
        run then takes the checkpoint's: :meth:`load_state_dict`)."""
        if num_rows < 1:
            raise InputError("DP training needs at least one training row")
        self.sample_rate = min(1.0, batch_size / num_rows)
        if self.noise_multiplier is None:
            from opacus.accountants.utils import get_noise_multiplier

            r = self.recipe
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the accountants' numerics (log of 0, alpha range)
                self.noise_multiplier = float(
                    get_noise_multiplier(
                        target_epsilon=r.target_epsilon,
                        target_delta=r.delta,
                        sample_rate=self.sample_rate,
                        steps=max_steps,
                        accountant=r.accountant,
                    )
                )
        return self.noise_multiplier

    def poisson_loader(self, loader: DataLoader) -> DataLoader:
        """``loader``'s dataset (rows as ``{"input_ids": [S]}``) drawn by Poisson sampling at
        :attr:`sample_rate`: batches of varying size, empty ones included, ``1 / sample_rate``
        of them per epoch."""
        from opacus.utils.uniform_sampler import UniformWithReplacementSampler

        data = loader.dataset
        sampler = UniformWithReplacementSampler(
            num_samples=len(data), sample_rate=self.sample_rate, generator=self.generator
        )
        shape = data[0]["input_ids"].shape

        def collate(rows):
            if not rows:
                return {"input_ids": torch.zeros((0, *shape), dtype=torch.long)}
            return {"input_ids": torch.stack([r["input_ids"] for r in rows])}

        workers = loader.num_workers
        return DataLoader(
            data,
            batch_sampler=sampler,
            collate_fn=collate,
            num_workers=workers,
            pin_memory=loader.pin_memory,
            persistent_workers=workers > 0,
        )

    def wrap(
        self,
        optimizer: torch.optim.Optimizer,
        expected_batch_size: int,
        frozen: Mapping[nn.Parameter, torch.Tensor] | None = None,
    ):
        """``optimizer`` as Opacus's ``DPOptimizer`` (clip, sum, noise, average), whose step also
        zeroes the noise where ``frozen`` masks (parameter -> 0/1 tensor broadcast to it: the
        frozen router rows) and records the step in the accountant."""
        from opacus.optimizers import DPOptimizer

        dp = DPOptimizer(
            optimizer,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.recipe.max_grad_norm,
            expected_batch_size=expected_batch_size,
            generator=self.generator,
        )
        masks = dict(frozen or {})

        def after_noise(opt) -> None:
            for p, mask in masks.items():
                if p.grad is not None:
                    p.grad.mul_(mask.to(p.grad.dtype))
            self.accountant.step(noise_multiplier=opt.noise_multiplier, sample_rate=self.sample_rate)

        dp.attach_step_hook(after_noise)
        return dp

    # -- one step ---------------------------------------------------------------------
    @staticmethod
    def clip_rows(dp_optimizer, ids: torch.Tensor, loss_of: Callable[[torch.Tensor], torch.Tensor]) -> list[float]:
        """Give ``dp_optimizer`` the per-row gradients of ``loss_of(row [1, S])`` for every row of
        ``ids``: all but the last are clipped and summed at once (memory: one gradient, not one per
        row), the last is left in ``grad_sample`` for ``dp_optimizer.step()`` (which clips it, adds
        the noise and steps). An empty batch leaves empty per-row gradients: the step then adds
        noise alone, as DP-SGD must. Returns each row's loss."""
        params = dp_optimizer.params
        losses = []
        if len(ids) == 0:
            for p in params:
                p.grad_sample = p.new_zeros((0, *p.shape))
            return losses
        for i in range(len(ids)):
            loss = loss_of(ids[i : i + 1])
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            for p, g in zip(params, grads):
                p.grad_sample = (g if g is not None else torch.zeros_like(p)).detach().unsqueeze(0)
            if i < len(ids) - 1:
                dp_optimizer.clip_and_accumulate()
            losses.append(float(loss.detach()))
        return losses

    # -- accounting -------------------------------------------------------------------
    @property
    def steps(self) -> int:
        return sum(n for _, _, n in self.accountant.history)

    def epsilon(self, statistics_noise: float | None = None) -> float:
        """The epsilon spent so far at the recipe's delta; with ``statistics_noise`` (the noise
        multiplier of the token counts' Gaussian mechanism), of both together, composed by the
        same accountant."""
        history = list(self.accountant.history)
        if statistics_noise is not None:
            history.append((statistics_noise, 1.0, 1))
        return accountant_epsilon(history, self.recipe.delta, self.recipe.accountant)

    def state_dict(self) -> dict:
        return {
            "history": [list(h) for h in self.accountant.history],
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Resume the accounting of a checkpoint: its history, and the noise and sampling rate it
        trained with (a run resumed on other data or another batch size is refused: its steps
        would be accounted at a rate they were not sampled at)."""
        rate = state.get("sample_rate")
        if rate is not None and self.sample_rate is not None and not math.isclose(rate, self.sample_rate, rel_tol=1e-9):
            raise InputError(
                f"this run samples rows at rate {self.sample_rate:.6g} but the checkpoint's privacy accounting "
                f"used {rate:.6g}: resume on the same data with the same batch size"
            )
        self.accountant.history = [(float(s), float(q), int(n)) for s, q, n in state.get("history", [])]
        self.noise_multiplier = state.get("noise_multiplier", self.noise_multiplier)
        self.sample_rate = rate if rate is not None else self.sample_rate


def privacy_metadata(
    recipe: PrivacyRecipe,
    training: PrivateTraining | None,
    statistics_noise: float | None,
    covers: list[str],
) -> dict[str, str]:
    """The artifact metadata that records what an owner's privacy recipe guarantees
    (:data:`flexmoe.artifacts.expert.PRIVACY_METADATA`): ``dp_epsilon`` at ``dp_delta`` for what
    ``dp_covers`` lists (the expert, the token counts, or both, composed), and each part's own
    settings. Whatever the artifact carries outside ``dp_covers`` was computed exactly."""
    history = list(training.accountant.history) if training is not None else []
    if statistics_noise is not None:
        history.append((statistics_noise, 1.0, 1))
    meta = {
        "dp_epsilon": repr(accountant_epsilon(history, recipe.delta, recipe.accountant)),
        "dp_delta": repr(float(recipe.delta)),
        "dp_accountant": recipe.accountant,
        "dp_covers": ",".join(covers),
    }
    if training is not None:
        meta.update(
            dp_expert_epsilon=repr(training.epsilon()),
            dp_noise_multiplier=repr(float(training.noise_multiplier or 0.0)),
            dp_max_grad_norm=repr(float(recipe.max_grad_norm)),
            dp_sample_rate=repr(float(training.sample_rate or 0.0)),
            dp_steps=str(training.steps),
        )
    if statistics_noise is not None:
        meta.update(
            dp_statistics_epsilon=repr(
                accountant_epsilon([(statistics_noise, 1.0, 1)], recipe.delta, recipe.accountant)
            ),
            dp_statistics_noise_multiplier=repr(float(statistics_noise)),
            dp_statistics_clip=repr(float(recipe.statistics_clip)),
        )
    return meta
