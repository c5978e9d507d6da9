"""alignflow's reward-model training against TRL 1.16.0's RewardTrainer: pairs/s, peak memory, held-out accuracy.

    python -m benchmarks.reward_vs_trl                 # the real run: 3 seeds x 600 steps per engine (~10 min on 2 cores)
    python -m benchmarks.reward_vs_trl --smoke         # every path once: 1 seed, 6 steps (writes *-smoke.*, git-ignored)
    python -m benchmarks.reward_vs_trl --seeds 1 --steps 200
    python -m benchmarks.reward_vs_trl --render benchmarks/results/reward_vs_trl.json   # re-print; re-write the snippet
    python -m benchmarks.reward_vs_trl --alignflow-set model.append_eos=true --out /tmp/eos   # a diagnostic, elsewhere

A shared machine: before each run the harness waits (--wait-quiet, up to 300 s) until other processes leave the CPUs
idle, measures the share of the CPUs they used during the run (/proc/stat less the worker's own CPU time), and repeats
a run they used more than --max-disturbance (10%) of, up to --retries times; every attempt is kept in the JSON.

One run:
  1. the demo preference pairs (data/demo/preferences.jsonl; `alignflow demo data` if missing) loaded as alignflow's
     reward flow loads them, pairs longer than model.max_length in either engine's reading left out of both, split
     with alignflow's split_pairs(pairs, 0.1, seed=0); the training and held-out pairs written to JSONL files that
     both workers read: the same pairs for both;
  2. per seed, each engine in a fresh process (order reversed on odd seeds), 2 torch threads:
       alignflow  this module's --worker mode, in alignflow's venv: configs/reward.yaml as the reward flow runs it
                  (load_base, encode_pairs, RewardTrainer), training.max_steps=--steps, seed=the seed;
       TRL 1.16   benchmarks/trl_reward_worker.py in benchmarks/.venv-trl116 (torch==2.13.0, trl==1.16.0; made on
                  first use, never alignflow's venv): RewardTrainer with the same settings (see its trl_settings);
     both start from artifacts/demo/instruct through AutoModelForSequenceClassification(num_labels=1), float32, CPU,
     the new head drawn with the same seed; each saves its trained model;
  3. scores each saved model here, with the same code (alignflow's score_pairs and reward_eval.evaluate_pairs: a tie
     counts 1/2), on the held-out pairs as its trainer reads them: alignflow's encoding (no EOS, as configs/reward.yaml)
     for alignflow's model, TRL's own token ids (its EOS appended) for TRL's; each model in the other's reading too;
  4. writes benchmarks/results/reward_vs_trl.json and README-snippet-reward.md.

Figures: pairs/s = pairs trained per second of the training loop (batch x steps, timed from the end of the first
`timing_warmup(steps)` optimizer steps to the end of the last, the same warm-up for both; the loop includes batching,
forward, backward, clipping, optimizer, schedule and each trainer's per-step statistics), peak resident memory of
the worker process (VmHWM, benchmarks/measure.py), held-out pairwise accuracy after the same pairs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROJECT_ROOT = HERE.parent
RESULTS = HERE / "results"
CACHE = HERE / ".cache"
TRL_WORKER = HERE / "trl_reward_worker.py"
STEM = "reward_vs_trl"
SNIPPET = "README-snippet-reward"
EVAL_FRACTION, SPLIT_SEED = 0.1, 0
THREADS = 2
SMOKE_STEPS = 6
ENGINES = ("alignflow", "trl")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---------------------------------------------------------------------------------------------- pure helpers


def timing_warmup(steps: int) -> int:
    """Optimizer steps left out of the timing at the start of a run (the same for both engines): 10, fewer for a
    short run, at least 1 (the first step pays for lazy initialisation); at least one step remains timed."""
    if steps < 2:
        raise ValueError(f"timing needs at least 2 steps (got {steps})")
    return max(1, min(10, steps // 10))


def pairs_per_second(step_ends: list[float], batch_size: int, warmup: int) -> float:
    """Pairs trained per second from the end of step `warmup` to the end of the last step; `step_ends` holds the
    clock at the end of each optimizer step (seconds, any origin)."""
    if not 0 < warmup < len(step_ends):
        raise ValueError(f"warm-up {warmup} must leave steps to time (of {len(step_ends)})")
    seconds = step_ends[-1] - step_ends[warmup - 1]
    if seconds <= 0:
        raise ValueError("the step clock did not advance")
    return (len(step_ends) - warmup) * batch_size / seconds


def pairs_per_second_median(step_ends: list[float], batch_size: int, warmup: int) -> float:
    """Pairs per second of the median optimizer step after the warm-up: less sensitive than `pairs_per_second` to a
    burst of load from elsewhere on the machine (reported beside it; the targets use `pairs_per_second`)."""
    if not 0 < warmup < len(step_ends):
        raise ValueError(f"warm-up {warmup} must leave steps to time (of {len(step_ends)})")
    durations = [b - a for a, b in zip(step_ends[warmup - 1 : -1], step_ends[warmup:])]
    return batch_size / statistics.median(durations)


def other_cpu_share(busy_seconds: float, worker_cpu_seconds: float, wall_seconds: float, cores: int) -> float:
    """The share of the machine's CPU time that other processes used while a worker ran: all CPUs' busy seconds
    (/proc/stat) less the worker's own CPU seconds, over wall seconds x cores; 0 on a quiet machine."""
    return max(0.0, busy_seconds - worker_cpu_seconds) / (wall_seconds * cores)


def mean_std(values: list[float]) -> dict:
    """{"mean", "std" (sample standard deviation; 0 for one value), "n", "values"}."""
    values = [float(v) for v in values]
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values), "values": values}


def lr_points(lrs: list[float], warmup_steps: int) -> dict[str, float]:
    """The learning rate each schedule ran at on its first steps, at the end of warm-up, halfway and last (0-based
    step numbers), to show how the two schedules compare."""
    steps = len(lrs)
    picks = sorted({0, 1, max(0, warmup_steps - 1), min(warmup_steps, steps - 1), steps // 2, steps - 1})
    return {str(step): lrs[step] for step in picks if 0 <= step < steps}


def summarize(runs: list[dict]) -> dict:
    """Mean ± std over one engine's seeds of every figure the targets and the table use."""
    keys = ("pairs_per_second", "pairs_per_second_median", "peak_rss_mb", "accuracy", "accuracy_other_reading", "train_seconds", "setup_seconds")
    return {key: mean_std([run[key] for run in runs]) for key in keys}


def targets(summary: dict[str, dict]) -> list[dict]:
    """The issue's three targets on the means over seeds: alignflow's held-out accuracy at least TRL's, its pairs/s
    at least TRL's, its peak memory at most TRL's."""
    a, t = summary["alignflow"], summary["trl"]

    def row(name: str, key: str, unit: str, fmt: str, met: bool) -> dict:
        mine, theirs = a[key], t[key]
        measured = (f"alignflow {mine['mean']:{fmt}} ± {mine['std']:{fmt}}{unit} vs TRL {theirs['mean']:{fmt}} ± "
                    f"{theirs['std']:{fmt}}{unit} (mean ± std, {mine['n']}/{theirs['n']} seeds)")
        return {"target": name, "measured": measured, "ratio": mine["mean"] / theirs["mean"], "met": met}

    return [
        row("held-out accuracy >= TRL's", "accuracy", "", ".4f", a["accuracy"]["mean"] >= t["accuracy"]["mean"]),
        row("pairs/s >= TRL's", "pairs_per_second", " pairs/s", ".0f",
            a["pairs_per_second"]["mean"] >= t["pairs_per_second"]["mean"]),
        row("peak memory <= TRL's", "peak_rss_mb", " MB", ".0f", a["peak_rss_mb"]["mean"] <= t["peak_rss_mb"]["mean"]),
    ]


def table(report: dict) -> tuple[list[str], list[list[str]]]:
    """The results table: one row per engine (mean ± std over seeds), then the ratio alignflow / TRL."""
    summary, settings = report["summary"], report["settings"]
    header = ["engine", "seeds", "pairs/s (training loop)", "pairs/s (median step)", "peak RSS MB", "held-out accuracy",
              "accuracy, other engine's reading", "training s", "pairs trained"]
    names = {"alignflow": "alignflow (RewardTrainer, configs/reward.yaml)", "trl": f"TRL {report['versions']['trl']} RewardTrainer"}
    rows = []
    for engine in ENGINES:
        s = summary[engine]
        rows.append([names[engine], str(s["accuracy"]["n"]), f"{s['pairs_per_second']['mean']:.0f} ± {s['pairs_per_second']['std']:.0f}",
                     f"{s['pairs_per_second_median']['mean']:.0f} ± {s['pairs_per_second_median']['std']:.0f}",
                     f"{s['peak_rss_mb']['mean']:.0f} ± {s['peak_rss_mb']['std']:.0f}",
                     f"{s['accuracy']['mean']:.4f} ± {s['accuracy']['std']:.4f}",
                     f"{s['accuracy_other_reading']['mean']:.4f} ± {s['accuracy_other_reading']['std']:.4f}",
                     f"{s['train_seconds']['mean']:.1f}", f"{settings['pairs_trained']:,}"])
    a, t = summary["alignflow"], summary["trl"]
    rows.append(["alignflow / TRL", "", f"{a['pairs_per_second']['mean'] / t['pairs_per_second']['mean']:.2f}x",
                 f"{a['pairs_per_second_median']['mean'] / t['pairs_per_second_median']['mean']:.2f}x",
                 f"{a['peak_rss_mb']['mean'] / t['peak_rss_mb']['mean']:.2f}x",
                 f"{a['accuracy']['mean'] - t['accuracy']['mean']:+.4f}", "",
                 f"{a['train_seconds']['mean'] / t['train_seconds']['mean']:.2f}x", ""])
    return header, rows


def markdown(report: dict) -> str:
    """The README snippet: the table, then what was measured and how, the targets, why (`report["analysis"]`, written
    once the figures are in; re-rendered by --render), and what still differs between the two."""
    header, rows = table(report)
    settings, m, v = report["settings"], report["machine"], report["versions"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in r) + " |" for r in rows]
    seeds = len(report["seeds"])
    others = [run["others_cpu_share_during"] for runs in report.get("runs", {}).values() for run in runs
              if run.get("others_cpu_share_during") is not None]
    disturbed = (f"; other processes used {statistics.mean(others):.0%} of the CPUs on average during a run, "
                 f"{max(others):.0%} at most") if others else ""
    flagged = [f"{engine} seed {run['seed']}" for engine, runs in report.get("runs", {}).items() for run in runs
               if run.get("disturbed")]
    if flagged:
        disturbed += f" (still disturbed after the repeats, so their speed is unreliable: {', '.join(flagged)})"
    sentences = [
        f"`{report['command']}` ({report['date'][:10]}; {m['cpu']}, {m['cores']} cores, {settings['threads']} torch threads "
        f"per process; TRL {v['trl']}, transformers {v['transformers']}, torch {v['torch']} on both sides) trained the demo "
        f"instruct GPT-2 with a new one-output head (float32, CPU) on the same {settings['train_pairs']:,} demo preference "
        f"pairs with each engine, {settings['steps']} steps of {settings['batch_size']} pairs ({settings['pairs_trained']:,} "
        f"pairs; lr {settings['learning_rate']:g}, {settings['warmup_steps']} warm-up steps then cosine to "
        f"{settings['min_lr_ratio']:g} of the peak, weight decay {settings['weight_decay']:g}, center_rewards "
        f"{settings['center_rewards_coef']:g}, max_grad_norm {settings['max_grad_norm']:g}, no gradient checkpointing), "
        f"{seeds} seed{'s' if seeds > 1 else ''} each, every run in a fresh process, alternating which engine goes first.",
        f"Pairs/s times the training loop alone after the first {settings['timing_warmup']} steps on both sides (the median "
        f"step beside it), peak RSS is each worker process's own VmHWM, and both saved models were scored by the same "
        f"alignflow code on the {settings['held_out_pairs']} held-out pairs (a tie counts 1/2), each on the token ids its "
        f"own trainer trains on (the other engine's reading in its own column); figures are mean ± std over seeds"
        f"{disturbed}.",
        "Targets: " + "; ".join(f"{t['target']} {'met' if t['met'] else '**missed**'} ({t['ratio']:.3g}x)"
                                for t in report["targets"]) + ".",
    ]
    if report.get("analysis"):
        sentences.append(report["analysis"])
    sentences.append("What still differs: " + "; ".join(report["differences"]) + ".")
    return "\n".join(lines) + "\n\n" + " ".join(sentences) + "\n"


def write_outputs(report: dict, folder: Path, stem: str, snippet: str) -> None:
    header, rows = table(report)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    for t in report["targets"]:
        print(f"{'met   ' if t['met'] else 'MISSED'}  {t['target']}: {t['measured']}")
    (folder / f"{snippet}.md").write_text(markdown(report))


# ---------------------------------------------------------------------------------------------- the alignflow worker


def alignflow_worker(spec_path: str, result_path: str) -> None:
    """alignflow's side, in a fresh process of alignflow's venv: train, time each step, save the model."""
    sys.path.insert(0, str(HERE))
    from measure import peak_rss, reset_peak_rss, rss_mb, write_json

    reset_peak_rss()  # the peak from here on is this worker's own (measure.py)
    spec = json.loads(Path(spec_path).read_text())
    started = time.perf_counter()
    import torch

    torch.set_num_threads(spec["threads"])
    import transformers

    from components.config import RewardRunConfig, load_config
    from components.data.preferences import PreferencePair
    from components.reward.training import RewardTrainer, encode_pairs, load_base

    config = load_config(spec["config"], spec["overrides"], schema=RewardRunConfig)
    model, tokenizer = load_base(config.model, config.seed)
    head = model.score.weight.detach()
    fingerprint = {"sum": float(head.sum()), "norm": float(head.norm())}
    rows = [json.loads(line) for line in Path(spec["train"]).read_text().splitlines() if line.strip()]
    pairs = [PreferencePair(r["prompt"], r["chosen"], r["rejected"], None, i) for i, r in enumerate(rows, 1)]
    encoded = encode_pairs(pairs, tokenizer, config.model.append_eos)
    trainer = RewardTrainer(model, encoded, config.training, config.seed, tokenizer.pad_token_id)
    step_ends: list[float] = []
    setup_seconds = time.perf_counter() - started
    rss_before = rss_mb()
    train_start = time.perf_counter()
    trainer.train(callback=lambda stats: step_ends.append(time.perf_counter()))
    train_seconds = time.perf_counter() - train_start
    peak = peak_rss()
    model.save_pretrained(spec["save_dir"])
    tokenizer.save_pretrained(spec["save_dir"])
    last = trainer.history[-1]
    write_json(result_path, {
        "engine": "alignflow",
        "versions": {"transformers": transformers.__version__, "torch": torch.__version__},
        "threads": torch.get_num_threads(),
        "config": {"model": config.model.model_dump(mode="json"), "training": config.training.model_dump(mode="json"),
                   "seed": config.seed},
        "optimizer": f"{type(trainer.optimizer).__name__} (torch defaults)",
        "train_pairs": len(encoded),
        "head_fingerprint": fingerprint,
        "setup_seconds": setup_seconds,
        "train_seconds": train_seconds,
        "step_ends": [t - train_start for t in step_ends],
        "step_lrs": [h["train/lr"] for h in trainer.history],
        "final_logs": {"loss": last["train/loss"], "accuracy": last["train/accuracy"], "margin": last["train/margin"]},
        "rss_before_train_mb": rss_before,
        **peak,
    })


# ---------------------------------------------------------------------------------------------- the run


def cpu_busy_seconds() -> float:
    """Busy CPU seconds of all CPUs since boot (/proc/stat: every state but idle and iowait)."""
    with open("/proc/stat") as f:
        ticks = [float(x) for x in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def wait_quiet(max_seconds: float, threshold: float = 0.10, window: float = 2.0) -> float:
    """Wait (up to `max_seconds`) until the machine's CPUs are busier than `threshold` for no `window` seconds;
    returns the busy share of the last window (this process sleeps meanwhile, so it is all other processes)."""
    cores, deadline = os.cpu_count() or 1, time.monotonic() + max_seconds
    while True:
        before = cpu_busy_seconds()
        time.sleep(window)
        share = (cpu_busy_seconds() - before) / (window * cores)
        if share <= threshold or time.monotonic() >= deadline:
            return share
        log(f"  waiting for a quiet machine: other processes use {share:.0%} of the CPUs")


def run_worker(command: list[str], spec: dict, workdir: Path, label: str) -> dict:
    """Run a worker on `spec` in a fresh process (offline, `spec["threads"]` threads); its JSON result."""
    from benchmarks.ppo_vs_trl import WORKER_ENV

    workdir.mkdir(parents=True, exist_ok=True)
    spec_path, result_path, log_path = workdir / "spec.json", workdir / "result.json", workdir / "worker.log"
    spec_path.write_text(json.dumps(spec))
    threads = str(spec["threads"])
    env = {**os.environ, **WORKER_ENV, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    import resource

    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy = cpu_busy_seconds()
    start = time.perf_counter()
    with open(log_path, "w") as output:
        done = subprocess.run([*command, str(spec_path), str(result_path)], stdout=output, stderr=subprocess.STDOUT,
                              env=env, cwd=PROJECT_ROOT)
    if done.returncode != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-30:])
        raise RuntimeError(f"worker failed on {label} (exit {done.returncode}); log {log_path}:\n{tail}")
    wall = time.perf_counter() - start
    busy = cpu_busy_seconds() - busy
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    worker_cpu = (after.ru_utime - children.ru_utime) + (after.ru_stime - children.ru_stime)
    result = json.loads(result_path.read_text())
    result["wall_seconds"] = wall
    result["worker_cpu_seconds"] = worker_cpu
    result["other_cpu_share"] = other_cpu_share(busy, worker_cpu, wall, os.cpu_count() or 1)
    return result


def ensure_demo() -> None:
    """The demo preference pairs and instruct model, made with alignflow's own CLI where missing."""
    cli = str(Path(sys.executable).parent / "alignflow")
    if not (PROJECT_ROOT / "data" / "demo" / "preferences.jsonl").is_file():
        log("generating the demo data (alignflow demo data)")
        subprocess.run([cli, "demo", "data"], cwd=PROJECT_ROOT, check=True)
    if not (PROJECT_ROOT / "artifacts" / "demo" / "instruct" / "config.json").is_file():
        log("bootstrapping the demo models (alignflow demo bootstrap, about a minute)")
        subprocess.run([cli, "demo", "bootstrap"], cwd=PROJECT_ROOT, check=True)


def prepare_pairs(config, folder: Path) -> dict:
    """The pairs as alignflow's reward flow prepares them (load_pairs; those over model.max_length left out), also
    leaving out those over it in TRL's reading (EOS appended), then split_pairs(pairs, 0.1, seed=0); written to
    train.jsonl and held_out.jsonl in `folder`. Returns the paths, the counts and the held-out pairs."""
    from components.models.loading import load_tokenizer
    from components.data.preferences import drop_too_long, load_pairs, split_pairs
    from components.reward.training import pair_texts

    pairs = load_pairs(config.data, PROJECT_ROOT)
    tokenizer = load_tokenizer(config.model.base, config.model.revision, padding_side="right")
    chat = bool(getattr(tokenizer, "chat_template", None))
    longest = lambda pair: max(len(ids) for eos in (False, True) for ids in pair_texts(pair, tokenizer, eos, chat))  # noqa: E731
    kept = drop_too_long(pairs, longest, config.model.max_length)
    train, held_out = split_pairs(kept.pairs, EVAL_FRACTION, SPLIT_SEED)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, part in (("train", train), ("held_out", held_out)):
        paths[name] = folder / f"{name}.jsonl"
        with open(paths[name], "w") as f:
            for pair in part:
                f.write(json.dumps({"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected}) + "\n")
    return {"paths": paths, "held_out": held_out, "tokenizer": tokenizer, "total": pairs.report.total,
            "too_long": len(kept.report.too_long), "train": len(train), "held_out_n": len(held_out)}


def score(model_dir: Path, readings: dict, evaluation) -> dict:
    """The saved model's held-out accuracy (and its 95% bootstrap CI) in each reading {name: EncodedPairs}, by
    alignflow's score_pairs and evaluate_pairs."""
    import torch
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    from components.reward.evaluation import evaluate_pairs
    from components.reward.training import score_pairs

    model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32)
    out = {}
    for name, encoded in readings.items():
        chosen, rejected = score_pairs(model, encoded, model.config.pad_token_id, evaluation.score_batch_size)
        lengths = [(len(c) + len(r)) / 2 for c, r in zip(encoded.chosen, encoded.rejected)]
        result = evaluate_pairs(chosen, rejected, lengths, evaluation)
        out[name] = {"accuracy": result.accuracy, "accuracy_ci": list(result.accuracy_ci), "mean_margin": result.mean_margin}
    return out


def differences(settings: dict) -> list[str]:
    """What still differs between the two runs: each is how its engine works, kept as it is and stated."""
    warmup, epochs = settings["warmup_steps"], settings["pairs_trained"] / settings["train_pairs"]
    eos = ("both append `<eos>` to every answer (alignflow by the override `model.append_eos=true`)"
           if settings.get("append_eos_alignflow") else
           "TRL appends `<eos>` to every answer (it has no option to leave it out short of pre-tokenizing the data), "
           "alignflow reads the answer without it (`model.append_eos: false`), so TRL's model reads its score at the EOS "
           "token")
    return [
        eos + "; both add `<bos>` and pad on the right with `<pad>`",
        f"the centring term: TRL adds {settings['center_rewards_coef']:g} x mean over pairs of (r_chosen + r_rejected)^2, "
        f"alignflow {settings['center_rewards_coef']:g} x mean over texts of r^2",
        (f"both go epoch by epoch ({epochs:.1f} epochs), each in its own seeded order"
         if settings.get("sampling_alignflow") == "epochs" else
         f"alignflow draws each batch at random with replacement, TRL shuffles and goes epoch by epoch ({epochs:.1f} epochs)"),
        f"TRL's linear warm-up starts at lr 0 (step/{warmup}), alignflow's at lr/{warmup} ((step+1)/{warmup})" if warmup
        else "no warm-up on either side",
        "TRL's AdamW is the fused kernel (`adamw_torch_fused`) and spares biases and LayerNorm weights from the decay, "
        "alignflow's is torch's default AdamW decaying every parameter",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.reward_vs_trl", description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: configs/reward.yaml's 600)")
    parser.add_argument("--smoke", action="store_true", help=f"every path once: 1 seed, {SMOKE_STEPS} steps")
    parser.add_argument("--threads", type=int, default=THREADS, help="torch threads of every process")
    parser.add_argument("--wait-quiet", type=float, default=300.0, metavar="SECONDS",
                        help="before each run, wait up to this long for other processes to leave the CPUs idle (0: don't)")
    parser.add_argument("--alignflow-set", action="append", default=[], metavar="KEY=VALUE",
                        help="a diagnostic override of alignflow's configs/reward.yaml (e.g. model.append_eos=true); "
                        "pair it with --out elsewhere: the benchmark's figures are alignflow as configured")
    parser.add_argument("--max-disturbance", type=float, default=0.10, metavar="SHARE",
                        help="repeat a run during which other processes used more than this share of the CPUs")
    parser.add_argument("--retries", type=int, default=3, help="repeats of a disturbed run (the last one is kept, flagged)")
    parser.add_argument("--keep-models", action="store_true", help="keep the trained models under benchmarks/.cache")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--render", type=Path, default=None, metavar="JSON", help="measure nothing: re-print a results file")
    parser.add_argument("--worker", nargs=2, default=None, metavar=("SPEC", "RESULT"), help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if args.worker:
        alignflow_worker(*args.worker)
        return 0
    if args.render:
        report = json.loads(args.render.read_text())
        write_outputs(report, args.render.parent, args.render.stem, SNIPPET + ("-smoke" if report["smoke"] else ""))
        return 0
    if args.smoke:
        args.seeds, args.steps, args.wait_quiet, args.retries = 1, SMOKE_STEPS, 0.0, 0
    command = " ".join([parser.prog, *map(shlex.quote, argv)])
    started = time.perf_counter()

    import torch

    from benchmarks.ppo_vs_trl import machine
    from benchmarks.time_to_quality import trl116_python
    from components.config import REWARD_CONFIG, RewardRunConfig, load_config

    torch.set_num_threads(args.threads)
    ensure_demo()
    trl = trl116_python()
    overrides = ([f"training.max_steps={args.steps}"] if args.steps else []) + args.alignflow_set
    config = load_config(REWARD_CONFIG, overrides, schema=RewardRunConfig)
    training, steps = config.training, config.training.max_steps
    if training.lr_schedule != "cosine":
        raise SystemExit(f"configs/reward.yaml's training.lr_schedule is {training.lr_schedule}; the TRL mapping assumes cosine")
    warmup = timing_warmup(steps)
    load = os.getloadavg()
    if load[0] > 0.5:
        log(f"WARNING: load average {load[0]:.2f} before the run: other work on the machine slows either engine by chance")
    folder = CACHE / STEM / time.strftime("%Y%m%d-%H%M%S")
    data = prepare_pairs(config, folder)
    log(f"{data['train']} training pairs, {data['held_out_n']} held out ({data['too_long']} of {data['total']} too long); "
        f"{steps} steps x {training.batch_size} pairs, {args.seeds} seed(s), {args.threads} threads")

    from components.reward.training import encode_pairs

    tokenizer = data["tokenizer"]
    alignflow_reading = encode_pairs(data["held_out"], tokenizer, append_eos=config.model.append_eos)
    eos_reading = encode_pairs(data["held_out"], tokenizer, append_eos=True)
    base = str(PROJECT_ROOT / config.model.base)
    common = {"threads": args.threads, "steps": steps, "train": str(data["paths"]["train"]),
              "held_out": str(data["paths"]["held_out"])}
    runs: dict[str, list[dict]] = {engine: [] for engine in ENGINES}
    raw: dict[str, list[dict]] = {engine: [] for engine in ENGINES}
    for seed in range(args.seeds):
        for engine in ENGINES if seed % 2 == 0 else ENGINES[::-1]:
            save_dir = folder / f"{engine}-seed{seed}"
            if engine == "alignflow":
                spec = {**common, "config": str(REWARD_CONFIG), "overrides": overrides + [f"seed={seed}"],
                        "save_dir": str(save_dir / "model")}
                worker_command = [sys.executable, "-m", "benchmarks.reward_vs_trl", "--worker"]
            else:
                spec = {**common, "base": base, "seed": seed, "max_length": config.model.max_length,
                        "warmup_steps": round(steps * training.warmup_ratio),
                        "training": training.model_dump(mode="json"), "save_dir": str(save_dir / "model")}
                worker_command = [str(trl), str(TRL_WORKER)]
            attempts = []
            for attempt in range(args.retries + 1):
                quiet = wait_quiet(args.wait_quiet) if args.wait_quiet > 0 else None
                load_before = os.getloadavg()
                log(f"{engine}, seed {seed}: training (load average {load_before[0]:.2f}"
                    + (f", others' CPU share just before {quiet:.0%}" if quiet is not None else "")
                    + (f", attempt {attempt + 1}" if attempt else "") + ")")
                result = run_worker(worker_command, spec, save_dir, f"{engine} seed {seed}")
                attempts.append({"others_cpu_share_before": quiet, "others_cpu_share_during": result["other_cpu_share"],
                                 "load_before": load_before, "load_after": os.getloadavg(),
                                 "pairs_per_second": pairs_per_second(result["step_ends"], training.batch_size, warmup),
                                 "peak_rss_mb": result["peak_rss_mb"]})
                if result["other_cpu_share"] <= args.max_disturbance:
                    break
                log(f"  disturbed: other processes used {result['other_cpu_share']:.0%} of the CPUs during the run "
                    f"(more than {args.max_disturbance:.0%})" + ("; repeating it" if attempt < args.retries else "; kept, flagged"))
            if engine == "trl":
                from components.reward.training import EncodedPairs

                ids = result.pop("held_out_ids")
                own = EncodedPairs(ids["chosen"], ids["rejected"], [0.0] * len(ids["chosen"]))
                result["trl_ids_equal_alignflow_with_eos"] = (own.chosen == eos_reading.chosen
                                                              and own.rejected == eos_reading.rejected)
                readings = {"own": own, "other": alignflow_reading}
            else:
                readings = {"own": alignflow_reading, "other": eos_reading}
            scored = score(save_dir / "model", readings, config.evaluation)
            run = {
                "seed": seed,
                "pairs_per_second": pairs_per_second(result["step_ends"], training.batch_size, warmup),
                "pairs_per_second_median": pairs_per_second_median(result["step_ends"], training.batch_size, warmup),
                "load_before": attempts[-1]["load_before"],
                "load_after": attempts[-1]["load_after"],
                "others_cpu_share_before": attempts[-1]["others_cpu_share_before"],
                "others_cpu_share_during": result["other_cpu_share"],
                "disturbed": result["other_cpu_share"] > args.max_disturbance,
                "attempts": attempts,
                "peak_rss_mb": result["peak_rss_mb"],
                "peak_rss_method": result["peak_rss_method"],
                "accuracy": scored["own"]["accuracy"],
                "accuracy_ci": scored["own"]["accuracy_ci"],
                "mean_margin": scored["own"]["mean_margin"],
                "accuracy_other_reading": scored["other"]["accuracy"],
                "train_seconds": result["train_seconds"],
                "setup_seconds": result["setup_seconds"],
                "wall_seconds": result["wall_seconds"],
                "steps": len(result["step_ends"]),
                "train_pairs": result["train_pairs"],
                "head_fingerprint": result["head_fingerprint"],
                "final_train_logs": result["final_logs"],
                "lr_points": lr_points(result["step_lrs"], round(steps * training.warmup_ratio)),
            }
            log(f"  {engine} seed {seed}: {run['pairs_per_second']:.0f} pairs/s, peak {run['peak_rss_mb']:.0f} MB, "
                f"accuracy {run['accuracy']:.4f} (other reading {run['accuracy_other_reading']:.4f}), "
                f"{run['train_seconds']:.1f} s training; other processes used {run['others_cpu_share_during']:.0%} of the CPUs")
            runs[engine].append(run)
            raw[engine].append({k: v for k, v in result.items() if k not in ("step_ends", "step_lrs")})
            if not args.keep_models:
                shutil.rmtree(save_dir / "model", ignore_errors=True)

    trl_result, alignflow_result = raw["trl"][0], raw["alignflow"][0]
    for engine in ENGINES:
        if any(run["steps"] != steps for run in runs[engine]):
            raise RuntimeError(f"{engine} did not take {steps} steps")
    report = {
        "command": command,
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "smoke": args.smoke,
        "machine": {**machine(), "load_average_at_start": load},
        "versions": {**trl_result["versions"], "alignflow_transformers": alignflow_result["versions"]["transformers"],
                     "alignflow_torch": alignflow_result["versions"]["torch"]},
        "seeds": list(range(args.seeds)),
        "settings": {
            "base": config.model.base, "data": config.data.source, "split": f"split_pairs(pairs, {EVAL_FRACTION}, seed={SPLIT_SEED})",
            "total_pairs": data["total"], "too_long": data["too_long"], "train_pairs": data["train"],
            "held_out_pairs": data["held_out_n"], "steps": steps, "batch_size": training.batch_size,
            "pairs_trained": steps * training.batch_size, "learning_rate": training.learning_rate,
            "warmup_ratio": training.warmup_ratio, "warmup_steps": round(steps * training.warmup_ratio),
            "lr_schedule": training.lr_schedule, "min_lr_ratio": training.min_lr_ratio, "weight_decay": training.weight_decay,
            "center_rewards_coef": training.center_rewards_coef, "max_grad_norm": training.max_grad_norm,
            "sampling_alignflow": training.sampling, "max_length": config.model.max_length, "append_eos_alignflow": config.model.append_eos,
            "threads": args.threads, "timing_warmup": warmup, "max_disturbance": args.max_disturbance,
            "retries": args.retries, "wait_quiet_seconds": args.wait_quiet, "dtype": "float32", "device": "cpu",
        },
        "engine_settings": {
            "alignflow": {"config": str(REWARD_CONFIG.relative_to(PROJECT_ROOT)), "overrides": overrides + ["seed=<seed>"],
                          "optimizer": alignflow_result["optimizer"], "resolved": alignflow_result["config"]},
            "trl": {"worker": str(TRL_WORKER.relative_to(PROJECT_ROOT)), "venv": "benchmarks/.venv-trl116",
                    "reward_config": trl_result["trl_settings"], "optimizer": trl_result["optimizer"],
                    "scheduler": trl_result["scheduler"], "eos_token": trl_result["eos_token"],
                    "held_out_ids_equal_alignflow_encoding_with_eos": all(r["trl_ids_equal_alignflow_with_eos"] for r in raw["trl"])},
        },
        "same_initial_head": all(a["head_fingerprint"] == t["head_fingerprint"] for a, t in zip(runs["alignflow"], runs["trl"])),
        "differences": None,  # filled below from the settings
        "runs": runs,
        "worker_results": raw,
        "summary": {engine: summarize(runs[engine]) for engine in ENGINES},
        "run_seconds": time.perf_counter() - started,
    }
    report["differences"] = differences(report["settings"])
    report["targets"] = targets(report["summary"])
    args.out.mkdir(parents=True, exist_ok=True)
    stem, snippet = (STEM + "-smoke", SNIPPET + "-smoke") if args.smoke else (STEM, SNIPPET)
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2))
    write_outputs(report, args.out, stem, snippet)
    if not args.keep_models:
        shutil.rmtree(folder, ignore_errors=True)
    log(f"wrote {args.out / stem}.json and {snippet}.md in {report['run_seconds'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
