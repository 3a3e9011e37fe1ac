"""``python -m confusion_kernels demo [options]``: the package's main job (see
confusion_kernels/demo); ``python -m confusion_kernels info``: versions and backends;
``python -m confusion_kernels build``: compile the kernels for the installed torch now (an
install without them compiles them at the first import otherwise).
``python -m confusion_kernels --help`` lists the commands."""

from __future__ import annotations

import sys

COMMANDS = {"demo": "train the losses on imbalanced digits and write a report with figures",
            "info": "versions, the compiled extension, and which backends run (and why not)",
            "build": "compile the C++ / CUDA kernels for the installed torch now (cached)"}


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: python -m confusion_kernels <command> [options]\n\ncommands:")
        for name, what in COMMANDS.items():
            print(f"  {name:8} {what}")
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    if argv[0] == "info":
        from .info import main as info

        return info(argv[1:])
    if argv[0] == "build":
        from .info import build

        return build(argv[1:])
    from .demo.cli import main as demo

    demo(argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
