"""Mutants of uffd_async/_remote/_object_source.py (ObjectSource: S3, GCS, Azure through
obstore) and of the ChunkedSource base as ObjectSource relies on it."""

from mutant import Mutant

F = "uffd_async/_remote/_object_source.py"
BASE = "uffd_async/_remote/_chunked_source.py"
OBJECT = ["tests/test_object_source.py"]

MUTANTS = [
    Mutant(
        id="objstore-no-if-match",
        file=F,
        old='            options["if_match"] = self._etag',
        new="            pass",
        tests=OBJECT,
        why="reads do not ask for the ETag seen at open: a replaced object is not a 412",
    ),
    Mutant(
        id="objstore-no-version-pin",
        file=F,
        old='            options["version"] = self._object_version',
        new="            pass",
        tests=OBJECT,
        why="reads ask for the newest version, not the one pinned at open",
    ),
    Mutant(
        id="objstore-size-unchecked",
        file=F,
        old='        if meta["size"] != self.size:',
        new="        if False:",
        tests=OBJECT,
        why="an answer from an object of another size is served",
    ),
    Mutant(
        id="objstore-etag-unchecked",
        file=F,
        old='        if self._etag and meta["e_tag"] and meta["e_tag"] != self._etag:',
        new="        if False:",
        tests=OBJECT,
        why="a store that ignores if_match mixes in another version's bytes",
    ),
    Mutant(
        id="objstore-version-unchecked",
        file=F,
        old="        if self._object_version and version and version != self._object_version:",
        new="        if False:",
        tests=OBJECT,
        why="an answer of another version (a store ignoring the pin) is served",
    ),
    Mutant(
        id="objstore-range-unchecked",
        file=F,
        old="        if tuple(got) != (start, end + 1):",
        new="        if False:",
        tests=OBJECT,
        why="bytes of another range are copied into the guest",
    ),
    Mutant(
        id="objstore-length-unchecked",
        file=F,
        old="        if len(data) != end - start + 1:",
        new="        if False:",
        tests=OBJECT,
        why="a body cut short (obstore cuts a range past the end) is served",
    ),
    Mutant(
        id="objstore-short-read-final",
        file=F,
        old="            raise Retry(",
        new="            raise (",
        tests=OBJECT,
        why="a body cut short is not retried: one dropped connection fails the fault",
    ),
    Mutant(
        id="objstore-5xx-final",
        file=F,
        old='        return StoreFailure("transient", what, status)',
        new='        return StoreFailure("final", what, status)',
        tests=OBJECT,
        why="a 503 SlowDown or a reset connection fails at once, never retried",
    ),
    Mutant(
        id="objstore-4xx-retried",
        file=F,
        old="        if status is not None and 400 <= status < 500:",
        new="        if status is not None and 400 <= status < 400:",
        tests=OBJECT,
        why="a request the store refuses (400) is sent again and again",
    ),
    Mutant(
        id="objstore-412-not-changed",
        file=F,
        old="    if isinstance(exc, oe.PreconditionError):",
        new="    if False:",
        tests=OBJECT,
        why="a replaced object is an ordinary error: the server keeps taking processes",
    ),
    Mutant(
        id="objstore-gone-not-changed",
        file=F,
        old=(
            '        if failure.kind == "missing" and self._opened: '
            " # the version it was opened at is gone"
        ),
        new="        if False:",
        tests=OBJECT,
        why="the pinned version deleted is an ordinary 404, not SourceChanged",
    ),
    Mutant(
        id="objstore-error-quotes-obstore",
        file=F,
        old='    said = f" ({code.group(1)})" if code else ""',
        new='    said = f" ({text})"',
        tests=OBJECT,
        why="errors quote obstore's text: request URLs and the server's body (secrets)",
    ),
    Mutant(
        id="objstore-error-chained",
        file=F,
        old="            mapped = self._mapped(exc, start, end)",
        new="            raise self._mapped(exc, start, end)",
        tests=OBJECT,
        why="our error chains obstore's, whose text a traceback then prints",
    ),
    Mutant(
        id="objstore-userinfo-accepted",
        file=F,
        old='    if "@" in bucket:',
        new="    if False:",
        tests=OBJECT,
        why="s3://KEY:SECRET@bucket/... is taken: the secret is in every log line",
    ),
    Mutant(
        id="objstore-close-no-wait",
        file=F,
        old="            await self._sockets.wait()",
        new="            pass",
        tests=OBJECT,
        why="aclose returns with the store's connections still open",
    ),
    Mutant(
        id="objstore-store-kept",
        file=F,
        old="        self._store = None\n        if self._sockets",
        new="        pass\n        if self._sockets",
        tests=OBJECT,
        why="aclose keeps the store: its connections stay open until the source is freed",
    ),
    Mutant(
        id="objstore-changed-cached-served",
        file=BASE,
        old="        if self._changed is not None:\n            raise self._changed\n",
        new="        if False:\n            raise self._changed\n",
        tests=OBJECT,
        why="after SourceChanged, chunks still in the cache are served (two versions mixed)",
    ),
]
