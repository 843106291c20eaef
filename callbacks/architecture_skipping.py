"""``ArchitectureSkipping``: seed 002 (DAS) in one run — a frozen backbone with parallel
adapters, a bandit search for the layers that matter least to the task, then training with those
layers skipped and replaced by skip adapters."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from vlcompress.callbacks.base import CompressionCallback
from vlcompress.compress.adapters import (
    BottleneckAdapter,
    add_parallel_adapters,
    block_width,
    key_of,
)
from vlcompress.compress.skipping import SkipGates
from vlcompress.models.anatomy import Modality
from vlcompress.registry import register

__all__ = ["ArchitectureSkipping", "DEFAULT_TRAINABLE"]

log = logging.getLogger(__name__)

DEFAULT_TRAINABLE = ("pooler", "token_type", "task_head", "classifier")
"""Model parameters that train beside the adapters (regexes searched in parameter names), on
top of the anatomy's head modules: the seed's task head, pooler and token-type embeddings."""


@register("callback", "architecture_skipping")
class ArchitectureSkipping(CompressionCallback):
    """Adapt a frozen backbone with bottleneck adapters and skip its ``skip`` least useful
    arms, chosen by a bandit search during the same run (seed 002, DAS).

    Phases, by epoch:

    * **search** (epochs ``0 .. search_epochs - 1``): every optimiser step trains under
      ``skip`` distinct arms drawn in proportion to the gates' probabilities, each skipped arm
      replaced by its skip adapter. From epoch ``warmup_epochs`` on, every ``interval``
      optimiser steps ``probes`` distinct skip sets are scored without gradient, in
      evaluation mode, on the next batch of the reward stream (the validation loader, cycled
      in its fixed order; never the batches trained on), and the gates are updated
      (:class:`~vlcompress.compress.skipping.SkipGates`). Probe losses are averaged over DDP
      ranks, so every rank holds the same gates.
    * **skipping** (the remaining epochs): the ``skip`` arms with the highest gates stay
      skipped, each replaced by its skip adapter. With ``restart: backbone`` (the seed) the
      LightningModule's trainable parameters go back to their values at the start of the run, the adapters
      are drawn afresh and the optimisers' state is cleared (the learning-rate schedule goes
      on: give the skipping phase its own warm-up by scheduling over the whole run);
      ``restart: continue`` keeps the search's weights.

    Validation and test see the adapted model (the chosen arms skipped after the search); at
    the switch, Lightning's ``ModelCheckpoint`` forgets its best so far, so the best checkpoint
    is one of the skipping phase. The backbone is frozen: only the adapters (owned by the callback, trained by its
    optimiser at ``adapter_lr``) and the model parameters matching ``trainable`` or the
    anatomy's head modules train. Gates, their history, the phase, the chosen set, the reward
    stream's position and the initial trainable weights are in the checkpoint: a run killed in
    either phase resumes exactly.

    Args:
        skip: arms skipped together (ViLT 1, METER 4 halves in the seed); 0: adapters only
            (no search, nothing skipped: the parameter-efficient baseline).
        arms: the arms (declared layer names); default the anatomy's cross-modal layers, or
            all its layers when it has none.
        search_epochs: epochs of the search phase (warm-up included).
        warmup_epochs: epochs of training under random skip sets before the gates move.
        interval: optimiser steps between two gate updates.
        probes: skip sets scored per update.
        gate_lr: step of the gate update.
        bottleneck: units of each parallel adapter (0: none).
        skip_bottleneck: units of each skip adapter.
        adapter_init: ``"seed"`` (N(0, 0.02) projections) or ``"zero"`` (zero up-projection:
            the adapted model starts as the backbone).
        adapter_lr: rate of the callback's Adam over the adapters.
        trainable: regexes of model parameter names that train beside the adapters.
        restart: ``"backbone"`` or ``"continue"`` (see above).
        choose: which arms the skipping phase skips: ``top`` (the highest gates: DAS),
            ``bottom`` (the lowest gates) or ``random`` (a seeded random set of ``skip`` arms);
            the last two are controls for the search, run with the same schedule.
        seed_compatible: score as the seed's code does: always on the reward stream's first
            batch, in training mode (dropout on), every ``interval`` training-step calls
            (micro-batches, not optimiser steps), each rank on its own (gates may differ
            across ranks).
        seed, model_attr, patterns, name: see :class:`CompressionCallback`.

    Example::

        trainer = L.Trainer(max_epochs=6, callbacks=[ArchitectureSkipping(skip=1)])
    """

    skip_unused_owned = True  # an arm's skip adapter moves only in steps that skip the arm

    def __init__(
        self,
        skip: int = 1,
        arms: list[str] | None = None,
        search_epochs: int = 3,
        warmup_epochs: int = 1,
        interval: int = 10,
        probes: int = 3,
        gate_lr: float = 1.0,
        bottleneck: int = 96,
        skip_bottleneck: int = 192,
        adapter_init: str = "seed",
        adapter_lr: float = 1e-3,
        trainable: list[str] = list(DEFAULT_TRAINABLE),  # noqa: B006 - copied
        restart: str = "backbone",
        seed_compatible: bool = False,
        choose: str = "top",
        *,
        seed: int | None = None,
        model_attr: Any = None,
        patterns: Any = None,
        name: str | None = None,
    ) -> None:
        super().__init__(seed=seed, model_attr=model_attr, patterns=patterns, name=name)
        self.skip = self.check_argument("skip", skip, int, low=0)
        self.arm_names = None if arms is None else [str(a) for a in arms]
        self.search_epochs = self.check_argument("search_epochs", search_epochs, int, low=1)
        self.warmup_epochs = self.check_argument("warmup_epochs", warmup_epochs, int, low=0)
        if self.warmup_epochs >= self.search_epochs:
            raise ValueError(
                f"ArchitectureSkipping: warmup_epochs ({warmup_epochs}) must be below "
                f"search_epochs ({search_epochs}), or the gates never move."
            )
        self.interval = self.check_argument("interval", interval, int, low=1)
        self.probes = self.check_argument("probes", probes, int, low=2)
        self.gate_lr = float(self.check_argument("gate_lr", gate_lr, (int, float)))
        self.bottleneck = self.check_argument("bottleneck", bottleneck, int, low=0)
        self.skip_bottleneck = self.check_argument("skip_bottleneck", skip_bottleneck, int, low=1)
        self.adapter_init = self.check_argument(
            "adapter_init", adapter_init, str, choices=["seed", "zero"]
        )
        self.adapter_lr = float(self.check_argument("adapter_lr", adapter_lr, (int, float)))
        self.trainable = [re.compile(p) for p in trainable]
        self.restart = self.check_argument(
            "restart", restart, str, choices=["backbone", "continue"]
        )
        self.seed_compatible = bool(self.check_argument("seed_compatible", seed_compatible, bool))
        self.choose = self.check_argument(
            "choose", choose, str, choices=["top", "bottom", "random"]
        )
        self.forward_calls = 0
        self.gates: SkipGates | None = None
        self.phase = "search" if self.skip else "skipping"  # skip 0: adapters only
        self.chosen: list[str] = []
        self.reward_cursor = 0
        self.probe_log: list[dict[str, Any]] = []
        self._initial: dict[str, torch.Tensor] | None = None
        self._reward_iter: Iterator[Any] | None = None
        self._frozen: dict[str, bool] = {}
        self.costs: dict[str, Any] = {}
        self.trainable_in_model = 0

    # ------------------------------------------------------------------ set-up
    def _default_arms(self) -> list[str]:
        cross = [x.name for x in self.anatomy.layers if x.modality == Modality.CROSS]
        return cross or [x.name for x in self.anatomy.layers]

    def preflight(self, model: nn.Module) -> list[str]:
        """Unknown arms; ``skip`` not below the number of arms."""
        problems = super().preflight(model)
        anatomy = self.preflight_anatomy(model)
        if anatomy is None:
            return problems
        declared = {x.name for x in anatomy.layers}
        arms = self.arm_names
        if arms is None:
            cross = [x.name for x in anatomy.layers if x.modality == Modality.CROSS]
            arms = cross or sorted(declared)
        unknown = [a for a in arms if a not in declared]
        if unknown:
            problems.append(
                f"arms {unknown} are not declared layers (the model has {sorted(declared)})"
            )
        if self.skip >= len(arms):
            what = self.advise(lightning="skip", vlcompress="options.skip")
            problems.append(f"{what}={self.skip} but there are only {len(arms)} arms {arms}")
        return problems

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Make and hook the adapters (every stage: validation and test see the adapted model,
        with the chosen arms skipped after the search); for fit, also freeze the backbone,
        build the gates and wrap the training step."""
        super().setup(trainer, pl_module, stage)
        arms = self.arm_names or self._default_arms()
        if self.gates is None and self.skip:
            self.gates = SkipGates(arms, self.skip, self.gate_lr)
        if stage == "fit":
            heads = tuple(f"{h}." for h in self.anatomy.head_modules)
            self._frozen = {}
            for n, p in self.model.named_parameters():
                keep = any(r.search(n) for r in self.trainable) or n.startswith(heads)
                if not keep and p.requires_grad:
                    self._frozen[n] = True
                    p.requires_grad_(False)
            self.add_effect("frozen backbone", self._unfreeze)
            self.trainable_in_model = sum(
                p.numel() for p in pl_module.parameters() if p.requires_grad
            )
            if self._initial is None and self.phase == "search" and self.restart == "backbone":
                self._initial = {  # the LightningModule's: a head may sit outside the model
                    n: p.detach().clone()
                    for n, p in pl_module.named_parameters()
                    if p.requires_grad
                }
        fresh = "parallel" not in self.owned and "skip_adapters" not in self.owned
        if self.bottleneck:
            parallel = self.own_module("parallel", nn.ModuleDict())
            added = add_parallel_adapters(
                self.model, self.anatomy, self.bottleneck, self.adapter_init, adapters=parallel
            )
            self.add_effect("parallel adapters", added.remove)
        skip_adapters = self.own_module("skip_adapters", nn.ModuleDict())
        for arm in arms if self.skip else []:
            key = key_of(arm)
            if key not in skip_adapters:
                skip_adapters[key] = self._skip_adapter(arm)
        if fresh:  # the same first adapters on every rank (owned modules are not broadcast)
            g = self.generator(0, salt="adapters")
            for module in self.owned.values():
                for m in module.modules():
                    if isinstance(m, BottleneckAdapter):
                        _reinit(m, self.adapter_init, g)
        self.add_effect("skipped arms", self._unskip_all)
        if self.phase == "skipping":
            self._skip(self.chosen)
        if stage == "fit":
            self.wrap_training_step(pl_module, self._step)

    def _skip_adapter(self, arm: str) -> nn.Module:
        spec = self.anatomy.layer(arm)
        modules = dict(self.model.named_modules())
        width = block_width(self.anatomy, modules, (spec.attentions or spec.ffns)[0])
        mods = [BottleneckAdapter(width, self.skip_bottleneck, self.adapter_init, residual=True)
                for _ in spec.streams]  # fmt: skip
        return mods[0] if len(mods) == 1 else nn.ModuleList(mods)

    def _unfreeze(self) -> None:
        params = dict(self.model.named_parameters())
        for n in self._frozen:
            params[n].requires_grad_(True)

    def _skip(self, arms: Sequence[str]) -> None:
        adapters = self.owned["skip_adapters"]
        for arm in arms:
            a = adapters[key_of(arm)]
            self.anatomy.skip_layer(self.model, arm, list(a) if isinstance(a, nn.ModuleList) else a)

    def _unskip_all(self) -> None:
        arms = set(self.gates.arms) if self.gates is not None else set()
        for arm in self.anatomy.skipped(self.model):
            if arm in arms:  # another callback's skipped layers stay skipped
                self.anatomy.unskip_layer(self.model, arm)

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        """Build the owned optimiser; warn when the run ends before the skipping phase."""
        super().on_fit_start(trainer, pl_module)
        last = getattr(trainer, "max_epochs", None)
        ends_early = last is not None and last != -1 and last <= self.search_epochs
        if self.skip and ends_early and self.is_global_zero:
            log.warning(
                "ArchitectureSkipping: max_epochs=%d ends within the search (search_epochs=%d): "
                "no layer will be skipped; train for more epochs than search_epochs.",
                last, self.search_epochs,
            )  # fmt: skip

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Check that the checkpoint searched over these arms with this ``skip`` (before its
        adapter weights are loaded), then take its state back."""
        state = state_dict.get("state") or {}
        gates = state.get("gates") or {}
        saved_skip = int(state.get("skip", gates.get("skip", 0) if gates else 0))
        saved_arms = list(state.get("arms", gates.get("arms", [])))
        arms = self.gates.arms if self.gates is not None else saved_arms
        if saved_skip != self.skip or saved_arms != arms:
            raise ValueError(
                f"ArchitectureSkipping: the checkpoint searched over arms {saved_arms} with "
                f"skip={saved_skip}; this run is configured for {arms} with skip={self.skip}. "
                "Resume with the same arms and skip, or start a new run folder."
            )
        super().load_state_dict(state_dict)

    def configure_owned_optimizer(self, params: list[torch.Tensor]) -> torch.optim.Optimizer:
        """Adam over the adapters at ``adapter_lr``."""
        return torch.optim.Adam(params, lr=self.adapter_lr)

    # ------------------------------------------------------------------ phases
    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        """Switch to the skipping phase at epoch ``search_epochs``."""
        if self.phase == "search" and trainer.current_epoch >= self.search_epochs:
            self._switch(trainer)

    def _switch(self, trainer: Any) -> None:
        assert self.gates is not None
        self.chosen = self.decide(self._choice)  # rank 0's (seed_compatible gates may differ)
        log.info("ArchitectureSkipping: search done after %d gate updates; skipping %s (gates %s)",
                 self.gates.updates, self.chosen, [round(g, 3) for g in self.gates.gates.tolist()])  # fmt: skip
        if self.restart == "backbone":
            params = dict(trainer.lightning_module.named_parameters())
            with torch.no_grad():
                for n, v in (self._initial or {}).items():
                    params[n].copy_(v.to(params[n].device))
            g = self.generator(salt="restart")
            for module in self.owned.values():
                for m in module.modules():
                    if isinstance(m, BottleneckAdapter):
                        _reinit(m, self.adapter_init, g)
            for opt in [*trainer.optimizers, self._owned_opt]:
                if opt is not None:
                    opt.state.clear()
        self._initial = None
        self.phase = "skipping"
        self._skip(self.chosen)
        for cb in getattr(trainer, "checkpoint_callbacks", []):
            if getattr(cb, "monitor", None) and getattr(cb, "best_k_models", None):
                # a model of the search phase is not the method's result: its checkpoints
                # count as the worst, so the skipping phase's first one replaces them (in
                # the same files)
                worst = cb.kth_value.new_tensor(float("inf") if cb.mode == "min" else -float("inf"))
                cb.best_k_models = {path: worst.clone() for path in cb.best_k_models}
                cb.kth_value, cb.best_model_score = worst.clone(), worst.clone()
                cb.best_model_path = ""  # no skipping-phase checkpoint yet: test the last weights
                log.info("ArchitectureSkipping: %s chooses its best among the skipping "
                         "phase's checkpoints", type(cb).__name__)  # fmt: skip

    def _choice(self) -> list[str]:
        """The arms to skip after the search, as ``choose`` says."""
        assert self.gates is not None
        if self.choose == "top":
            return self.gates.top()
        if self.choose == "bottom":
            return self.gates.bottom()
        order = torch.randperm(len(self.gates.arms), generator=self.generator(salt="choice"))
        return [self.gates.arms[i] for i in sorted(order[: self.skip].tolist())]

    def _costs(self, step: Any) -> dict[str, Any]:
        """MACs per example of the training step's forward on one reward batch (its padding
        included): every arm, the chosen set skipped, and each arm skipped alone (adapters
        included)."""
        from torch.utils.flop_counter import FlopCounterMode

        trainer, pl_module = self._trainer, self._trainer.lightning_module
        if self._reward_iter is None:
            self._reward_iter = self._reward_batches()
        batch = trainer.strategy.batch_to_device(next(self._reward_iter))
        self.reward_cursor += 1
        n = len(batch[0]) if isinstance(batch, (tuple, list)) else len(batch)

        def macs(skipped: Sequence[str]) -> int:
            self._skip(skipped)
            was = pl_module.training
            pl_module.eval()
            try:
                counter = FlopCounterMode(display=False)
                with torch.no_grad(), self.quiet_logging(pl_module):
                    step(batch, 0)  # a skipped layer's first call runs it once to learn its output
                    with counter:
                        step(batch, 0)
            finally:
                pl_module.train(was)
                self._unskip_all()
            return int(counter.get_total_flops()) // 2 // max(n, 1)

        chosen = list(self.chosen)
        self._unskip_all()
        try:
            full = macs([])
            costs = {
                "full": full,
                "skipped": macs(chosen),
                "saved_by_arm": {
                    arm: full - macs([arm]) for arm in (self.gates.arms if self.gates else [])
                },
            }
        finally:
            self._skip(chosen)
        log.info("ArchitectureSkipping: %s MACs per example, %.1f%% fewer than with every arm",
                 f"{costs['skipped']:,}", 100 * (1 - costs["skipped"] / max(full, 1)))  # fmt: skip
        return costs

    # ------------------------------------------------------------------ the training step
    def _step(self, step: Any, *args: Any, **kwargs: Any) -> Any:
        if self.phase != "search":
            if not self.costs:
                try:
                    self.costs = self._costs(step)
                except Exception as e:  # costs only feed the report: never stop training
                    log.warning("ArchitectureSkipping: could not count MACs: %s", e)
                    self._unskip_all()
                    self._skip(self.chosen)
                    self.costs = {"error": str(e)}
            return step(*args, **kwargs)
        trainer = self._trainer
        global_step = int(trainer.global_step)
        if self._due_probe(trainer):  # once per optimiser step, before its first micro-batch
            self._probe(step)
        arms = self.gates.draw(self.generator(global_step, salt="train"))
        self._skip([self.gates.arms[i] for i in arms])
        try:
            return step(*args, **kwargs)
        finally:
            self._unskip_all()

    def _due_probe(self, trainer: Any) -> bool:
        if trainer.current_epoch < self.warmup_epochs:
            return False
        if self.seed_compatible:  # every `interval` micro-batches
            self.forward_calls += 1
            return self.forward_calls % self.interval == 0
        step = int(trainer.global_step)
        last = self.probe_log[-1]["step"] if self.probe_log else -1
        return step % self.interval == 0 and step != last

    def _reward_batches(self, start: int | None = None) -> Iterator[Any]:
        trainer = self._trainer
        loaders = trainer.val_dataloaders
        if loaders is None:
            trainer.fit_loop.epoch_loop.val_loop.setup_data()
            loaders = trainer.val_dataloaders
        loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
        if loader is not None:  # its own loader: a persistent-worker iterator is shared
            loader = _plain_loader(loader)
        if loader is None:
            raise ValueError(
                "ArchitectureSkipping scores skip sets on held-out batches: give the Trainer a "
                "validation loader (limit_val_batches > 0), a held-out part of the training split."
            )
        n = len(loader)
        skip = (self.reward_cursor if start is None else start) % n
        while True:
            for i, batch in enumerate(loader):
                if skip:
                    if i < skip:
                        continue
                    skip = 0
                yield batch

    def _probe(self, step: Any) -> None:
        """Score ``probes`` skip sets on the next reward batch and update the gates. It runs on
        its own random stream, seeded by the step: it neither draws from the global RNG
        (the training stream goes on as without probes) nor depends on it. A model that draws
        in its forward (ViLT orders its patches by ``torch.multinomial``) and a resumed run
        whose reward stream starts a new data iterator (one draw) score the same."""
        device = next(iter(self._trainer.lightning_module.parameters()), torch.empty(0)).device
        forked = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=forked):
            torch.random.default_generator.manual_seed(
                self.generator(salt="probe-rng").initial_seed()
            )
            if device.type == "cuda":
                torch.cuda.manual_seed(self.generator(salt="probe-rng-cuda").initial_seed())
            self._scored_probe(step)

    def _scored_probe(self, step: Any) -> None:
        trainer, pl_module = self._trainer, self._trainer.lightning_module
        if self.seed_compatible:  # the same (first) batch every time
            batch = next(self._reward_batches(start=0))
        else:
            if self._reward_iter is None:
                self._reward_iter = self._reward_batches()
            batch = next(self._reward_iter)
            self.reward_cursor += 1
        batch = trainer.strategy.batch_to_device(batch)
        sets = self.gates.probe_sets(self.probes, self.generator(salt=f"probe{self.forward_calls}"))
        losses = []
        was_training = pl_module.training
        pl_module.train(self.seed_compatible)  # the seed scores with dropout on
        try:
            with torch.no_grad(), self.quiet_logging(pl_module):
                for s in sets:
                    self._skip([self.gates.arms[i] for i in s])
                    try:
                        out = step(batch, 0)
                    finally:
                        self._unskip_all()
                    losses.append(_loss_of(out).float())
        finally:
            pl_module.train(was_training)
        mean = torch.stack(losses)
        if self.world_size > 1 and not self.seed_compatible:
            mean = trainer.strategy.reduce(mean, reduce_op="mean")
        if not torch.isfinite(mean).all():
            log.warning("ArchitectureSkipping: a probe loss is not finite (%s) at step %d; "
                        "the gates stay as they are", mean.tolist(), trainer.global_step)  # fmt: skip
            self.probe_log.append({"step": int(trainer.global_step), "skipped_update": True})
            return
        rewards = self.gates.update(sets, mean.tolist())
        self.probe_log.append(
            {"step": int(trainer.global_step), "sets": [list(s) for s in sets],
             "losses": [round(x, 6) for x in mean.tolist()], "rewards": rewards}
        )  # fmt: skip

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        """Plot the gate trajectories into the run folder (rank 0)."""
        root = getattr(trainer, "default_root_dir", None)
        if self.gates is not None and root and self.is_global_zero:
            from vlcompress.utils.plots import plot_gates

            plot_gates(
                self.gates.history, self.gates.arms, self.chosen, f"{root}/skipping_gates.png"
            )

    # ------------------------------------------------------------------ state and report
    def state(self) -> dict[str, Any]:
        """Gates, phase, chosen set, reward stream position, probe log, initial weights."""
        return {
            "gates": self.gates.state_dict() if self.gates is not None else None,
            "skip": self.skip,
            "arms": list(self.gates.arms) if self.gates is not None else [],
            "phase": self.phase,
            "chosen": list(self.chosen),
            "reward_cursor": self.reward_cursor,
            "probe_log": list(self.probe_log),
            "initial": dict(self._initial) if self._initial is not None else None,
            "costs": self.costs,
            "forward_calls": self.forward_calls,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        """Take back :meth:`state` and re-apply the skipping phase's skipped arms."""
        if state.get("gates") is not None:
            arms = state["gates"]["arms"]
            self.gates = SkipGates(arms, int(state["gates"]["skip"]), self.gate_lr)
            self.gates.load_state_dict(state["gates"])
        self.chosen = list(state.get("chosen", []))
        self.reward_cursor = int(state.get("reward_cursor", 0))
        self.probe_log = list(state.get("probe_log", []))
        self._initial = state.get("initial")
        self.costs = dict(state.get("costs") or {})
        self.forward_calls = int(state.get("forward_calls", 0))
        self._reward_iter = None
        self.phase = state.get("phase", self.phase)
        if self._anatomy is not None and "skip_adapters" in self.owned:  # set up: re-apply
            self._unskip_all()
            if self.phase == "skipping":
                self._skip(self.chosen)

    def report(self) -> dict[str, Any]:
        """The chosen set, final gates and their history, trainable parameters."""
        trainable = {"model": self.trainable_in_model, "adapters": self._adapter_parameters()}
        if self.gates is None:
            if self.skip:
                return {}
            return {"phase": "adapters only", "skip": 0, "chosen": [],
                    "macs_per_example": self.costs, "trainable_parameters": trainable}  # fmt: skip
        return {
            "phase": self.phase,
            "arms": list(self.gates.arms),
            "skip": self.skip,
            "chosen": list(self.chosen),
            "gates": self.gates.gates.tolist(),
            "gate_history": self.gates.history,
            "gate_updates": self.gates.updates,
            "choose": self.choose,
            "macs_per_example": self.costs,
            "trainable_parameters": trainable,
        }

    def _adapter_parameters(self) -> int:
        """Parameters of the adapters in use: the parallel ones, and the skip adapters of the
        chosen arms after the search (of every arm during it)."""
        n = (
            sum(p.numel() for p in self.owned["parallel"].parameters())
            if "parallel" in self.owned
            else 0
        )
        skip = self.owned["skip_adapters"] if "skip_adapters" in self.owned else {}
        used = self.chosen if self.phase == "skipping" else list(skip.keys())
        return n + sum(p.numel() for k in used for p in skip[key_of(k)].parameters())

    def report_rows(self) -> list[tuple[str, str]]:
        """Rows for the results table."""
        if self.gates is None:
            return []
        rows = [
            ("skipped arms", ", ".join(self.chosen) or "(search not finished)"),
            ("gate updates", str(self.gates.updates)),
        ]
        if self.costs.get("full"):
            saved = 1 - self.costs["skipped"] / self.costs["full"]
            rows.append(
                ("MACs per example after skipping", f"{self.costs['skipped']:,} (-{saved:.1%})")
            )
        return rows


def _loss_of(out: Any) -> torch.Tensor:
    if isinstance(out, dict):
        return out["loss"].detach()
    return out.detach()


def _reinit(adapter: BottleneckAdapter, init: str, g: torch.Generator) -> None:
    with torch.no_grad():
        adapter.norm.reset_parameters()
        for lin in (adapter.down, adapter.up):
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 0.02)
            lin.bias.zero_()
        if init == "zero":
            adapter.up.weight.zero_()


def _plain_loader(loader: Any) -> Any:
    """A single-process copy of ``loader`` (same dataset, order and batches)."""
    from torch.utils.data import DataLoader

    if not isinstance(loader, DataLoader):
        return loader
    if loader.batch_size is None:
        return DataLoader(loader.dataset, batch_sampler=loader.batch_sampler,
                          collate_fn=loader.collate_fn, num_workers=0)  # fmt: skip
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=loader.sampler,
                      collate_fn=loader.collate_fn, drop_last=loader.drop_last, num_workers=0)  # fmt: skip
