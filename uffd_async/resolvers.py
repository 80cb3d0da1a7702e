"""Resolvers: how a fault gets its page.

A resolver is an async callable ``resolver(fault, uffd)`` that answers one
fault with ioctls; it may await anything (a file, a socket, a service). The
ready-made ones here are :class:`Resolver` objects: besides being awaitable
like that, they try ``resolve_now`` first, which finishes without awaiting
whenever it can, so the server answers those faults inline, without a task.

They live in :mod:`uffd_async._serve._resolvers` (with the kernel facts they
rely on), but for ``copy_from``, which also takes snapshot sources and so lives with
them (:mod:`uffd_async._restore._copy_from`); this module is their public face.
"""

from ._core._errors import NoSourcePage as NoSourcePage
from ._restore._copy_from import copy_from as copy_from
from ._serve._resolvers import AnyResolver as AnyResolver
from ._serve._resolvers import AsyncSource as AsyncSource
from ._serve._resolvers import ByKind as ByKind
from ._serve._resolvers import ContinueMinor as ContinueMinor
from ._serve._resolvers import CopyFrom as CopyFrom
from ._serve._resolvers import Resolver as Resolver
from ._serve._resolvers import ResolverFunction as ResolverFunction
from ._serve._resolvers import SyncSource as SyncSource
from ._serve._resolvers import Unprotect as Unprotect
from ._serve._resolvers import ZeroFill as ZeroFill
from ._serve._resolvers import as_resolver as as_resolver
from ._serve._resolvers import by_kind as by_kind
from ._serve._resolvers import continue_minor as continue_minor
from ._serve._resolvers import unprotect as unprotect
from ._serve._resolvers import zero_fill as zero_fill
from ._serve._resolvers import zero_page as zero_page

__all__ = [
    "NoSourcePage",
    "Resolver",
    "ResolverFunction",
    "by_kind",
    "continue_minor",
    "copy_from",
    "unprotect",
    "zero_fill",
]
