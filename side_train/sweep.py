"""`python -m side_train.sweep`: many side networks trained from one cache, one batch stream.

    python -m side_train.sweep --cache ./cache --out sweeps/r --grid reduction=8,16,32 lr=1e-3,3e-3 seed=0,1
    python -m side_train.sweep --cache ./cache --out sweeps/l --configs layers.yaml --epochs 5
    torchrun --nproc-per-node 4 -m side_train.sweep --cache ./cache --out sweeps/r --grid seed=0,1,2,3   # spread over ranks

Any other flag is a side_train.run flag shared by every configuration. This module turns
flags into a `SweepConfig`; planning, running and reporting are side_train.sweep_plan,
side_train.sweep_run and side_train.sweep_report.
"""

from __future__ import annotations

import sys
from pathlib import Path

from shared.cli import Parser
from shared.distributed import ranks, teardown
from shared.errors import UserError, cli_entry
from side_train import run as solo
from side_train.sweep_plan import SweepConfig, load_config_file, parse_bytes, parse_grid
from side_train.sweep_run import sweep


def parse_args(argv: list[str] | None) -> SweepConfig:
    """The sweep's own flags; the rest are side_train.run flags shared by every configuration."""
    p = Parser(prog="python -m side_train.sweep", description=__doc__.split("\n")[0],
               epilog="Any other flag is a side_train.run flag shared by every configuration (e.g. --epochs 5 --init magnitude).")
    p.add_argument("--cache", required=True,
                   help="cache made by backbone_cache.extract: a folder or a URL (s3://..., gs://...; see --storage-options)")
    p.add_argument("--out", default="sweeps/sweep", help="sweep folder: runs/<name>/ per configuration, results, plots")
    p.add_argument("--grid", nargs="+", default=[], metavar="KEY=V1,V2", help="values to cross, e.g. reduction=8,16 lr=1e-3,3e-3")
    p.add_argument("--configs", default=None, help="JSON or YAML file: a list of configurations, or {grid: {...}, configs: [...]}")
    p.add_argument("--max-parallel", type=int, default=0, help="at most N networks per pass (0: as many as the memory allows)")
    p.add_argument("--memory-budget", default=None,
                   help="memory for the networks of one pass, e.g. 8GiB (default: 90%% of free GPU memory, 80%% of available RAM)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--overwrite", action="store_true", help="redo configurations whose run folders hold other or finished runs")
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    args, rest = p.parse_known_args(argv)
    if not args.grid and not args.configs:
        raise UserError("give the configurations with --grid KEY=V1,V2 ... and/or --configs FILE")
    if args.max_parallel < 0:
        raise UserError(f"--max-parallel must be 0 or positive, got {args.max_parallel}")
    grid = parse_grid(args.grid)
    entries: list[dict[str, str]] = []
    if args.configs:
        file_grid, entries = load_config_file(Path(args.configs))
        overlap = set(file_grid) & set(grid)
        if overlap:
            raise UserError(f"{', '.join(sorted(overlap))} is in both --grid and --configs; give it in one place")
        grid = {**file_grid, **grid}
    try:
        base = solo.parse_args(["--cache", args.cache, "--out", str(Path(args.out) / "runs" / "shared-flags"),
                                "--device", args.device, *rest])
    except UserError as err:
        raise UserError(f"the shared flags (those that are not the sweep's own are side_train.run flags): "
                        f"{str(err).removeprefix('python -m side_train.run: ')}") from None
    return SweepConfig(base=base, out=args.out, grid=grid, configs=entries, max_parallel=args.max_parallel,
                       memory_budget=parse_bytes(args.memory_budget) if args.memory_budget else None,
                       overwrite=args.overwrite, quiet=args.quiet, shared_flags=rest)


@cli_entry
def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    try:
        sweep(config)
    finally:
        teardown()
    if not ranks().is_main:
        return 0
    table = Path(config.out) / "results.md"
    if table.is_file():
        print(table.read_text())
    print(f"sweep folder: {config.out} (results.csv, results.md, runs.csv, metric_vs_parameters.png, metric_vs_memory.png)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
