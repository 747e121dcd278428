"""How the ranks of a run prepare data together: rank 0 does the one-off work, the others wait.

Training a tokenizer or tokenizing a corpus happens once, on rank 0, while the other ranks wait
in a gloo group whose timeout allows hours (distributed.SETUP_TIMEOUT). Whatever rank 0 ends
with travels to every rank: its result, why it failed, or that a stop signal interrupted it, so
no rank waits for a file that never comes or fails with a bare connection error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from metabolic.data.idx import DatasetMissingError
from metabolic.data.file_cache import Interrupted

T = TypeVar("T")


@dataclass
class RankSetup:
    """This rank's part in preparing the data (a lone process: the defaults)."""

    is_main: bool = True
    """This process is rank 0."""
    share: Callable[[Any], Any] = lambda obj: obj
    """Rank 0's object on every rank; every rank calls it and the others wait for rank 0."""
    gather: Callable[[Any], list] = lambda obj: [obj]
    """Every rank's object, in rank order, on every rank."""
    should_stop: Callable[[], bool] = lambda: False
    """True once a stop signal arrived on this rank (long work gives up between pieces)."""

    def barrier(self) -> None:
        self.share(None)

    def on_rank0(self, work: Callable[[], T]) -> T:
        """Run `work` on rank 0 and return its result on every rank. Its failure is raised on every
        rank (DatasetMissingError naming it on the others), and so is a stop (Interrupted)."""
        outcome: dict = {}
        if self.is_main:
            try:
                outcome = {"value": work()}
            except Interrupted as err:
                outcome = {"stopped": str(err)}
            except Exception as err:
                self.share({"error": f"{type(err).__name__}: {err}"})
                raise
            except BaseException:  # a second Ctrl-C quits at once
                self.share({"stopped": "rank 0 quit at once (a second Ctrl-C)"})
                raise
        outcome = self.share(outcome)
        if "stopped" in outcome:
            raise Interrupted(outcome["stopped"])
        if "error" in outcome:
            raise DatasetMissingError(f"rank 0 could not prepare the data: {outcome['error']}")
        return outcome["value"]

    def agree(self, problem: str | None) -> None:
        """Raise on every rank when any rank has a problem (else the others would go on into the
        next collective and wait there for the one that left)."""
        problems = [(rank, p) for rank, p in enumerate(self.gather(problem)) if p]
        if problem:
            raise DatasetMissingError(problem)
        if problems:
            rank, p = problems[0]
            raise DatasetMissingError(f"rank {rank}: {p}")
