"""Mutants of what captures memory to files: live snapshots (and the C loop's UA_SAVE
path), layers and their format, working sets, and the one atomic-file writer."""

from mutant import Mutant

LIVE = "uffd_async/_capture/_live_snapshot.py"
C = "uffd_async/_core/_native_lib.c"
LAYER = "uffd_async/_capture/_layer.py"
LAYER_WRITER = "uffd_async/_capture/_layer_writer.py"
LAYERED = "uffd_async/_restore/_layered.py"
FORMAT = "uffd_async/_capture/_layer_file.py"
WS = "uffd_async/_restore/_working_set.py"
IDENTITY = "uffd_async/_capture/_identity.py"
ATOMIC = "uffd_async/_core/_atomic_file.py"
T_LIVE = ["tests/test_live_snapshot.py"]
T_LAYERS = ["tests/test_layers.py"]
T_WS = ["tests/test_working_set.py"]
T_ATOMIC = ["tests/test_atomic_file.py"]

MUTANTS = [
    # -- live snapshots -----------------------------------------------------------------
    Mutant(
        id="capture-live-no-reread",
        file=LIVE,
        old=(
            "            if self.events != events:  # the map"
            " changed while we read: where is it now?"
        ),
        new="            if False:",
        tests=T_LIVE,
        why="a run read while an mremap moved it is written from where it was",
    ),
    Mutant(
        id="capture-live-resave",
        file=LIVE,
        old="        if self.saved[index]:\n            return\n        if self.memory",
        new="        if False:\n            return\n        if self.memory",
        tests=T_LIVE,
        why="a write fault on a page already saved saves it again, with later bytes",
    ),
    Mutant(
        id="capture-live-fast-after-events",
        file=LIVE,
        old="        if self.events or not isinstance(self.sink, _ImageFile):",
        new="        if not isinstance(self.sink, _ImageFile):",
        tests=T_LIVE,
        why="the C loop keeps saving by address after an mremap moved pages",
    ),
    Mutant(
        id="capture-live-piece-offset",
        file=LIVE,
        old="                    current_start + (o_lo - original),",
        new="                    current_start,",
        tests=T_LIVE,
        why="a moved piece is read from the start of where its segment went",
    ),
    Mutant(
        id="capture-live-release",
        file=LIVE,
        old="        if self.unprotect and not self.uffd.closed:",
        new="        if not self.unprotect and not self.uffd.closed:",
        tests=T_LIVE,
        why="a cancelled snapshot leaves pages protected: writers block forever",
    ),
    Mutant(
        id="capture-live-stale-buffer",
        file=LIVE,
        old=(
            "            ctypes.memset(self._page, 0,"
            " self.page_size)  # not the last page saved: zeros"
        ),
        new="            pass",
        tests=T_LIVE,
        why="a page that cannot be read is saved with the bytes of the page saved before it",
    ),
    Mutant(
        id="capture-live-no-pid-check",
        file=LIVE,
        old="    _check_mapped(memory.pid, address, length)",
        new="    pass",
        tests=T_LIVE,
        why="a wrong pid gives an image of zeros instead of an error",
    ),
    Mutant(
        id="capture-live-efault-esrch",
        file="uffd_async/_core/_process_memory.py",
        old="        if err == errno.EFAULT:",
        new="        if err in (errno.EFAULT, errno.ESRCH, errno.EPERM):",
        tests=T_LIVE,
        why="a process gone (or not ours to read) mid-snapshot gives pages of zeros",
    ),
    Mutant(
        id="capture-live-image-mode",
        file=ATOMIC,
        old="PRIVATE = 0o600",
        new="PRIVATE = 0o644",
        tests=T_LIVE,
        why="a live image of process memory readable by every user (bug 3)",
    ),
    Mutant(
        id="capture-c-resave",
        file=C,
        old="            if (f->kind == UA_SAVE && !f->populated[index]) {",
        new="            if (f->kind == UA_SAVE) {",
        tests=T_LIVE,
        why="the C loop saves a page again at a stale fault, over the instant's bytes",
    ),
    Mutant(
        id="capture-c-no-marks",
        file=C,
        old="                f->marks[index] = 1;",
        new="                f->marks[index] = 0;",
        tests=T_LIVE,
        why="a write the C loop let through is not marked: the next layer misses it",
    ),
    Mutant(
        id="capture-c-save-ahead-all",
        file=C,
        old=(
            "                    if (!f->slots && !f->marks) /* save"
            " ahead: the unsaved pages behind it */"
        ),
        new="                    if (!f->slots) /* save ahead: the unsaved pages behind it */",
        tests=T_LIVE,
        why="under a tracker, saving ahead unprotects pages whose writes go unmarked",
    ),
    # -- layers -------------------------------------------------------------------------
    Mutant(
        id="capture-layers-oldest-wins",
        file=LAYER,
        old="    for source in range(len(layers), 0, -1):",
        new="    for source in range(1, len(layers) + 1):",
        tests=T_LAYERS,
        why="an older layer's page wins over a newer one's",
    ),
    Mutant(
        id="capture-layers-chain-size",
        file=LAYER,
        old="        if layer.image_size != size:",
        new="        if layer.image_size > size:",
        tests=T_LAYERS,
        why="a layer written for a smaller image than the base is accepted",
    ),
    Mutant(
        id="capture-layers-slot-end",
        file=LAYER_WRITER,
        old="        if run < 0 or index >= self._ends[run]:",
        new="        if run < 0 or index > self._ends[run]:",
        tests=T_LAYERS,
        why="the page just after a run is written into the next run's first slot",
    ),
    Mutant(
        id="capture-layers-verify-last",
        file=LAYER,
        old="        for slot in range(self.page_count):",
        new="        for slot in range(self.page_count - 1):",
        tests=T_LAYERS,
        why="verify misses damage in the last page",
    ),
    Mutant(
        id="capture-layers-span-count",
        file=LAYERED,
        old="            count = min(count, self._span_ends[span] - index)",
        new="            count = min(count, self._span_ends[span] - index + 1)",
        tests=T_LAYERS,
        why="a readahead run goes one page past the end of its piece (wrong file's bytes)",
    ),
    Mutant(
        id="capture-layers-span-origin",
        file=LAYERED,
        old=(
            "            spans.append(((a - low) // size, (b - low) //"
            " size, sources[source] + at - start + low))"
        ),
        new=(
            "            spans.append(((a - low) // size, (b - low)"
            " // size, sources[source] + at - start))"
        ),
        tests=T_LAYERS,
        why="a mapping that starts inside the image is served from the image's start",
    ),
    Mutant(
        id="capture-layers-squash-mode",
        file=ATOMIC,
        old="            os.fchmod(self.fd, mode)  # whatever the umask took away, or left",
        new="            pass",
        tests=T_ATOMIC,
        why="under a permissive umask a file of memory is created for everyone to read",
    ),
    # -- the layer format ---------------------------------------------------------------
    Mutant(
        id="capture-format-overlap",
        file=FORMAT,
        old="        if first < end:",
        new="        if first + count < end:",
        tests=T_LAYERS,
        why="runs that overlap (one page held twice) are accepted when the CRC is right",
    ),
    Mutant(
        id="capture-format-empty-run",
        file=FORMAT,
        old="        if count <= 0:",
        new="        if count < 0:",
        tests=T_LAYERS,
        why="an empty run is accepted",
    ),
    Mutant(
        id="capture-format-outside",
        file=FORMAT,
        old="        if end * page_size > image_size:",
        new="        if (end - 1) * page_size > image_size:",
        tests=T_LAYERS,
        why="a run one page past the image's end is accepted",
    ),
    Mutant(
        id="capture-format-too-long",
        file=FORMAT,
        old="        if file_size is not None and file_size != header.file_size:",
        new="        if file_size is not None and file_size < header.file_size:",
        tests=T_LAYERS,
        why="a layer file with bytes after its data is accepted",
    ),
    Mutant(
        id="capture-format-pages-count",
        file=FORMAT,
        old="        if header.pages != pages:",
        new="        if header.pages < pages:",
        tests=T_LAYERS,
        why="a header counting fewer pages than its runs hold is accepted",
    ),
    Mutant(
        id="capture-format-runs-join",
        file=FORMAT,
        old="        if count and page == start + count:",
        new="        if count and page == start + count + 1:",
        tests=T_LAYERS,
        why="runs_of joins pages across a gap and splits touching ones",
    ),
    # -- working sets -------------------------------------------------------------------
    Mutant(
        id="capture-ws-runs-limit",
        file=WS,
        old="        if count and page == start + count and count < limit:",
        new="        if count and page == start + count and count <= limit:",
        tests=T_WS,
        why="runs of max_pages + 1 pages",
    ),
    Mutant(
        id="capture-ws-outside",
        file=WS,
        old="                if start < 0 or (start + length) * page_size > size:",
        new="                if start < 0 or (start + length - 1) * page_size > size:",
        tests=T_WS,
        why="a set naming the page just past the snapshot is accepted",
    ),
    Mutant(
        id="capture-ws-trailing",
        file=WS,
        old="        if len(pages) != count or position != end_of_body:",
        new="        if len(pages) != count:",
        tests=T_WS,
        why="bytes after the last run are accepted",
    ),
    Mutant(
        id="capture-ws-foreign-base",
        file=WS,
        old="        if base is not None and base.matches(snapshot_size, identity):",
        new="        if base is not None:",
        tests=T_WS,
        why="a set recorded for another snapshot is merged into a new recording",
    ),
    Mutant(
        id="capture-ws-identity-step",
        file=IDENTITY,
        old="    step = (size - _SAMPLE) // (_SAMPLES - 1)",
        new="    step = size // _SAMPLES",
        tests=T_WS,
        why="the identity never samples the snapshot's last block",
    ),
    Mutant(
        id="capture-ws-save-mode",
        file=WS,
        old="        write_atomically(path, self.to_bytes(), mode=0o644)",
        new="        write_atomically(path, self.to_bytes())",
        tests=T_WS,
        why="a working set saved unreadable to the serving user (0600 instead of 0644)",
    ),
    # -- the atomic writer --------------------------------------------------------------
    Mutant(
        id="capture-atomic-no-unlink",
        file=ATOMIC,
        old="                os.unlink(temporary)",
        new="                pass",
        tests=T_ATOMIC,
        why="a failed or cancelled write leaves its temporary file (a copy of memory) behind",
    ),
    Mutant(
        id="capture-atomic-no-dir-fsync",
        file=ATOMIC,
        old="        fsync_directory(self._directory)",
        new="        pass",
        tests=T_ATOMIC,
        why="a crash after the commit can bring back the old file (or none)",
    ),
    Mutant(
        id="capture-atomic-in-place",
        file=ATOMIC,
        old=(
            '        temporary = os.path.join(directory, f".{name}.{secrets.token_hex(4)}.partial")'
        ),
        new="        temporary = os.path.join(directory, name)",
        tests=T_ATOMIC,
        why="written in place: a failure part-way destroys the old file",
    ),
    Mutant(
        id="capture-atomic-open-file-kept",
        file=ATOMIC,
        old="                os.ftruncate(self.fd, 0)\n",
        new="",
        tests=T_LIVE,
        why="an image written into an open file keeps the old file's bytes in its holes",
    ),
]
