"""``python -m uffd_async probe``: can this user serve page faults here, and how?

Exit status 0 when a userfaultfd can be opened, 1 when not (the output then
says exactly what to change).
"""

from __future__ import annotations

import argparse
import json
import sys

from ._abi import Feature, Ioctl
from ._open import probe


def _flag_names(value: Feature | Ioctl) -> list[str]:
    names = [member.name for member in type(value) if member.name and value & member]
    unknown = int(value) & ~sum(member.value for member in type(value))
    if unknown:
        names.append(f"{unknown:#x}")
    return names


def _probe(args: argparse.Namespace) -> int:
    support = probe()
    if args.json:
        print(
            json.dumps(
                {
                    "available": support.available,
                    "method": support.method.value if support.method else None,
                    "features": _flag_names(support.features),
                    "ioctls": _flag_names(support.ioctls),
                    "reason": support.reason,
                },
                indent=2,
            )
        )
    elif support.available:
        assert support.method is not None
        print(f"userfaultfd: available ({support.method.value})")
        print(f"features: {' '.join(_flag_names(support.features)) or 'none'}")
        print(f"ioctls: {' '.join(_flag_names(support.ioctls))}")
        print(f"note: {support.reason}")
    else:
        print("userfaultfd: NOT available")
        print(f"what to change: {support.reason}")
    return 0 if support.available else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m uffd_async", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    probe_parser = commands.add_parser("probe", help="check whether and how userfaultfd works here")
    probe_parser.add_argument("--json", action="store_true", help="machine-readable output")
    probe_parser.set_defaults(run=_probe)
    args = parser.parse_args(argv)
    result: int = args.run(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
