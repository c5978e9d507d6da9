"""Rich progress bars: `ProgressBar` for `Trainer.train(callback=...)` (episodes done, live score and KL), `StepBar`
for `RewardTrainer.train` (steps done, live loss and accuracy)."""

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


class StepBar:
    """A rich progress bar over optimizer steps with live loss and accuracy, for `RewardTrainer.train(callback=...)`."""

    def __init__(self, total_steps: int, description: str = "reward model", start: int = 0, console: Console | None = None):
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("steps  loss {task.fields[loss]}  accuracy {task.fields[accuracy]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
        )
        self.task = self.progress.add_task(description, total=total_steps, completed=start, loss="-", accuracy="-")

    def __enter__(self) -> "StepBar":
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def __call__(self, stats: dict[str, float]) -> None:
        self.progress.update(self.task, completed=stats["step"], loss=f"{stats['train/loss']:.4f}",
                             accuracy=f"{stats['train/accuracy']:.3f}")
