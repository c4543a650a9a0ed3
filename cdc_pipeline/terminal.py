"""Progress of long work in the terminal (rich): a spinner with counts and elapsed time instead of silence."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from cdc_pipeline.jvm import MavenProgress


@contextmanager
def maven_spinner(console: Console) -> Iterator[Callable[[MavenProgress], None]]:
    """A callback for `LocalStack(maven_progress=...)`: the first call shows a spinner with the profile, the
    files downloaded and the elapsed time; nothing shows when Maven is not needed (cached jars)."""
    progress = Progress(
        SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console, transient=False
    )
    task: list[int] = []

    def update(event: MavenProgress) -> None:
        text = (
            f"Maven: resolving {event.profile} ({event.index}/{event.total}), {event.downloaded} files downloaded"
            + (f", last {event.last}" if event.last else "")
        )
        if not task:
            progress.start()
            task.append(progress.add_task(text, total=None))
        progress.update(task[0], description=text)

    try:
        yield update
    finally:
        if task:
            progress.update(task[0], description=progress.tasks[0].description.split(", last ")[0] + ", done")
            progress.stop()


def count_bar(console: Console) -> Progress:
    """A bar for work whose total is known (rows of a snapshot): done/total, bar, elapsed."""
    return Progress(
        SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.percentage:>3.0f}%"), TimeElapsedColumn(), console=console,
    )  # fmt: skip
