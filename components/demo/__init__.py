"""The offline demo kit: a synthetic film-review world, its ground truth, and models trained from scratch.

- `generate_demo_data(out_dir, seed)`: prompts.jsonl, sft.jsonl, preferences.jsonl (domain.py).
- `gold_score(text)`, `is_gold_positive(text)`, `is_well_formed(text)`: the ground truth (gold.py).
- `bootstrap(data_dir, out_dir, settings, force)`: tokenizer, instruct model, reward model (bootstrap.py).
"""

from __future__ import annotations

from components.demo.bootstrap import BootstrapReport, BootstrapSettings, bootstrap
from components.demo.domain import generate_demo_data
from components.demo.gold import gold_score, is_gold_positive, is_well_formed

__all__ = [
    "BootstrapReport",
    "BootstrapSettings",
    "bootstrap",
    "generate_demo_data",
    "gold_score",
    "is_gold_positive",
    "is_well_formed",
]
