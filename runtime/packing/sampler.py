"""Deal packed bins to data-parallel ranks: `PackedSampler`.

Guarantees, for one `PackResult` and the same (seed, dp_size, micro_batch, window) on every
rank — each rank computes the same global schedule on its own, no communication:

- every rank runs the same number of steps per epoch (`len(sampler)`), and at each step
  gets exactly `micro_batch` bins;
- with `drop_remainder=False` (default) every bin — so every packed item — is seen exactly
  once per epoch across all ranks; when the bins do not fill the last step, that step is
  completed with empty padding bins (yielded as empty position arrays: the rank still
  runs the step, so collectives stay in lockstep). With `drop_remainder=True` the last
  partial step is dropped instead, and the bins left out are counted by `remainder()`
  (they differ every epoch, since bins are reshuffled);
- the epoch order is a pure function of (seed, epoch): bins are shuffled per epoch
  (`shuffle_bins`) and so are the items inside each bin (`PackResult.bin_items`);
- per step, the bins are assigned to ranks so that cost is balanced: longest-processing-
  time first with equal counts, cost = tokens + attention_weight * sum(len**2)
  (attention_weight defaults to 1 / seq_len, so a bin holding one full-length sequence
  costs twice one holding many short ones). `imbalance()` reports the result;
- `state_dict()` / `load_state_dict()` resume mid-epoch with no step lost or repeated:
  the state is (epoch, seed, steps consumed) plus the layout it is only valid for.

What a step yields: a list of `micro_batch` int64 arrays of item positions (index
`result.indices`, `result.starts`, `result.lengths` with them), one array per bin. This
fits `torch.utils.data.DataLoader(dataset, batch_sampler=sampler)` with a dataset whose
`__getitem__` takes such an array and returns the collated bin. "Consumed" means handed
out by the iterator: a loader that prefetches hands out steps before they are trained on,
so save a state built with the number of steps actually trained in that case.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from . import _kernels
from ._checks import check_epoch, check_seed, int_at_least
from .algorithms import PackResult, shuffle_bins
from .errors import PackingError


@dataclass(frozen=True)
class Imbalance:
    """Per step, max over ranks / mean over ranks of tokens and of attention cost
    (sum of len**2); 1.0 is perfect balance."""

    tokens: NDArray[np.float64]
    attention: NDArray[np.float64]

    @property
    def worst_tokens(self) -> float:
        return float(self.tokens.max())

    @property
    def mean_tokens(self) -> float:
        return float(self.tokens.mean())

    @property
    def worst_attention(self) -> float:
        return float(self.attention.max())

    @property
    def mean_attention(self) -> float:
        return float(self.attention.mean())

    def summary(self) -> dict[str, float]:
        return {
            "tokens_mean": self.mean_tokens,
            "tokens_worst": self.worst_tokens,
            "attention_mean": self.mean_attention,
            "attention_worst": self.worst_attention,
        }


@dataclass(frozen=True)
class Remainder:
    """How the bins that do not fill the last step were handled in one epoch."""

    policy: str  # "pad": last step completed with empty bins; "drop": last step dropped
    steps: int  # steps per epoch
    padding_bins: int  # empty bins added (policy "pad")
    dropped_bins: int  # bins left out this epoch (policy "drop")
    dropped_sequences: int  # packed items in those bins
    dropped_tokens: int


class PackedSampler:
    """Deal the bins of a `PackResult` to data-parallel ranks (see the module docstring).

    result: the packing. dp_rank, dp_size: this rank and the number of data-parallel
    ranks (the `dp` submesh). micro_batch: bins per rank per step. drop_remainder: drop the
    last partial step instead of padding it with empty bins. window: pool the bins of this
    many consecutive steps and regroup them by cost before dealing (1: keep each step's
    bins; larger: steps of similar bins, better balance, a little less randomness).
    attention_weight: weight of sum(len**2) in the cost (None: 1 / seq_len).
    """

    def __init__(
        self,
        result: PackResult,
        dp_rank: int,
        dp_size: int,
        *,
        seed: int = 0,
        micro_batch: int = 1,
        drop_remainder: bool = False,
        window: int = 1,
        attention_weight: float | None = None,
    ) -> None:
        self.result = result
        self.dp_size = int_at_least("dp_size", dp_size, 1)
        self.dp_rank = int_at_least("dp_rank", dp_rank, 0)
        if self.dp_rank >= self.dp_size:
            raise PackingError(f"dp_rank={self.dp_rank} must be < dp_size={self.dp_size}")
        self.micro_batch = int_at_least("micro_batch", micro_batch, 1)
        self.window = int_at_least("window", window, 1)
        self.drop_remainder = bool(drop_remainder)
        self.seed = check_seed(seed)
        self._epoch = 0
        self._step = 0
        group = self.dp_size * self.micro_batch
        n_bins = result.n_bins
        if self.drop_remainder:
            self.steps_per_epoch = n_bins // group
            if self.steps_per_epoch == 0:
                raise PackingError(
                    f"{n_bins} bins cannot fill one step of dp_size*micro_batch={group} bins "
                    "with drop_remainder=True"
                )
        else:
            self.steps_per_epoch = -(-n_bins // group)
        try:
            weight = 1.0 / result.seq_len if attention_weight is None else float(attention_weight)
        except (TypeError, ValueError):
            raise PackingError(
                f"attention_weight must be a number, got {attention_weight!r}"
            ) from None
        if not weight >= 0.0:  # also rejects NaN
            raise PackingError(f"attention_weight must be >= 0, got {attention_weight!r}")
        self._tokens = result.bin_tokens
        self._attention = result.bin_attention
        self._cost = self._tokens.astype(np.float64) + weight * self._attention.astype(np.float64)
        self._schedule_cache: tuple[int, NDArray[np.int64]] | None = None

    # -- epoch and schedule ---------------------------------------------------------------

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def steps_consumed(self) -> int:
        return self._step

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch to iterate. Setting the current epoch again keeps the progress
        made in it, so `load_state_dict` followed by the usual `set_epoch(epoch)` at the
        top of the epoch loop resumes where the state says."""
        e = check_epoch(epoch)
        if e != self._epoch:
            self._epoch = e
            self._step = 0

    def __len__(self) -> int:
        return self.steps_per_epoch

    def _epoch_bins(self, epoch: int) -> NDArray[np.int64]:
        group = self.dp_size * self.micro_batch
        order = shuffle_bins(self.result, epoch, self.seed)
        used = self.steps_per_epoch * group
        if used <= order.shape[0]:
            return order[:used]
        return np.concatenate([order, np.full(used - order.shape[0], -1, np.int64)])

    def schedule(self, epoch: int | None = None) -> NDArray[np.int64]:
        """The global schedule of an epoch: bin ids [steps, dp_size, micro_batch], -1 for
        an empty padding bin. The same on every rank."""
        e = self._epoch if epoch is None else check_epoch(epoch)
        if self._schedule_cache is not None and self._schedule_cache[0] == e:
            return self._schedule_cache[1]
        plan = _kernels.deal_steps(
            self._epoch_bins(e), self._cost, self.dp_size, self.micro_batch, self.window
        )
        plan.setflags(write=False)
        self._schedule_cache = (e, plan)
        return plan

    def __iter__(self) -> Iterator[list[NDArray[np.int64]]]:
        """Yield this rank's remaining steps of the current epoch; once the epoch is
        exhausted, move on to the next one (so a loop that never calls `set_epoch` still
        gets a new order every epoch)."""
        plan = self.schedule()
        while self._step < self.steps_per_epoch:
            bins = plan[self._step, self.dp_rank]
            # A writable copy: numba compiles read-only arrays as a type of their own.
            pos, sub = _kernels.shuffled_items(
                self.result.offsets, np.array(bins), self.seed, self._epoch
            )
            self._step += 1
            yield [pos[sub[i] : sub[i + 1]] for i in range(bins.shape[0])]
        self._epoch += 1
        self._step = 0

    # -- reports --------------------------------------------------------------------------

    def imbalance(self, epoch: int | None = None, *, naive: bool = False) -> Imbalance:
        """max/mean across ranks, per step, of tokens and of sum(len**2). naive=True
        measures the plain round-robin deal of the same steps, for comparison."""
        plan = self.schedule(epoch)
        if naive:
            e = self._epoch if epoch is None else epoch
            plan = self._epoch_bins(e).reshape(self.steps_per_epoch, self.micro_batch, self.dp_size)
            plan = plan.transpose(0, 2, 1)
        valid = plan >= 0
        safe = np.where(valid, plan, 0)
        out = []
        for per_bin in (self._tokens, self._attention):
            load = np.where(valid, per_bin[safe], 0).sum(axis=2).astype(np.float64)
            mean = load.mean(axis=1)
            out.append(load.max(axis=1) / np.where(mean > 0, mean, 1.0))
        return Imbalance(tokens=out[0], attention=out[1])

    def remainder(self, epoch: int | None = None) -> Remainder:
        """The remainder policy's effect in an epoch (default: the current one)."""
        e = self._epoch if epoch is None else check_epoch(epoch)
        group = self.dp_size * self.micro_batch
        n_bins = self.result.n_bins
        used = self.steps_per_epoch * group
        if not self.drop_remainder:
            return Remainder("pad", self.steps_per_epoch, used - n_bins, 0, 0, 0)
        left = shuffle_bins(self.result, e, self.seed)[used:]
        counts = self.result.offsets[left + 1] - self.result.offsets[left]
        return Remainder(
            "drop",
            self.steps_per_epoch,
            0,
            int(left.shape[0]),
            int(counts.sum()),
            int(self._tokens[left].sum()),
        )

    # -- checkpointing --------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Where this sampler is: epoch, seed, steps consumed in the epoch, and the layout
        (dp_size, micro_batch, window, drop_remainder, n_bins) the state is valid for."""
        return {
            "epoch": self._epoch,
            "seed": self.seed,
            "steps_consumed": self._step,
            "dp_size": self.dp_size,
            "micro_batch": self.micro_batch,
            "window": self.window,
            "drop_remainder": self.drop_remainder,
            "n_bins": self.result.n_bins,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from `state_dict()`. The layout must match: under another dp_size or
        another packing, the remaining steps would repeat or skip sequences."""
        try:
            epoch = check_epoch(state["epoch"])
            seed = check_seed(state["seed"])
            steps = int_at_least("steps_consumed", state["steps_consumed"], 0)
            layout = {
                k: state[k]
                for k in ("dp_size", "micro_batch", "window", "drop_remainder", "n_bins")
            }
        except KeyError as e:
            raise PackingError(f"sampler state is missing {e.args[0]!r}") from None
        mine = {k: v for k, v in self.state_dict().items() if k in layout}
        diff = [f"{k}={layout[k]!r} (now {mine[k]!r})" for k in layout if layout[k] != mine[k]]
        if diff:
            raise PackingError(
                "cannot resume: the sampler state was saved under another layout: "
                + ", ".join(diff)
            )
        if steps > self.steps_per_epoch:
            raise PackingError(
                f"cannot resume: steps_consumed={steps} exceeds the {self.steps_per_epoch} steps of an epoch"
            )
        self.seed = seed
        self._epoch = epoch
        self._step = steps
        self._schedule_cache = None
