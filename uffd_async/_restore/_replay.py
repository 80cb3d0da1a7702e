"""Working sets for a handoff server: record what processes fault on, prefetch it next time.

The handoff server's seam to :mod:`._working_set` and :mod:`._prefetch`: one
:class:`Replay` per server, opened against its snapshot, gives each handoff
its recorder and runs its prefetch beside its ``serve()``. Facts it relies on:

* A working set recorded for another snapshot is not replayed (a warning, and
  serving goes on lazily): prefetch copies from the snapshot being served, so
  it would only cost time, but that is time the process waits for. Recording
  over that very file is refused before serving: it would lose the set.
* Recording and replaying at once refines the set: the recorder starts from
  the replayed set and adds the demand faults the replay did not prevent (the
  union, in order of first appearance). Pages only ever join a set.
* The set is saved (atomically) whenever a recorded process's handoff ends
  and when the server stops, so "restore, run the workload, stop" leaves it.
* Fork children are not prefetched: their memory is a copy of their parent's
  at the fork, populated as far as the parent's was.
* A prefetch stopped part way (a takeover: ``_handoff._takeover``) goes on
  from where it stopped: the working set's runs it copied are skipped (a run
  is the same whoever plans it: the set and the run size decide it), and
  after a handover the successor saves the recording, never the predecessor.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os

import attrs

from .._core._abi import PAGE_SIZE
from .._core._checks import check_instance
from .._core._errors import InvalidArgument
from .._core._uffd import Userfaultfd
from ._prefetch import DEFAULT_RUN_BYTES, PrefetchStats, prefetch
from ._snapshot_resolver import SnapshotResolver
from ._working_set import WorkingSet, WorkingSetError, WorkingSetRecorder

__all__ = ["Replay"]

logger = logging.getLogger("uffd_async")


class Replay:
    """Where to record a working set, which one to prefetch, and whether to populate all."""

    def __init__(
        self,
        *,
        record: str | os.PathLike[str] | None = None,
        prefetch: str | os.PathLike[str] | WorkingSet | None = None,
        populate: bool = False,
        run_bytes: int = DEFAULT_RUN_BYTES,
    ) -> None:
        check_instance("populate", populate, bool)
        self.record_path = None if record is None else os.fspath(record)
        self.working_set: WorkingSet | None = None
        self._prefetch_path: str | None = None
        if isinstance(prefetch, WorkingSet) or prefetch is None:
            self.working_set = prefetch
        else:
            self._prefetch_path = os.fspath(prefetch)
            try:
                self.working_set = WorkingSet.load(prefetch)
            except WorkingSetError:
                raise  # it names the file and what is wrong (an OSError too, as a UffdError)
            except OSError as exc:
                raise InvalidArgument(
                    exc.errno or errno.EINVAL, f"cannot read the working set: {exc}"
                ) from None
        self.populate = populate
        self.run_bytes = run_bytes
        self.recorder: WorkingSetRecorder | None = None
        self._handed_over = False

    @property
    def prefetching(self) -> bool:
        """Whether pages are copied ahead of the faults (a set to replay, or populate)."""
        return self.working_set is not None or self.populate

    @property
    def active(self) -> bool:
        return bool(self.record_path or self.working_set is not None or self.populate)

    def open(self, size: int, identity: bytes) -> None:
        """Check the working set against the snapshot (its size and identity); start
        recording for it."""
        if self.working_set is not None and not self.working_set.matches(size, identity):
            if self._records_over_the_set():
                raise InvalidArgument(
                    errno.EEXIST,
                    f"{self.record_path} holds a working set recorded for another snapshot: "
                    "recording there would overwrite it; record to another file",
                )
            recorded = self.working_set.snapshot_size
            differs = f"size {recorded}, not {size}" if recorded != size else "other contents"
            logger.warning(
                "the working set was recorded for another snapshot (%s): it is not replayed; "
                "serving lazily",
                differs,
            )
            self.working_set = None
        if self.record_path is not None:
            self.recorder = WorkingSetRecorder(size, identity, base=self.working_set)

    def _records_over_the_set(self) -> bool:
        """Whether the recording would be saved over the file the set was read from."""
        if self.record_path is None or self._prefetch_path is None:
            return False
        try:
            return os.path.samefile(self.record_path, self._prefetch_path)
        except OSError:
            return False

    async def run(
        self,
        uffd: Userfaultfd,
        resolver: SnapshotResolver,
        stats: PrefetchStats,
        resume: PrefetchStats | None = None,
    ) -> None:
        """Prefetch for one handoff, beside its ``serve()``; nothing to do without a set.
        ``resume``: how far an earlier prefetch for it got (its stats then); go on from there."""
        working_set = self.working_set
        if resume is not None and (
            resume.populated or (resume.working_set_done and not self.populate)
        ):
            return
        if working_set is not None and resume is not None:
            done = resume.working_set_done
            working_set = None if done else self._rest(working_set, resume.runs)
        if working_set is None and not self.populate:
            stats.working_set_done = True
            return
        await prefetch(
            uffd,
            resolver,
            working_set,
            populate=self.populate,
            run_bytes=self.run_bytes,
            stats=stats,
        )

    def _rest(self, working_set: WorkingSet, runs_done: int) -> WorkingSet:
        """``working_set`` without the pages of its first ``runs_done`` runs."""
        skipped = sum(
            count for _, count in itertools.islice(working_set.runs(self.run_pages), runs_done)
        )
        return attrs.evolve(working_set, pages=working_set.pages[skipped:])

    @property
    def run_pages(self) -> int:
        return self.run_bytes // PAGE_SIZE

    def handed_over(self) -> None:
        """A successor records from now on (it got what was recorded): never save again."""
        self.save()
        self._handed_over = True

    def save(self) -> None:
        """Write what was recorded so far (atomically), if anything."""
        if self.recorder is None or self.record_path is None or not len(self.recorder):
            return
        if self._handed_over:
            return
        try:
            self.recorder.working_set().save(self.record_path)
        except (OSError, WorkingSetError) as exc:
            logger.error("cannot save the working set to %s: %s", self.record_path, exc)
            return
        logger.info("working set: %d pages saved to %s", len(self.recorder), self.record_path)
