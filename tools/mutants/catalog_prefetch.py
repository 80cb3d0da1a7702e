"""Mutants of the prefetcher (uffd_async/_restore/_prefetch.py) and its HTTP part."""

from mutant import Mutant

F = "uffd_async/_restore/_prefetch.py"
HTTP = ["tests/test_http_prefetch.py"]

MUTANTS = [
    Mutant(
        id="prefetch-all-connections",
        file=F,
        old="    limiter = anyio.Semaphore(max(1, source.concurrency // 2))",
        new="    limiter = anyio.Semaphore(source.concurrency)",
        tests=HTTP,
        why="the prefetcher takes every connection: faults wait behind guesses",
    ),
    Mutant(
        id="prefetch-as-demand",
        file=F,
        old="                data = await source.chunk(chunk, demand=False)",
        new="                data = await source.chunk(chunk, demand=True)",
        tests=HTTP,
        why="prefetches compete with faults for connections as equals",
    ),
    Mutant(
        id="prefetch-source-changed-raised",
        file=F,
        old="    except (ProcessExited, UffdClosed, SnapshotClosed, SourceChanged):\n        pass",
        new="    except (ProcessExited, UffdClosed, SnapshotClosed):\n        pass",
        tests=HTTP,
        why="SourceChanged during a replay escapes the prefetch and kills serving",
    ),
    Mutant(
        id="prefetch-source-changed-as-fetch-error",
        file=F,
        old="            except SourceChanged:\n                raise\n",
        new="",
        tests=HTTP,
        why="SourceChanged is a warning per chunk: the prefetch goes on against it",
    ),
    Mutant(
        id="prefetch-source-changed-silent",
        file=F,
        old='            logger.error("prefetch stopped: %s", ended[0])',
        new="            pass",
        tests=HTTP,
        why="a replay stopped by a changed object says nothing",
    ),
    Mutant(
        id="prefetch-fetch-error-ends-it",
        file=F,
        old="                return\n            lo = chunk",
        new="                raise\n            lo = chunk",
        tests=HTTP,
        why="one chunk that cannot be fetched ends the prefetch with an error",
    ),
    Mutant(
        id="prefetch-chunk-end-floor",
        file=F,
        old="        end = -(-(first + count) * PAGE_SIZE // chunk_size)",
        new="        end = (first + count) * PAGE_SIZE // chunk_size",
        tests=HTTP,
        why="a run ending inside a chunk leaves that chunk out",
    ),
    # Dropped as equivalent (planted, survived, and no behaviour can tell):
    # * "if uffd.closed:" -> "if False:" in _after_the_demand: the fill right after
    #   it is an ioctl on the closed uffd, which raises the same UffdClosed.
    # * _everything's "min(run_pages, first + count - start)" -> "run_pages" (the last
    #   run past the mapping's end): every consumer clamps to its own pages
    #   (CopyFrom._fill_ahead, SnapshotResolver._spans, ChunkedCopy.chunk_missing).
    Mutant(
        id="prefetch-chunk-not-checked-again",
        file=F,
        old=(
            "            if not fill.chunk_missing(chunk):  "
            "# a demand fault brought it while we waited"
        ),
        new="            if False:  # a demand fault brought it while we waited",
        tests=HTTP,
        why="a chunk resident already, or brought by a fault while the prefetch waited for a "
        "slot, is fetched again (the check before the wait only saves the wait)",
    ),
]
