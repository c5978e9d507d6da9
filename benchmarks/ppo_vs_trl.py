"""alignflow's PPO engine against TRL 1.12.0's PPOTrainer, and against the CPU's own matmul limit.

    python -m benchmarks.ppo_vs_trl            # the full run (~20 min on 2 cores)
    python -m benchmarks.ppo_vs_trl --quick    # ~5 min: fewer workloads, iterations and seeds
    python -m benchmarks.ppo_vs_trl --render benchmarks/results/ppo_vs_trl.json   # re-print a run's tables

One run:
  1. installs TRL into its own virtual environment (benchmarks/.venv-trl: torch==2.13.0 trl==1.12.0),
     never into alignflow's; bootstraps the demo models if missing; builds the larger random GPT-2;
  2. probes fp32 matmul throughput at 1..cores threads and runs everything at the best thread count
     (both sides alike; the best throughput is the MFU denominator);
  3. for each workload runs alignflow and TRL, each in a fresh subprocess, in alternating order, on the
     same models, prompts and PPO settings: episodes/s (median over iterations after warm-up), phase
     split, peak RSS, model FLOPs (benchmarks/measure.py) and MFU;
  4. trains both on the demo task for the same episodes over several seeds and evaluates every
     resulting policy with the same code on held-out prompts: reward-model score, gold positive share;
  5. prints the tables, writes benchmarks/results/ppo_vs_trl.json and README-snippet.md.

Identical work, and where the engines differ by design (kept, and stated in the output):
  - same policy, reference (a copy of it), reward model, tokenizer, prompts, batch, minibatch, update epochs,
    learning rate (constant), KL coefficient, temperature 1 with no top-k/top-p, response length, stop at EOS;
  - values: TRL trains a separate value model (a copy of the reward model, its documented setup); alignflow
    runs the demo config's critic (`critic.type: separate`: also a copy of the reward model, its scoring
    head included), or with `--value-head shared` a head on the policy's last hidden state;
  - TRL scores token ids straight away; alignflow decodes and re-tokenizes (a reward model may have its own
    tokenizer), the reward model's EOS appended where the policy ended with one (TRL's ids carry the sampled EOS);
  - gradient clipping as the demo config says (`rl.max_grad_norm: null`: none, as TRL's PPOTrainer).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from benchmarks.measure import matmul_flops_per_second
from benchmarks.workloads import CACHE, DEMO_DIR, PROJECT_ROOT, Workload, demo_workload, split_prompts, throughput_workloads

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
TRL_VENV = HERE / ".venv-trl"
TRL_REQUIREMENTS = ("torch==2.13.0", "trl==1.12.0")
SIDES = ("alignflow", "trl")
# Each side's worker script; "trl116" (TRL 1.16.0's RLOO and GRPO trainers) is run by benchmarks/time_to_quality.py.
WORKERS = {"alignflow": "alignflow_worker.py", "trl": "trl_worker.py", "trl116": "trl_group_worker.py"}
OLD_PEAK_METHOD = "ru_maxrss (includes the harness's resident size at fork)"
EVAL_SAMPLES = 4  # sampled completions per held-out prompt for each trained policy (seeds 1234, 1235, ...)
WORKER_ENV = {
    "TOKENIZERS_PARALLELISM": "false",
    "TRL_EXPERIMENTAL_SILENCE": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "DO_NOT_TRACK": "1",
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---------------------------------------------------------------------------------------------- setup


def trl_python() -> Path:
    """The peer's interpreter, installing torch==2.13.0 (CPU build) and trl==1.12.0 on first use."""
    return venv_python(TRL_VENV, TRL_REQUIREMENTS)


def venv_python(venv: Path, requirements: tuple[str, ...]) -> Path:
    """The interpreter of a peer's own virtual environment, created with exactly `requirements` (torch==X, trl==Y)
    on first use, or reinstalled when the versions there differ. Never alignflow's environment."""
    python = venv / "bin" / "python"
    wanted = [r.split("==")[1] for r in requirements]
    probe = "import torch, trl; print(torch.__version__.split('+')[0], trl.__version__)"
    if python.exists():
        found = subprocess.run([python, "-c", probe], capture_output=True, text=True)
        if found.returncode == 0 and found.stdout.split() == wanted:
            return python
    else:
        log(f"creating {venv}")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    log(f"installing {' '.join(requirements)} into {venv}")
    subprocess.run([python, "-m", "pip", "install", "--quiet", *requirements], check=True)
    return python


def ensure_demo_models() -> None:
    if (DEMO_DIR / "instruct" / "config.json").is_file() and (DEMO_DIR / "reward" / "config.json").is_file():
        return
    from components.demo import bootstrap
    from components.demo.domain import generate_demo_data

    data_dir = PROJECT_ROOT / "data" / "demo"
    if not data_dir.exists():  # a fresh clone: the data is generated, not stored (the same seed gives data.dvc's bytes)
        log(f"generating the demo data into {data_dir}")
        generate_demo_data(data_dir, seed=0)
    log("bootstrapping the demo models (about a minute)")
    bootstrap(data_dir, DEMO_DIR)


def engine_root(ref: str | None) -> tuple[Path, str]:
    """(directory holding the benchmarked `components/`, a description). None: this working tree."""
    head = _git("rev-parse", "HEAD")
    if ref is None:
        dirty = _git("status", "--porcelain", "--", "components")
        return PROJECT_ROOT, f"working tree at {head[:10]}" + (" (components/ modified)" if dirty else "")
    sha = _git("rev-parse", ref)
    root = CACHE / f"engine-{sha[:12]}"
    if not (root / "components").is_dir():
        root.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", sha, "components"], cwd=PROJECT_ROOT, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(root)], input=archive.stdout, check=True)
    return root, f"commit {sha[:10]}"


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True).stdout.strip()


def machine() -> dict:
    import torch

    model = platform.processor() or platform.machine()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version()}


def choose_threads(requested: int | None) -> tuple[int, dict]:
    """The thread count for every process of the run, and the matmul probe per thread count."""
    import torch

    counts = [requested] if requested else list(range(1, (os.cpu_count() or 1) + 1))
    probe: dict[int, dict] = {}
    for _ in range(3):  # interleaved rounds, best per count: a burst of load elsewhere should not pick for us
        for count in counts:
            torch.set_num_threads(count)
            result = matmul_flops_per_second()
            probe[count] = {k: max(v, probe.get(count, {}).get(k, 0.0)) for k, v in result.items()}
    best = max(probe, key=lambda c: probe[c]["best"])
    torch.set_num_threads(best)
    return best, {str(c): v for c, v in probe.items()}


# ---------------------------------------------------------------------------------------------- workers


def run_worker(side: str, spec: dict, python: Path, root: Path, threads: int, label: str) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix=f"{side}-", dir=CACHE))
    spec_path, result_path, log_path = workdir / "spec.json", workdir / "result.json", workdir / "worker.log"
    spec_path.write_text(json.dumps({**spec, "threads": threads}))
    script = HERE / WORKERS[side]
    command = [str(python), str(script), str(spec_path), str(result_path)]
    if side == "alignflow":
        command.append(str(root))
    env = {**os.environ, **WORKER_ENV, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    with open(log_path, "w") as output:
        done = subprocess.run(command, stdout=output, stderr=subprocess.STDOUT, env=env, cwd=PROJECT_ROOT)
    if done.returncode != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-30:])
        raise RuntimeError(f"{side} worker failed on {label} (exit {done.returncode}); log {log_path}:\n{tail}")
    result = json.loads(result_path.read_text())
    result["wall_seconds"] = time.perf_counter() - start
    return result


def job_spec(workload: Workload, prompts: list[str], seed: int, iterations: int, save_policy: str | None = None) -> dict:
    keys = (
        "policy", "reward", "batch_size", "mini_batch_size", "ppo_epochs", "learning_rate", "kl_coef",
        "max_new_tokens", "max_prompt_tokens", "temperature", "reward_max_length", "value_head", "max_grad_norm",
    )
    return {**{k: getattr(workload, k) for k in keys}, "prompts": prompts, "seed": seed, "iterations": iterations, "save_policy": save_policy}


def summarize(runs: list[dict], workload: Workload, peak_flops: float) -> dict:
    """Figures of one side on one workload: its runs' iterations after each run's warm-up, pooled."""
    measured = [it for run in runs for it in run["iterations"][workload.warmup :]]
    seconds = [it["seconds"] for it in measured]
    total_seconds = sum(seconds)
    phases = {name: sum(it["phases"][name] for it in measured) / total_seconds for name in measured[0]["phases"]}
    flops = [sum(it["flops"].values()) for it in measured]
    update_seconds = sum(it["phases"]["update"] for it in measured)
    update_flops = sum(it["flops"]["update"] for it in measured)
    return {
        "episodes_per_second": workload.batch_size / statistics.median(seconds),
        "iteration_seconds": seconds,
        "iteration_seconds_median": statistics.median(seconds),
        "phase_share": phases,
        "peak_rss_mb": max(run["peak_rss_mb"] for run in runs),
        # results from before the memory fix have no method: their figure was ru_maxrss, the parent's size included
        "peak_rss_method": runs[0].get("peak_rss_method", OLD_PEAK_METHOD),
        "rss_before_train_mb": max(run["rss_before_train_mb"] for run in runs),
        "runs": len(runs),
        "gflop_per_iteration": statistics.mean(flops) / 1e9,
        "gflop_per_iteration_by_phase": {
            name: statistics.mean(it["flops"][name] for it in measured) / 1e9 for name in measured[0]["flops"]
        },
        "mfu": statistics.median(f / s for f, s in zip(flops, seconds)) / peak_flops,
        "update_mfu": update_flops / update_seconds / peak_flops if update_seconds else None,
        "generation_steps": statistics.mean(it["generation_steps"] for it in measured),
        "scores": [[it["score"] for it in run["iterations"]] for run in runs],
        "parameters": runs[0]["parameters"],
        "threads": runs[0]["threads"],
        "setup_seconds": [run["setup_seconds"] for run in runs],
    }


# ---------------------------------------------------------------------------------------------- the run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ppo_vs_trl", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="~5 minutes: fewer workloads, iterations and seeds")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for every process (default: the best of the matmul probe)")
    parser.add_argument("--engine-ref", default=None, help="benchmark alignflow's components/ at this git ref (default: the working tree)")
    parser.add_argument("--repeats", type=int, default=None, help="runs per side and workload, alternating (default 2, quick 1)")
    parser.add_argument("--seeds", type=int, default=None, help="learning-comparison seeds (default 3, quick 1)")
    parser.add_argument("--learn-iterations", type=int, default=None, help="PPO iterations per learning run (default 20, quick 6)")
    parser.add_argument("--value-head", choices=("shared", "separate"), default=None,
                        help="alignflow's critic (default: the demo config's critic.type)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    parser.add_argument("--render", type=Path, default=None, metavar="JSON",
                        help="measure nothing: print the tables of an earlier run's results and rewrite its README snippet")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if args.render:
        render(args.render)
        return 0
    args.command = " ".join([parser.prog, *map(shlex.quote, argv)])  # what the README says produced its table
    seeds = args.seeds or (1 if args.quick else 3)
    repeats = args.repeats or (1 if args.quick else 2)
    learn_iterations = args.learn_iterations or (6 if args.quick else 20)
    started = time.perf_counter()
    CACHE.mkdir(parents=True, exist_ok=True)

    python_trl = trl_python()
    ensure_demo_models()
    root, engine = engine_root(args.engine_ref)
    workloads = throughput_workloads(args.quick, args.value_head)
    train_prompts, eval_prompts = split_prompts()
    threads, probe_before = choose_threads(args.threads)
    log(f"threads {threads}; matmul {probe_before[str(threads)]['best'] / 1e9:.1f} GFLOP/s; engine: {engine}")

    pythons = {"alignflow": Path(sys.executable), "trl": python_trl}
    raw: dict[str, dict[str, list[dict]]] = {}
    for number, workload in enumerate(workloads):
        raw[workload.name] = {side: [] for side in SIDES}
        for repeat in range(repeats):
            # A B B A ...: who goes first alternates between repeats and between workloads
            order = SIDES if (number + repeat) % 2 == 0 else SIDES[::-1]
            for side in order:
                log(f"{workload.name}: {side}, run {repeat + 1}/{repeats} ({workload.iterations} iterations, {workload.warmup} warm-up)")
                spec = job_spec(workload, train_prompts, seed=repeat, iterations=workload.iterations)
                raw[workload.name][side].append(run_worker(side, spec, pythons[side], root, threads, workload.name))

    learn = replace(demo_workload(iterations=learn_iterations, warmup=1, value_head=args.value_head), name="learning")
    policies: dict[str, list[str]] = {side: [] for side in SIDES}
    learning_runs: dict[str, list[dict]] = {side: [] for side in SIDES}
    for seed in range(seeds):
        for side in SIDES if seed % 2 == 0 else SIDES[::-1]:
            log(f"learning: {side}, seed {seed} ({learn_iterations} iterations x {learn.batch_size} episodes)")
            out_dir = str(CACHE / "policies" / f"{side}-seed{seed}")
            spec = job_spec(learn, train_prompts, seed=seed, iterations=learn_iterations, save_policy=out_dir)
            learning_runs[side].append(run_worker(side, spec, pythons[side], root, threads, f"learning seed {seed}"))
            policies[side].append(out_dir)
    log("evaluating the trained policies on the held-out prompts")
    evaluation = run_worker("alignflow", {
        "evaluate": [learn.policy] + policies["alignflow"] + policies["trl"],
        "reward": learn.reward, "prompts": eval_prompts, "seed": 1234, "samples": EVAL_SAMPLES, "max_new_tokens": learn.max_new_tokens,
        "max_prompt_tokens": learn.max_prompt_tokens, "temperature": learn.temperature, "reward_max_length": 64,
    }, pythons["alignflow"], root, threads, "evaluation")["policies"]

    _, probe_after = choose_threads(threads)
    peak_flops = max(probe_before[str(threads)]["best"], probe_after[str(threads)]["best"])
    report = build_report(
        args, workloads, raw, learn, learning_runs, policies, evaluation, peak_flops,
        {"threads": threads, "before": probe_before, "after": probe_after}, engine, time.perf_counter() - started,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    # A run with the other critic than the demo's goes to its own files, next to the default run's.
    suffix = ("-quick" if args.quick else "") + (
        f"-{learn.value_head}" if learn.value_head != demo_workload(iterations=1, warmup=0).value_head else ""
    )
    (args.out / f"ppo_vs_trl{suffix}.json").write_text(json.dumps(report, indent=2))
    (args.out / f"README-snippet{suffix}.md").write_text(markdown(report))
    print_tables(report)
    log(f"wrote {args.out / f'ppo_vs_trl{suffix}.json'} and README-snippet{suffix}.md in {report['run_seconds'] / 60:.1f} min")
    return 0


def build_report(args, workloads, raw, learn, learning_runs, policies, evaluation, peak_flops, matmul, engine, seconds) -> dict:
    throughput = []
    for workload in workloads:
        sides = {side: summarize(raw[workload.name][side], workload, peak_flops) for side in SIDES}
        throughput.append({
            "workload": workload.settings(),
            **sides,
            "speedup": sides["alignflow"]["episodes_per_second"] / sides["trl"]["episodes_per_second"],
            "memory_ratio": sides["alignflow"]["peak_rss_mb"] / sides["trl"]["peak_rss_mb"],
        })
        throughput[-1]["speedup_ceiling"] = speedup_ceiling(throughput[-1], peak_flops)
    learning = {"baseline": evaluation[learn.policy], "settings": learn.settings(), "episodes": learn.batch_size * learn.iterations,
                "eval_samples": EVAL_SAMPLES}
    for side in SIDES:
        rows = [evaluation[path] for path in policies[side]]
        learning[side] = {
            "per_seed": rows,
            "score": statistics.mean(r["score"] for r in rows),
            "score_sd": statistics.stdev(r["score"] for r in rows) if len(rows) > 1 else 0.0,
            "gold_positive_share": statistics.mean(r["gold_positive_share"] for r in rows),
            "gold_positive_share_sd": statistics.stdev(r["gold_positive_share"] for r in rows) if len(rows) > 1 else 0.0,
            "train_score_last": [run["iterations"][-1]["score"] for run in learning_runs[side]],
            "episodes_per_second": [learn.batch_size / statistics.median(it["seconds"] for it in run["iterations"][1:]) for run in learning_runs[side]],
            "peak_rss_mb": [run["peak_rss_mb"] for run in learning_runs[side]],
        }
    return {
        "command": args.command,
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": machine(),
        "engine": engine,
        "peer": "trl==1.12.0 (trl.experimental.ppo.PPOTrainer), torch==2.13.0, own virtual environment",
        "matmul": {**matmul, "peak_flops": peak_flops},
        "flops_formula": "forward 2*N*tokens, training 6*N*tokens; N = non-embedding matmul parameters of each backbone "
        "per token it reads + vocab*hidden of the LM head per position it is applied to; counted by forward hooks "
        "on the passes each side actually runs (attention products and recomputation left out)",
        "repeats": min(row["alignflow"]["runs"] for row in throughput),
        "throughput": throughput,
        "learning": learning,
        "targets": targets(throughput, learning),
        "run_seconds": seconds,
    }


def speedup_ceiling(row: dict, peak_flops: float) -> float:
    """The speed-up alignflow would have over TRL's measured iteration if alignflow's own model FLOPs per
    iteration ran at 100% of the measured matmul peak: no engine doing that work passes it on this machine."""
    return row["trl"]["iteration_seconds_median"] / (row["alignflow"]["gflop_per_iteration"] * 1e9 / peak_flops)


def targets(throughput: list[dict], learning: dict) -> list[dict]:
    """Issue 7's targets, each with what was measured and whether it is met."""
    larger = throughput[-1]
    return [
        {
            "target": "alignflow episodes/s >= 2x TRL's on every workload",
            "measured": "; ".join(
                f"{row['workload']['name']} {row['speedup']:.2f}x (ceiling {row['speedup_ceiling']:.2f}x)" for row in throughput
            ),
            "met": all(row["speedup"] >= 2 for row in throughput),
        },
        {
            "target": "alignflow peak memory <= TRL's",
            "measured": "; ".join(f"{row['workload']['name']} {row['alignflow']['peak_rss_mb']:.0f} vs {row['trl']['peak_rss_mb']:.0f} MB" for row in throughput),
            "met": all(row["memory_ratio"] <= 1 for row in throughput),
        },
        {
            "target": "alignflow score and gold share after equal episodes >= TRL's",
            "measured": (
                f"score {learning['alignflow']['score']:+.3f} vs {learning['trl']['score']:+.3f}; gold "
                f"{learning['alignflow']['gold_positive_share']:.3f} vs {learning['trl']['gold_positive_share']:.3f}"
            ),
            "met": learning["alignflow"]["score"] >= learning["trl"]["score"]
            and learning["alignflow"]["gold_positive_share"] >= learning["trl"]["gold_positive_share"],
        },
        {
            "target": f"update phase >= 40% of matmul throughput on {larger['workload']['name']}",
            "measured": f"{larger['alignflow']['update_mfu']:.1%} (TRL {larger['trl']['update_mfu']:.1%})",
            "met": larger["alignflow"]["update_mfu"] >= 0.40,
        },
    ]


# ---------------------------------------------------------------------------------------------- output


def render(path: Path) -> None:
    """The tables of a results JSON written by an earlier run, with the figures derived from its measurements
    (the speed-up ceiling, the targets) recomputed by this version of the harness; the README snippet next to it
    (README-snippet<suffix>.md for ppo_vs_trl<suffix>.json) is rewritten."""
    report = json.loads(path.read_text())
    for row in report["throughput"]:
        row["speedup_ceiling"] = speedup_ceiling(row, report["matmul"]["peak_flops"])
    report["targets"] = targets(report["throughput"], report["learning"])
    path.write_text(json.dumps(report, indent=2))
    snippet = path.with_name(path.name.replace("ppo_vs_trl", "README-snippet", 1)).with_suffix(".md")
    snippet.write_text(markdown(report))
    print_tables(report)
    log(f"rewrote {path} and {snippet.name}")


def _throughput_rows(report: dict) -> list[list[str]]:
    rows = []
    for row in report["throughput"]:
        w = row["workload"]
        for side in SIDES:
            s = row[side]
            share = s["phase_share"]
            rows.append([
                w["name"], side, f"{s['episodes_per_second']:.1f}",
                f"{row['speedup']:.2f}x" if side == "alignflow" else "",
                f"{row['speedup_ceiling']:.2f}x" if side == "alignflow" else "", f"{s['generation_steps']:.0f}",
                f"{share['generation']:.0%}", f"{share['reference'] + share['value']:.0%}", f"{share['scoring']:.0%}",
                f"{share['update']:.0%}", f"{share['other']:.0%}", f"{s['peak_rss_mb']:.0f}", f"{s['gflop_per_iteration']:.0f}",
                f"{s['mfu']:.1%}", f"{s['update_mfu']:.1%}",
            ])
    return rows


THROUGHPUT_HEADER = [
    "workload", "engine", "episodes/s", "speed-up", "ceiling", "decode steps", "generation", "ref+value", "scoring", "update",
    "other", "peak RSS MB", "GFLOP/iter", "MFU", "update MFU",
]


def _learning_rows(report: dict) -> list[list[str]]:
    learning = report["learning"]
    base = learning["baseline"]
    rows = [["instruct (before PPO)", "", f"{base['score']:+.3f}", f"{base['gold_positive_share']:.3f}", f"{base['length_mean']:.1f}", ""]]
    for side in SIDES:
        s = learning[side]
        lengths = statistics.mean(r["length_mean"] for r in s["per_seed"])
        rows.append([
            side, str(len(s["per_seed"])), f"{s['score']:+.3f} ± {s['score_sd']:.3f}",
            f"{s['gold_positive_share']:.3f} ± {s['gold_positive_share_sd']:.3f}", f"{lengths:.1f}",
            f"{statistics.median(s['episodes_per_second']):.1f}",
        ])
    return rows


LEARNING_HEADER = ["policy", "seeds", "reward-model score", "gold positive share", "response tokens", "episodes/s in training"]


def print_tables(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 170))
    for title, header, rows in (
        (f"Throughput (median episodes/s after warm-up; matmul peak {report['matmul']['peak_flops'] / 1e9:.1f} GFLOP/s "
         f"at {report['matmul']['threads']} thread(s))", THROUGHPUT_HEADER, _throughput_rows(report)),
        (f"Learning: held-out evaluation after {report['learning']['episodes']} episodes", LEARNING_HEADER, _learning_rows(report)),
        ("Targets", ["target", "measured", "met"], [[t["target"], t["measured"], "yes" if t["met"] else "NO"] for t in report["targets"]]),
    ):
        table = Table(title=title)
        for column in header:
            table.add_column(column)
        for row in rows:
            table.add_row(*row)
        console.print(table)


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _clipping_text(settings: dict) -> str:
    if "max_grad_norm" not in settings:  # a run from before the harness recorded it: alignflow clipped at 1.0
        return "alignflow's gradient norm clipped at 1.0"
    norm = settings["max_grad_norm"]
    return "no gradient clipping" if norm is None else f"alignflow's gradient norm clipped at {norm}"


def _samples_text(report: dict) -> str:
    samples = report["learning"].get("eval_samples", 1)
    return "one sampled\ncompletion" if samples == 1 else f"{samples} sampled\ncompletions"


def _peak_text(report: dict) -> str:
    method = report["throughput"][0]["alignflow"].get("peak_rss_method", OLD_PEAK_METHOD)
    return f"each worker's, as {method}"


def markdown(report: dict) -> str:
    m, matmul, learning = report["machine"], report["matmul"], report["learning"]
    settings = learning["settings"]
    return f"""## Performance

`{report['command']}` ({report['run_seconds'] / 60:.0f} min) on {m['cpu']}, {m['cores']} cores, torch {m['torch']},
{matmul['threads']} torch thread(s) per process (the best of the harness's fp32 matmul probe, {matmul['peak_flops'] / 1e9:.1f} GFLOP/s,
the denominator of MFU); {report['date'][:10]}; alignflow engine: {report['engine']}; peer: {report['peer']}.
Both engines run the same policy, reference, reward model, prompts and PPO settings (demo: batch 64, minibatch 16,
4 update epochs, lr 1e-4, KL coefficient 0.2, {_clipping_text(settings)}, up to 24 response tokens, temperature 1), each in a fresh process,
{report['repeats']} run(s) per engine and workload in alternating order (A B B A), episodes/s the median over the
iterations after each run's warm-up. "decode steps" is the mean generated width (the batch stops when every row has
ended). "gpt2 6x512" is a randomly initialised GPT-2 (6 layers, width 512, ~19M parameters) with a reward model of
the same shape. Critics: TRL trains a separate value model (a copy of the reward model); alignflow here
{"a separate critic, also a copy of the reward model (`critic.type: separate`)" if settings.get("value_head") == "separate" else "a value head on the policy (`critic.type: shared`)"}. Phase columns are shares of iteration time; MFU = model FLOPs (2·N per token forward, 6·N training, per pass
each engine runs) / time / matmul peak. "ceiling" is the speed-up alignflow would have if its own model FLOPs per
iteration ran at 100% of the matmul peak (TRL's measured iteration time / (alignflow's GFLOP/iter / peak)): with the
same work, no engine passes it on this machine. Peak RSS: {_peak_text(report)}.

{_md_table(THROUGHPUT_HEADER, _throughput_rows(report))}

Learning on the demo task: {settings['iterations']} iterations x {settings['batch_size']} episodes, then {_samples_text(report)} for each of {128} held-out prompts, scored by the reward model (reading the text as written, as
it was trained) and the gold scorer (mean ± sd over seeds).

{_md_table(LEARNING_HEADER, _learning_rows(report))}

Targets (issue 7):

{_md_table(["target", "measured", "met"], [[t['target'], t['measured'], "yes" if t['met'] else "**no**"] for t in report['targets']])}
"""


if __name__ == "__main__":
    sys.exit(main())
