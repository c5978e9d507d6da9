"""A rich progress bar for `Trainer.train(callback=...)`: episodes (sampled completions) done, live score and KL."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class ProgressBar:
    """Use as a context manager and pass it as the callback:

        with ProgressBar(total_episodes=cfg.rl.total_episodes) as bar:
            trainer.train(prompts, callback=bar)
    """

    def __init__(self, total_episodes: int, description: str = "PPO", start_episodes: int = 0, console: Console | None = None):
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("episodes (completions)  score {task.fields[score]}  kl {task.fields[kl]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
        )
        self.task = self.progress.add_task(description, total=total_episodes, completed=start_episodes, score="-", kl="-")

    def __enter__(self) -> "ProgressBar":
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def __call__(self, stats: dict[str, float]) -> None:
        self.progress.update(
            self.task,
            completed=stats["episodes"],
            score=f"{stats['objective/scores']:+.3f}",
            kl=f"{stats['objective/kl']:.3f}",
        )
