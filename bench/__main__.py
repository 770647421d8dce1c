"""``python -m bench WORKLOAD [options]``: run one workload, print a markdown report.
``python -m bench --report`` (or ``report``): run them all and write docs/benchmarks.md (bench/fullreport.py).

A workload is a module with NAME, HELP, ``addArguments(parser)``,
``run(options, progress) -> list[dict]`` and ``section(rows, options) ->
report.Section`` (or a list of them); add it to WORKLOADS and it gets its own
subcommand, and to fullreport.REPORT to be in the report.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench import (
    BenchError,
    backplane,
    echo,
    echomemory,
    fanout,
    filexfer,
    fullreport,
    instructions,
    multimemory,
    report,
    storm,
    storminstructions,
)
from bench.loadclient import BuildFailed
from bench.servers import ServerFailed

WORKLOADS = (echo, echomemory, instructions, storm, storminstructions, fanout, multimemory, filexfer, backplane)


def parser() -> argparse.ArgumentParser:
    main = argparse.ArgumentParser(
        prog="python -m bench",
        description="tcplab benchmarks against their peers.",
        epilog="python -m bench --report [--instructions] runs every workload and writes docs/benchmarks.md with "
        "charts (python -m bench --report --help for its options).",
    )
    commands = main.add_subparsers(dest="workload", required=True, metavar="WORKLOAD")
    for workload in WORKLOADS:
        sub = commands.add_parser(workload.NAME, help=workload.HELP, description=workload.HELP)
        workload.addArguments(sub)
        sub.add_argument("--output", type=Path, help="also write the markdown report to this file")
        sub.set_defaults(module=workload)
    return main


def progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("--report", "report"):
        try:
            return fullreport.main(argv[1:], progress)
        except KeyboardInterrupt:
            print("bench --report: interrupted; servers stopped", file=sys.stderr)
            return 130
    options = parser().parse_args(argv)
    workload = options.module
    machine = report.machineInfo()
    try:
        rows = workload.run(options, progress)
    except (BenchError, ServerFailed, BuildFailed) as e:
        print(f"bench {workload.NAME}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"bench {workload.NAME}: interrupted; servers stopped", file=sys.stderr)
        return 130
    made = workload.section(rows, options)
    sections = list(made) if isinstance(made, (list, tuple)) else [made]
    text = report.render(f"`{workload.NAME}` benchmark", argv, machine, sections)
    print(text)
    if options.output:
        options.output.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
