"""Time to quality: how soon each engine and algorithm reaches a gold share on the demo task, in training
wall-clock seconds and in episodes, over seeds; then episodes/s, time split and peak memory of every engine.

    python -m benchmarks.time_to_quality                # the real run (quiet machine): 4 seeds, saves every 640 episodes up to 5120
    python -m benchmarks.time_to_quality --smoke        # every path once, tiny: 1 seed, 2 iterations, demo throughput only
    python -m benchmarks.time_to_quality --engines alignflow:ppo trl-1.16:grpo --seeds 1 --budget 128 --max-episodes 256
    python -m benchmarks.time_to_quality --skip-throughput    # (or --skip-learning) one half only
    python -m benchmarks.time_to_quality --render benchmarks/results/time_to_quality.json   # re-print, re-plot

Engines (--engines; default all but trl-1.16:dr_grpo): alignflow:<algorithm> for every algorithm of
benchmarks/algorithms.py (ppo, rloo, grpo, dr_grpo, reinforce_pp, reinforce_pp_baseline), trl-1.12:ppo (TRL 1.12.0's
PPOTrainer, benchmarks/.venv-trl), trl-1.16:rloo, trl-1.16:grpo and trl-1.16:dr_grpo (TRL 1.16.0's RLOOTrainer and
GRPOTrainer, benchmarks/.venv-trl116; both venvs made on first use, never alignflow's). An alignflow algorithm the
engine does not have yet is reported unavailable and skipped (the worker asks the engine's config), never stood in for.

One run:
  1. learning: for each seed, every engine in a fresh process (order reversed on odd seeds), trained on the demo's
     training prompts to --max-episodes, its policy saved every --budget episodes with the training wall-clock
     seconds so far (setup and saving excluded); each saved policy then evaluated by the same code
     (alignflow_worker.evaluate: 128 held-out prompts x 4 samples, reward-model score and the gold scorer), and deleted;
  2. throughput: every engine on the demo workloads and GPT-2 6x512 (benchmarks/workloads.py), alternating, summarised
     as benchmarks/ppo_vs_trl.py does (episodes/s the median after warm-up, phase split, own peak RSS, model FLOPs);
  3. writes benchmarks/results/time_to_quality.json, time_to_quality.png (gold share against training seconds and
     against episodes, one line per engine and algorithm) and README-snippet-time-to-quality.md.
Methodology and how the settings were matched: benchmarks/README-time-to-quality.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import shlex
import shutil
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

from benchmarks import ppo_vs_trl
from benchmarks.algorithms import ALGORITHMS, alignflow_settings, samples_per_prompt, trl_peer
from benchmarks.ppo_vs_trl import (
    EVAL_SAMPLES, RESULTS, choose_threads, engine_root, ensure_demo_models, log, machine, run_worker, speedup_ceiling,
    summarize, trl_python, venv_python,
)
from benchmarks.workloads import CACHE, Workload, demo_workload, group_workload, split_prompts, throughput_workloads

HERE = Path(__file__).resolve().parent
TRL116_VENV = HERE / ".venv-trl116"
TRL116_REQUIREMENTS = ("torch==2.13.0", "trl==1.16.0")
TARGETS = (0.75, 0.80)  # gold shares whose time and episodes to reach are reported
EVAL_SEED = 1234

# engine -> (side, algorithm); the side names the worker and its venv (ppo_vs_trl.WORKERS)
ENGINES = {f"alignflow:{name}": ("alignflow", name) for name in ALGORITHMS}
ENGINES |= {"trl-1.12:ppo": ("trl", "ppo"), "trl-1.16:rloo": ("trl116", "rloo"), "trl-1.16:grpo": ("trl116", "grpo"),
            "trl-1.16:dr_grpo": ("trl116", "dr_grpo")}
DEFAULT_ENGINES = [name for name in ENGINES if name != "trl-1.16:dr_grpo"]  # the peers: TRL's RLOO and GRPO


def trl116_python() -> Path:
    """TRL 1.16.0's interpreter (torch==2.13.0 CPU build, trl==1.16.0), its venv made on first use."""
    return venv_python(TRL116_VENV, TRL116_REQUIREMENTS)


def engine_workload(engine: str, base: Workload, k: int, group_minibatch: int | None, group_epochs: int) -> Workload:
    """What `engine` runs for the workload `base`: PPO (either engine) the base itself (the demo's PPO settings);
    a critic-free algorithm the same episodes per iteration as k completions of batch/k prompts (1 for REINFORCE++),
    one optimizer step per generation batch unless --group-minibatch/--group-epochs say otherwise."""
    algorithm = ENGINES[engine][1]
    if algorithm == "ppo":
        return base
    return group_workload(base, samples_per_prompt(algorithm, k), group_minibatch, group_epochs)


def job_spec(engine: str, workload: Workload, k: int, prompts: list[str], seed: int, iterations: int,
             budgets: list[int] | None = None, save_dir: Path | None = None) -> dict:
    spec = ppo_vs_trl.job_spec(workload, prompts, seed=seed, iterations=iterations)
    return {**spec, "algorithm": ENGINES[engine][1], "k": k, "samples_per_prompt": workload.samples_per_prompt,
            "save_budgets": budgets or [], "save_dir": str(save_dir) if save_dir else None}


def probe_alignflow(engines: list[str], k: int, root: Path, threads: int) -> dict[str, str]:
    """{engine: why it is unavailable} for the alignflow algorithms this engine's config does not accept."""
    wanted = [ENGINES[e][1] for e in engines if ENGINES[e][0] == "alignflow"]
    if not wanted:
        return {}
    found = run_worker("alignflow", {"probe": wanted, "k": k}, Path(sys.executable), root, threads, "probe")["algorithms"]
    return {f"alignflow:{name}": row["reason"] for name, row in found.items() if not row["available"]}


# ---------------------------------------------------------------------------------------------- figures


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (0 for one value)."""
    mean = statistics.mean(values)
    return mean, (statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0)


def first_reaching(points: list[dict], target: float) -> dict | None:
    """The first saved policy (by episodes) whose gold share reaches `target`: its episodes and training seconds.
    Resolution: one save budget (the share between two saves is not measured)."""
    for point in sorted(points, key=lambda p: p["episodes"]):
        if point["gold"] >= target:
            return {"episodes": point["episodes"], "seconds": point["train_seconds"]}
    return None


def gold_at_seconds(points: list[dict], seconds: float) -> dict | None:
    """The policy a run had at `seconds` of training: its last save at or before then; None past its last save
    (that run trained no further, so it says nothing about later times)."""
    ordered = sorted(points, key=lambda p: p["train_seconds"])
    if not ordered or seconds > ordered[-1]["train_seconds"]:
        return None
    return [p for p in ordered if p["train_seconds"] <= seconds][-1]


def time_to_targets(runs: list[dict]) -> dict:
    """Per target: how many seeds reached it, and mean/sd/min/max seconds and episodes over those that did."""
    out = {}
    for target in TARGETS:
        reached = [r for r in (first_reaching(run["points"], target) for run in runs) if r is not None]
        row: dict = {"target": target, "seeds": len(runs), "reached": len(reached)}
        for key in ("seconds", "episodes"):
            values = [r[key] for r in reached]
            if values:
                row[key] = {"mean": statistics.mean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
                            "min": min(values), "max": max(values), "per_seed": values}
        out[f"{target:.2f}"] = row
    return out


def curves(runs: list[dict], seconds_step: float) -> dict:
    """Mean ± standard error over seeds of gold share and score after each budget of episodes (with the mean
    training seconds there) and after each budget of `seconds_step` seconds."""
    by_episodes = []
    for episodes in sorted({p["episodes"] for run in runs for p in run["points"]}):
        at = [p for run in runs for p in run["points"] if p["episodes"] == episodes]
        gold, gold_se = mean_se([p["gold"] for p in at])
        score, score_se = mean_se([p["score"] for p in at])
        by_episodes.append({"episodes": episodes, "seeds": len(at), "gold": gold, "gold_se": gold_se, "score": score,
                            "score_se": score_se, "train_seconds": statistics.mean(p["train_seconds"] for p in at)})
    by_seconds = []
    last = max((p["train_seconds"] for run in runs for p in run["points"]), default=0.0)
    for step in range(int(last // seconds_step) + 1):
        at = [p for p in (gold_at_seconds(run["points"], step * seconds_step) for run in runs) if p is not None]
        if at:
            gold, gold_se = mean_se([p["gold"] for p in at])
            score, score_se = mean_se([p["score"] for p in at])
            by_seconds.append({"seconds": step * seconds_step, "seeds": len(at), "gold": gold, "gold_se": gold_se,
                               "score": score, "score_se": score_se})
    return {"by_episodes": by_episodes, "by_seconds": by_seconds}


# ---------------------------------------------------------------------------------------------- the run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.time_to_quality", description=__doc__.split("\n")[0])
    parser.add_argument("--engines", nargs="+", default=None, choices=list(ENGINES), metavar="ENGINE",
                        help=f"default: {' '.join(DEFAULT_ENGINES)}")
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--k", type=int, default=4, help="completions per prompt of the group methods, both engines")
    parser.add_argument("--budget", type=int, default=640, help="save and evaluate the policy every this many episodes")
    parser.add_argument("--max-episodes", type=int, default=5120, help="episodes per learning run (the demo's rl.total_episodes)")
    parser.add_argument("--group-minibatch", type=int, default=None, help="completions per optimizer step of the critic-free runs (default: the whole batch)")
    parser.add_argument("--group-epochs", type=int, default=1, help="passes over each generation batch of the critic-free runs")
    parser.add_argument("--seconds-step", type=float, default=None, help="the wall-clock budgets of the curves (default: 1/16 of the longest run)")
    parser.add_argument("--quick-throughput", action="store_true", help="the throughput half on ppo_vs_trl's --quick workloads")
    parser.add_argument("--repeats", type=int, default=None, help="throughput runs per engine and workload, alternating (default 2: A B .. B A; smoke 1)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--engine-ref", default=None, help="benchmark alignflow's components/ at this git ref")
    parser.add_argument("--skip-learning", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="prove every path: 1 seed, 2 iterations, demo throughput only")
    parser.add_argument("--keep-policies", action="store_true", help="keep the saved policies under benchmarks/.cache")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--render", type=Path, default=None, metavar="JSON", help="measure nothing: re-print and re-plot a results file")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if args.render:
        report = json.loads(args.render.read_text())
        write_outputs(report, args.render.parent, args.render.stem)
        return 0
    args.command = " ".join([parser.prog, *map(shlex.quote, argv)])
    if args.smoke:
        args.seeds, args.budget, args.max_episodes = 1, 64, 128
    args.repeats = args.repeats or (1 if args.smoke else 2)
    engines = args.engines or DEFAULT_ENGINES
    started = time.perf_counter()
    CACHE.mkdir(parents=True, exist_ok=True)

    pythons = {"alignflow": Path(sys.executable)}
    if any(ENGINES[e][0] == "trl" for e in engines):
        pythons["trl"] = trl_python()
    if any(ENGINES[e][0] == "trl116" for e in engines):
        pythons["trl116"] = trl116_python()
    ensure_demo_models()
    root, engine_description = engine_root(args.engine_ref)
    threads, probe_before = choose_threads(args.threads)
    log(f"threads {threads}; matmul {probe_before[str(threads)]['best'] / 1e9:.1f} GFLOP/s; alignflow engine: {engine_description}")
    unavailable = probe_alignflow(engines, args.k, root, threads)
    for engine, reason in unavailable.items():
        log(f"{engine}: NOT AVAILABLE in this engine, skipped ({reason})")
    engines = [e for e in engines if e not in unavailable]
    train_prompts, eval_prompts = split_prompts()
    stamp = time.strftime("%Y%m%d-%H%M%S")

    context = {"engines": engines, "pythons": pythons, "root": root, "threads": threads, "args": args,
               "train_prompts": train_prompts, "eval_prompts": eval_prompts, "stamp": stamp}
    learning = None if args.skip_learning else learn(context)
    throughput = None if args.skip_throughput else measure_throughput(context)
    _, probe_after = choose_threads(threads)
    peak_flops = max(probe_before[str(threads)]["best"], probe_after[str(threads)]["best"])
    if throughput is not None:
        throughput = summarize_throughput(throughput, peak_flops)

    report = {
        "command": args.command,
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": machine(),
        "alignflow_engine": engine_description,
        "peers": {"trl-1.12": "trl==1.12.0, torch==2.13.0, benchmarks/.venv-trl",
                  "trl-1.16": "trl==1.16.0, torch==2.13.0, benchmarks/.venv-trl116"},
        "matmul": {"threads": threads, "before": probe_before, "after": probe_after, "peak_flops": peak_flops},
        "engines": engines,
        "unavailable": unavailable,
        "algorithms": {e: algorithm_notes(e, args.k) for e in engines + list(unavailable)},
        "k": args.k,
        "learning": learning,
        "throughput": throughput,
        "run_seconds": time.perf_counter() - started,
    }
    report["targets"] = targets(report)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "time_to_quality" + ("-smoke" if args.smoke else "")
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2))
    write_outputs(report, args.out, stem)
    log(f"wrote {args.out / stem}.json, .png and README-snippet-{stem.replace('_', '-')}.md in {report['run_seconds'] / 60:.1f} min")
    return 0


def algorithm_notes(engine: str, k: int) -> dict:
    side, algorithm = ENGINES[engine]
    if side == "alignflow":
        return {"side": side, "algorithm": algorithm, "settings": alignflow_settings(algorithm, k),
                "differs_from_trl": ALGORITHMS[algorithm]["differs"]}
    venv, trainer, settings = trl_peer(algorithm)
    return {"side": side, "algorithm": algorithm, "trainer": f"{venv} {trainer}", "settings": settings}


def learn(c: dict) -> dict:
    """Train every engine on every seed, saving at the budgets; evaluate each saved policy, then delete it."""
    args = c["args"]
    base = replace(demo_workload(iterations=1, warmup=0), name="learning")
    budgets = list(range(args.budget, args.max_episodes + 1, args.budget))
    evaluation_spec = {
        "reward": base.reward, "prompts": c["eval_prompts"], "seed": EVAL_SEED, "samples": EVAL_SAMPLES,
        "max_new_tokens": base.max_new_tokens, "max_prompt_tokens": base.max_prompt_tokens,
        "temperature": base.temperature, "reward_max_length": 64,
    }

    def evaluate(paths: list[str]) -> dict:
        spec = {**evaluation_spec, "evaluate": paths}
        return run_worker("alignflow", spec, c["pythons"]["alignflow"], c["root"], c["threads"], "evaluation")["policies"]

    log("evaluating the instruct model (the curves' starting point)")
    baseline = evaluate([base.policy])[base.policy]
    runs: dict[str, list[dict]] = {engine: [] for engine in c["engines"]}
    for seed in range(args.seeds):
        for engine in c["engines"] if seed % 2 == 0 else c["engines"][::-1]:
            side = ENGINES[engine][0]
            workload = engine_workload(engine, base, args.k, args.group_minibatch, args.group_epochs)
            iterations = args.max_episodes // workload.batch_size
            save_dir = CACHE / "time_to_quality" / c["stamp"] / f"{engine.replace(':', '-')}-seed{seed}"
            log(f"learning: {engine}, seed {seed} ({iterations} iterations x {workload.batch_size} episodes, "
                f"k={workload.samples_per_prompt}, saves every {args.budget})")
            spec = job_spec(engine, workload, args.k, c["train_prompts"], seed, iterations, budgets, save_dir)
            result = run_worker(side, spec, c["pythons"][side], c["root"], c["threads"], f"{engine} seed {seed}")
            scored = evaluate([s["path"] for s in result["saved"]])
            points = [{"episodes": s["episodes"], "train_seconds": s["train_seconds"],
                       "gold": scored[s["path"]]["gold_positive_share"], "score": scored[s["path"]]["score"],
                       "length": scored[s["path"]]["length_mean"]} for s in result["saved"]]
            log(f"  {engine} seed {seed}: " + ", ".join(f"{p['episodes']} ep {p['train_seconds']:.0f} s gold {p['gold']:.3f}" for p in points))
            measured = result["iterations"][1:] or result["iterations"]  # after the first (warm-up) iteration
            runs[engine].append({
                "seed": seed, "workload": workload.settings(), "points": points,
                "episodes_per_second": workload.batch_size / statistics.median(it["seconds"] for it in measured),
                "setup_seconds": result["setup_seconds"], "peak_rss_mb": result["peak_rss_mb"],
                "peak_rss_method": result.get("peak_rss_method"), "train_scores": [it.get("score") for it in result["iterations"]],
                "trl_settings": result.get("trl_settings"), "engine_settings": result.get("engine_settings"),
            })
            if not args.keep_policies:
                shutil.rmtree(save_dir, ignore_errors=True)
    start = {"episodes": 0, "train_seconds": 0.0, "gold": baseline["gold_positive_share"], "score": baseline["score"],
             "length": baseline["length_mean"]}
    for engine_runs in runs.values():
        for run in engine_runs:
            run["points"].insert(0, dict(start))
    longest = max((p["train_seconds"] for rs in runs.values() for r in rs for p in r["points"]), default=16.0)
    step = args.seconds_step or nice_step(longest / 16)
    return {
        "baseline": baseline, "budget": args.budget, "max_episodes": args.max_episodes, "seeds": args.seeds,
        "eval": {"prompts": len(c["eval_prompts"]), "samples": EVAL_SAMPLES, "seed": EVAL_SEED},
        "seconds_step": step,
        "engines": {engine: {"runs": rs, "curves": curves(rs, step), "time_to": time_to_targets(rs)} for engine, rs in runs.items()},
    }


def nice_step(raw: float) -> float:
    """1, 2 or 5 times a power of ten, at least `raw`."""
    power = 10 ** math.floor(math.log10(max(raw, 1e-9)))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= raw)


def measure_throughput(c: dict) -> dict:
    """Every engine on each throughput workload, in fresh processes, alternating order (A B .. B A)."""
    args = c["args"]
    bases = throughput_workloads(args.quick_throughput)
    if args.smoke:  # the path, not the figures: the demo workload, 2 iterations
        bases = [replace(bases[0], iterations=2, warmup=1)]
    raw: dict = {}
    for number, base in enumerate(bases):
        raw[base.name] = {"base": base, "engines": {}}
        for repeat in range(args.repeats):
            order = c["engines"] if (number + repeat) % 2 == 0 else c["engines"][::-1]
            for engine in order:
                side = ENGINES[engine][0]
                workload = engine_workload(engine, base, args.k, args.group_minibatch, args.group_epochs)
                log(f"{base.name}: {engine}, run {repeat + 1}/{args.repeats} ({workload.iterations} iterations, "
                    f"{workload.warmup} warm-up, k={workload.samples_per_prompt})")
                spec = job_spec(engine, workload, args.k, c["train_prompts"], seed=repeat, iterations=workload.iterations)
                result = run_worker(side, spec, c["pythons"][side], c["root"], c["threads"], f"{engine} {base.name}")
                raw[base.name]["engines"].setdefault(engine, {"workload": workload, "runs": []})["runs"].append(result)
    return raw


def summarize_throughput(raw: dict, peak_flops: float) -> list[dict]:
    """Per workload: each engine's summary (ppo_vs_trl.summarize), and per algorithm with both engines the
    speed-up, the ceiling (TRL's time / alignflow's FLOPs at the matmul peak) and the memory ratio."""
    rows = []
    for name, entry in raw.items():
        engines = {e: {**summarize(v["runs"], v["workload"], peak_flops), "workload": v["workload"].settings()}
                   for e, v in entry["engines"].items()}
        pairs = {}
        for engine, summary in engines.items():
            side, algorithm = ENGINES[engine]
            peer = next((e for e in engines if ENGINES[e] != (side, algorithm) and ENGINES[e][1] == algorithm), None)
            if side == "alignflow" and peer is not None:
                pair = {"trl": engines[peer], "alignflow": summary}
                pairs[algorithm] = {
                    "alignflow": engine, "trl": peer,
                    "speedup": summary["episodes_per_second"] / engines[peer]["episodes_per_second"],
                    "ceiling": speedup_ceiling(pair, peak_flops),
                    "memory_ratio": summary["peak_rss_mb"] / engines[peer]["peak_rss_mb"],
                }
        rows.append({"workload": name, "engines": engines, "pairs": pairs})
    return rows


# ---------------------------------------------------------------------------------------------- targets


def targets(report: dict) -> list[dict]:
    """The issue's targets, each measured where this run has what it needs, else "not measured" and why."""
    learning, throughput = report["learning"], report["throughput"]
    out = []

    def add(target: str, measured: str, met: bool | None) -> None:
        out.append({"target": target, "measured": measured, "met": met})

    # 1. fastest alignflow algorithm to 0.75 in at most half the time of the fastest TRL trainer
    if learning:
        def fastest(side_prefix: str) -> tuple[str, float] | None:
            times = []
            for engine, entry in learning["engines"].items():
                row = entry["time_to"]["0.75"]
                if engine.startswith(side_prefix) and row["reached"] == row["seeds"]:
                    times.append((engine, row["seconds"]["mean"]))
            return min(times, key=lambda t: t[1]) if times else None
        mine, theirs = fastest("alignflow:"), fastest("trl-")
        name = "alignflow's fastest algorithm reaches gold 0.75 in <= 1/2 the time of the fastest TRL trainer"
        if mine and theirs:
            add(name, f"{mine[0]} {mine[1]:.0f} s vs {theirs[0]} {theirs[1]:.0f} s (mean over seeds)", mine[1] <= theirs[1] / 2)
        elif mine:
            add(name, f"{mine[0]} {mine[1]:.0f} s; no TRL trainer reached 0.75 in every seed", True)
        else:
            add(name, "no alignflow algorithm reached 0.75 in every seed", False)
    # 2. alignflow RLOO and GRPO >= TRL 1.16's at equal episodes, within one standard error
    for algorithm in ("rloo", "grpo"):
        name = f"alignflow {algorithm} gold share >= TRL 1.16's at equal episodes (within one standard error)"
        mine, theirs = f"alignflow:{algorithm}", f"trl-1.16:{algorithm}"
        if not learning or mine not in learning["engines"] or theirs not in learning["engines"]:
            add(name, "not measured: " + (report["unavailable"].get(mine) or "not in this run"), None)
            continue
        a = {p["episodes"]: p for p in learning["engines"][mine]["curves"]["by_episodes"]}
        b = {p["episodes"]: p for p in learning["engines"][theirs]["curves"]["by_episodes"]}
        common = sorted(set(a) & set(b) - {0})
        short = [e for e in common if a[e]["gold"] < b[e]["gold"] - math.hypot(a[e]["gold_se"], b[e]["gold_se"])]
        add(name, "; ".join(f"{e} ep {a[e]['gold']:.3f} vs {b[e]['gold']:.3f}" for e in common), not short)
    # 3.-6. throughput
    if throughput:
        demo_rows = [row for row in throughput if row["workload"].startswith("demo")]
        larger = [row for row in throughput if row["workload"].startswith("gpt2")]
        for algorithm in ("rloo", "grpo"):
            name = f"alignflow {algorithm} >= 2x TRL 1.16's episodes/s on the demo workloads"
            pairs = [(row["workload"], row["pairs"][algorithm]) for row in demo_rows if algorithm in row["pairs"]]
            add(name, "; ".join(f"{w} {p['speedup']:.2f}x" for w, p in pairs) or "not measured",
                all(p["speedup"] >= 2 for _, p in pairs) if pairs else None)
            pairs = [(row["workload"], row["pairs"][algorithm]) for row in larger if algorithm in row["pairs"]]
            add(f"alignflow {algorithm} >= 80% of the ceiling on GPT-2 6x512",
                "; ".join(f"{w} {p['speedup']:.2f}x of {p['ceiling']:.2f}x" for w, p in pairs) or "not measured",
                all(p["speedup"] >= 0.8 * p["ceiling"] for _, p in pairs) if pairs else None)
        ratios = []
        for row in larger:
            trl_ppo = row["engines"].get("trl-1.12:ppo")
            for engine, summary in row["engines"].items():
                if trl_ppo and engine.startswith("alignflow:") and engine != "alignflow:ppo":
                    ratios.append((engine, summary["episodes_per_second"] / trl_ppo["episodes_per_second"]))
        add("alignflow critic-free >= 2x TRL 1.12.0 PPO's episodes/s on GPT-2 6x512",
            "; ".join(f"{e} {r:.2f}x" for e, r in ratios) or "not measured", all(r >= 2 for _, r in ratios) if ratios else None)
        memory = []
        for row in throughput:
            peers = [s["peak_rss_mb"] for e, s in row["engines"].items() if not e.startswith("alignflow:")]
            for engine, summary in row["engines"].items():
                if engine.startswith("alignflow:") and peers:
                    memory.append((row["workload"], engine, summary["peak_rss_mb"], min(peers)))
        add("peak memory of every alignflow algorithm <= every peer's on the same workload",
            "; ".join(f"{w} {e} {m:.0f} vs {p:.0f} MB" for w, e, m, p in memory) or "not measured",
            all(m <= p for _, _, m, p in memory) if memory else None)
    return out


# ---------------------------------------------------------------------------------------------- output


def _fmt_reach(row: dict, key: str, unit: str) -> str:
    if not row["reached"]:
        return "not reached"
    s = row[key]
    text = f"{s['mean']:.0f} ± {s['sd']:.0f} {unit} ({s['min']:.0f}-{s['max']:.0f})"
    return text if row["reached"] == row["seeds"] else f"{text}, {row['reached']}/{row['seeds']} seeds"


def tables(report: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    out = []
    learning = report["learning"]
    if learning:
        rows = []
        for engine, entry in learning["engines"].items():
            last = entry["curves"]["by_episodes"][-1]
            t75, t80 = entry["time_to"]["0.75"], entry["time_to"]["0.80"]
            rows.append([engine, str(len(entry["runs"])), _fmt_reach(t75, "seconds", "s"), _fmt_reach(t75, "episodes", "ep"),
                         _fmt_reach(t80, "seconds", "s"), _fmt_reach(t80, "episodes", "ep"),
                         f"{last['gold']:.3f} ± {last['gold_se']:.3f}", f"{last['score']:+.3f} ± {last['score_se']:.3f}",
                         f"{statistics.median(r['episodes_per_second'] for r in entry['runs']):.1f}"])
        out.append((f"Time to quality (demo; gold share of {learning['eval']['prompts']} held-out prompts x {learning['eval']['samples']} "
                    f"samples; saves every {learning['budget']} episodes; mean ± sd (min-max) over seeds)",
                    ["engine", "seeds", "seconds to 0.75", "episodes to 0.75", "seconds to 0.80", "episodes to 0.80",
                     f"gold at {learning['max_episodes']} ep (± se)", "score (± se)", "episodes/s in training"], rows))
        budgets = sorted({p["episodes"] for e in learning["engines"].values() for p in e["curves"]["by_episodes"]})
        rows = [[engine] + [next((f"{p['gold']:.3f} ({p['train_seconds']:.0f} s)" for p in entry["curves"]["by_episodes"]
                                  if p["episodes"] == b), "") for b in budgets] for engine, entry in learning["engines"].items()]
        out.append(("Gold share after each budget of episodes (mean training seconds there)", ["engine"] + [f"{b} ep" for b in budgets], rows))
    if report["throughput"]:
        rows = []
        for row in report["throughput"]:
            for engine, s in row["engines"].items():
                share, pair = s["phase_share"], row["pairs"].get(ENGINES[engine][1]) if engine.startswith("alignflow:") else None
                rows.append([row["workload"], engine, str(s["workload"]["samples_per_prompt"]), f"{s['episodes_per_second']:.1f}",
                             f"{pair['speedup']:.2f}x" if pair else "", f"{pair['ceiling']:.2f}x" if pair else "",
                             f"{share['generation']:.0%}", f"{share['reference'] + share['value']:.0%}", f"{share['scoring']:.0%}",
                             f"{share['update']:.0%}", f"{share['other']:.0%}", f"{s['peak_rss_mb']:.0f}", f"{s['gflop_per_iteration']:.0f}"])
        out.append(("Throughput (median episodes/s after warm-up; speed-up and ceiling against TRL's same algorithm; "
                    "peak RSS each worker's own VmHWM)",
                    ["workload", "engine", "k", "episodes/s", "speed-up", "ceiling", "generation", "ref+value", "scoring",
                     "update", "other", "peak RSS MB", "GFLOP/iter"], rows))
    if report["unavailable"]:
        out.append(("Not available in this alignflow engine (skipped, not measured)", ["engine", "why"],
                    [[e, r] for e, r in report["unavailable"].items()]))
    out.append(("Targets (issue 16)", ["target", "measured", "met"],
                [[t["target"], t["measured"], {True: "yes", False: "NO", None: "not measured"}[t["met"]]] for t in report["targets"]]))
    return out


def plot(report: dict, path: Path) -> None:
    """Gold share against training wall-clock seconds (left) and episodes (right), one line per engine and
    algorithm: the mean over seeds at each save, ± one standard error."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    learning = report["learning"]
    fig, (by_time, by_episodes) = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    for engine, entry in learning["engines"].items():
        points = entry["curves"]["by_episodes"]
        style = "-" if engine.startswith("alignflow:") else "--"
        gold, se = [p["gold"] for p in points], [p["gold_se"] for p in points]
        by_time.errorbar([p["train_seconds"] for p in points], gold, yerr=se, fmt=style + "o", ms=3, capsize=2, label=engine)
        by_episodes.errorbar([p["episodes"] for p in points], gold, yerr=se, fmt=style + "o", ms=3, capsize=2, label=engine)
    for axis in (by_time, by_episodes):
        for target in TARGETS:
            axis.axhline(target, color="grey", lw=0.8, ls=":")
        axis.grid(alpha=0.3)
    by_time.set_xlabel("training wall-clock seconds (mean over seeds at each save)")
    by_episodes.set_xlabel("episodes (completions)")
    by_time.set_ylabel(f"gold share, {learning['eval']['prompts']} held-out prompts x {learning['eval']['samples']}")
    by_episodes.legend(fontsize=8, loc="best")
    fig.suptitle(f"Time to quality on the demo task ({learning['seeds']} seed(s); dashed: TRL)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(report: dict) -> str:
    parts = [f"`{report['command']}` ({report['run_seconds'] / 60:.0f} min) on {report['machine']['cpu']}, "
             f"{report['machine']['cores']} cores, {report['matmul']['threads']} thread(s) per process; {report['date'][:10]}; "
             f"alignflow engine: {report['alignflow_engine']}; peers: {report['peers']['trl-1.12']}; {report['peers']['trl-1.16']}."]
    for title, header, rows in tables(report):
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
        parts.append(f"{title}:\n\n" + "\n".join(lines))
    return "\n\n".join(parts) + "\n"


def write_outputs(report: dict, folder: Path, stem: str) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 170))
    for title, header, rows in tables(report):
        table = Table(title=title)
        for column in header:
            table.add_column(column)
        for row in rows:
            table.add_row(*row)
        console.print(table)
    if report["learning"]:
        plot(report, folder / f"{stem}.png")
    (folder / f"README-snippet-{stem.replace('_', '-')}.md").write_text(markdown(report))


if __name__ == "__main__":
    sys.exit(main())
