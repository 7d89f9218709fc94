"""`landmarks bench`: the throughput benchmark (shared/bench/) on the command line, progress on stderr."""

from __future__ import annotations

import json
import logging
import signal
import sys
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from shared.allocator import keep_freed_memory

log = logging.getLogger(__name__)


def _exit_cleanly_on_sigterm() -> None:
    """`kill` or a CI job's timeout sends SIGTERM, which by default ends Python without running `finally`:
    the bench's milvus-lite server and worker processes were left running, its scratch database and queues
    in place. As SystemExit, the context managers that own them remove them, as they do on Ctrl-C."""
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))


class RichReporter:
    """One progress line per bench step, on stderr so that stdout stays one JSON object."""

    def __init__(self, progress: Progress) -> None:
        self._progress = progress
        self._task: TaskID | None = None

    def start(self, what: str, total: int | None = None) -> None:
        if self._task is not None:  # the previous step is done
            total = self._progress.tasks[self._task].total or 1
            self._progress.update(self._task, total=total, completed=total)
        self._task = self._progress.add_task(what, total=total)

    def advance(self, n: int = 1) -> None:
        if self._task is not None and n:
            self._progress.advance(self._task, n)


def register(cli: typer.Typer) -> None:
    """Adds `bench` to the `landmarks` command."""

    @cli.command()
    def bench(
        as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object as the last line.")] = False,
        device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N")] = "auto",
        size: Annotated[str, typer.Option(
            help="12mp, 2mp (generated camera-like JPEGs) or real (../shared/realdata)")] = "2mp",
        images: Annotated[Optional[int], typer.Option(
            min=1, help="images per stage and end to end (default by device and size)")] = None,
        quick: Annotated[bool, typer.Option("--quick", help="a few images, a small gallery: the plumbing")] = False,
        backbone: Annotated[Optional[str], typer.Option(
            help="served backbone (default resnet_small on CPU, wide_resnet50_2 on CUDA)")] = None,
        input_size: Annotated[Optional[int], typer.Option(min=16, help="model input, px (default 96 CPU, 224 CUDA)")] = None,
        dim: Annotated[Optional[int], typer.Option(min=1, help="embedding dimension (default 128 CPU, 512 CUDA)")] = None,
        batch_size: Annotated[Optional[int], typer.Option(
            min=1, help="served batch (default LANDMARKS_BATCH_SIZE, else 64 CPU / 256 CUDA)")] = None,
        centroids: Annotated[Optional[int], typer.Option(min=1, help="centroids in the published gallery (10,000)")] = None,
        max_wait_ms: Annotated[Optional[int], typer.Option(
            min=0, help="the worker's batch wait (default: LANDMARKS_MAX_WAIT_MS, 50)")] = None,
        skip_delf: Annotated[bool, typer.Option("--skip-delf", help="leave out the DELF comparison")] = False,
        load_only: Annotated[bool, typer.Option(
            "--load-only", help="only the worker end to end over --images events (e.g. 100000): "
                                "throughput per tenth of the backlog and RSS over time")] = False,
        compile_model: Annotated[bool, typer.Option(
            "--compile", help="time torch.compile on CUDA, and the worker compiles its model at start "
                              "(LANDMARKS_TORCH_COMPILE)")] = False,
        search_scale: Annotated[bool, typer.Option(
            "--search-scale", help="instead: centroid search at 10k, 100k, 1M")] = False,
        scale_max: Annotated[int, typer.Option(help="--search-scale: largest gallery")] = 1_000_000,
        milvus_cap_s: Annotated[float, typer.Option(
            help="--search-scale: skip a milvus-lite insert projected to take longer")] = 180.0,
        workers: Annotated[int, typer.Option(
            min=1, help="worker processes end to end, on one queue (e.g. 2 per GPU when one process's "
                        "Python is the limit); the decode processes are shared out among them")] = 1,
        seed: int = 0,
    ) -> None:
        """Throughput of one worker: decode, model, search and write alone, and end to end through Redis →
        Celery → PostgreSQL with Milvus in the loop; the bound, the ratio, RSS and the DELF comparison."""
        keep_freed_memory()  # as `landmarks worker` does, before the imports below start threads
        from shared.bench import SEARCH_SCALE_SIZES, BenchConfig, run_bench, run_search_scale
        from shared.embedder import pick_device
        from shared.settings import get_settings

        _exit_cleanly_on_sigterm()

        resolved_device = str(pick_device(device)) if device == "auto" else device
        if size not in ("12mp", "2mp", "real"):
            raise typer.BadParameter(f"unknown size {size!r}; choose 12mp, 2mp or real", param_hint="--size")
        cfg = BenchConfig(device=resolved_device, size=size, images=images, quick=quick, backbone=backbone,
                          input_size=input_size, embedding_dim=dim, batch_size=batch_size, centroids=centroids,
                          compile=compile_model, max_wait_ms=max_wait_ms, delf=not skip_delf, load_only=load_only,
                          workers=workers, home=get_settings().home_path, seed=seed)
        console = Console(stderr=True)
        # Twice a second, not rich's ten: every refresh lays out each step's line again, and at ten a second
        # that took 7 ms of CPU a second from the machine being measured.
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console, transient=False, refresh_per_second=2) as progress:
            reporter = RichReporter(progress)
            try:
                if search_scale:
                    sizes = [n for n in SEARCH_SCALE_SIZES if n <= scale_max] or [scale_max]
                    result = run_search_scale(cfg, reporter, sizes, milvus_cap_s)
                else:
                    result = run_bench(cfg, reporter)
            except RuntimeError as exc:
                # torch's and CUDA's errors are RuntimeErrors too: their traceback says which stage failed.
                console.print_exception(max_frames=8)
                console.print(f"bench failed: {exc}", style="red", markup=False, highlight=False)
                raise typer.Exit(1) from None
            reporter.start("done", 1)
            reporter.advance(1)
        if as_json:
            print(json.dumps(result), flush=True)
        else:
            _print_table(console, result)


def _print_table(console: Console, result: dict) -> None:
    from rich.table import Table
    if result.get("mode") == "search_scale":
        Console().print(search_scale_table(result))
        return
    table = Table(title="landmarks bench")
    table.add_column("figure")
    table.add_column("value")
    for key, value in result.items():
        table.add_row(key, json.dumps(value) if isinstance(value, (dict, list)) else str(value))
    Console().print(table)


def search_scale_table(result: dict):
    """One row per gallery size: ms per batch and img/s, the replica beside milvus-lite ("replica squares":
    the replica's whole-batch geo decision, what a worker runs; "geo": the tile search milvus-lite does)."""
    from rich.table import Table
    table = Table(title=f"centroid search, dim {result['dim']}, {result['batch']} queries per batch "
                        f"(ms per batch, img/s)")
    for column in ("centroids", "replica global", "replica geo", "replica squares", "replica scratch MB",
                   "milvus-lite insert s", "milvus-lite global", "milvus-lite geo"):
        table.add_column(column, justify="right")
    for row in result["results"]:
        milvus = ([str(row["milvus_insert_s"]), _timed(row, "milvus_global"), _timed(row, "milvus_geo")]
                  if "milvus_insert_s" in row else ["skipped (cap)", "–", "–"])
        table.add_row(f"{row['centroids']:,}", _timed(row, "local_global"), _timed(row, "local_geo"),
                      _timed(row, "local_squares"), str(row.get("local_global_scratch_mb", "–")), *milvus)
    return table


def _timed(row: dict, figure: str) -> str:
    """"ms (img/s)" of one search-scale figure, "–" where it was not measured."""
    ms = row.get(f"{figure}_ms")
    return "–" if ms is None else f"{ms:,} ({row[f'{figure}_img_s']:,})"


def _standalone() -> typer.Typer:
    """`python -m shared.bench_cli bench ...` works before `bench` is wired into shared/cli.py."""
    app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_show_locals=False,
                      help="Landmark recognition fleet benchmark.")

    @app.callback()
    def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
        logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    register(app)
    return app


if __name__ == "__main__":  # pragma: no cover
    _standalone()()
