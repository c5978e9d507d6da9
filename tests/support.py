"""Helpers the tests share: tiny models built from configs, reward functions, the registry and the engine as the
pipeline uses them, and real processes (the CLI in a forked child that can be SIGKILLed, the installed command)."""

from __future__ import annotations

import gzip
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel, PreTrainedTokenizerFast

from components.tracking import registry, runs as tracking
from components.demo.bootstrap import gpt2_config as demo_gpt2_config
from components.config import TrackingConfig
from components.data.dialogue import DialogueError, prompt_of_pair


# --- tiny models, built from configs and saved locally, so tests never touch a hub ------------------------------

WORDS = (
    "the a film movie was is and but very quite good great bad awful fine boring "
    "fun plot acting story music ending loved hated it this I we . ,"
).split()
SPECIAL = ["<pad>", "<bos>", "<eos>", "<unk>"]


def word_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIAL + WORDS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        padding_side="left",
    )


def gpt2_config(tokenizer: PreTrainedTokenizerFast, **overrides) -> GPT2Config:
    """A tiny GPT-2 (2 layers of width 32) for `tokenizer`, as the demo's models are built."""
    return demo_gpt2_config(tokenizer, **overrides)


def save_tiny_lm(path: Path, seed: int = 0, **overrides) -> Path:
    torch.manual_seed(seed)
    tokenizer = word_tokenizer()
    model = GPT2LMHeadModel(gpt2_config(tokenizer, **overrides))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return Path(path)


def save_tiny_lm_with_dropout(path: Path, seed: int = 0) -> Path:
    """A tiny GPT-2 language model with GPT-2's own dropout (0.1 on embeddings, attention and residuals), as a hub
    model has it: the reward stage trains its body with a new one-output head."""
    torch.manual_seed(seed)
    tokenizer = word_tokenizer()
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    assert (config.resid_pdrop, config.embd_pdrop, config.attn_pdrop) == (0.1, 0.1, 0.1)
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return Path(path)


def save_tiny_reward_model(path: Path, seed: int = 1, num_labels: int = 1, **overrides) -> Path:
    torch.manual_seed(seed)
    tokenizer = word_tokenizer()
    config = gpt2_config(tokenizer, num_labels=num_labels, **overrides)
    if num_labels == 2:
        config.id2label = {0: "hate", 1: "nothate"}
        config.label2id = {"hate": 0, "nothate": 1}
    model = GPT2ForSequenceClassification(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return Path(path)


# --- tiny models of each supported family (policies share the word-level tokenizer; reward models get a different one, as a user's would) ---

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=128)
CHAT_TEMPLATE = "{% for m in messages %}<bos> {{ m['content'] }} <eos>{% endfor %}{% if add_generation_prompt %} I{% endif %}"


def _policy_config(family: str, tokenizer):
    from transformers import (
        BartConfig, GPT2Config, GPTNeoXConfig, LlamaConfig, MistralConfig, OPTConfig, Qwen2Config, T5Config,
    )

    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    if family == "gpt2":
        return GPT2Config(n_positions=128, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids)
    if family == "llama":
        return LlamaConfig(**SMALL, num_key_value_heads=1, **ids)
    if family == "qwen2":
        return Qwen2Config(**SMALL, num_key_value_heads=1, **ids)
    if family == "mistral":
        return MistralConfig(**SMALL, num_key_value_heads=1, sliding_window=None, **ids)
    if family == "gpt_neox":
        return GPTNeoXConfig(**SMALL, rotary_pct=0.25, hidden_dropout=0.0, attention_dropout=0.0, **ids)
    if family == "opt":
        return OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=2, word_embed_proj_dim=32,
                         max_position_embeddings=128, dropout=0.0, attention_dropout=0.0, **ids)
    if family == "t5":  # FLAN-T5-shaped: gated-gelu, untied head, decoder starts from pad
        return T5Config(d_model=32, d_ff=64, d_kv=16, num_layers=2, num_decoder_layers=2, num_heads=2,
                        feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0,
                        decoder_start_token_id=tokenizer.pad_token_id, is_encoder_decoder=True, **ids)
    if family == "bart":
        return BartConfig(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
                          encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128, dropout=0.0,
                          attention_dropout=0.0, activation_dropout=0.0, decoder_start_token_id=tokenizer.eos_token_id,
                          forced_bos_token_id=None, forced_eos_token_id=None, is_encoder_decoder=True, **ids)
    raise ValueError(family)


POLICY_FAMILIES = ("gpt2", "llama", "qwen2", "gpt_neox", "opt", "mistral", "t5", "bart")
SEQ2SEQ_FAMILIES = ("t5", "bart")


def policy_tokenizer(family: str, chat: bool = False) -> PreTrainedTokenizerFast:
    tokenizer = word_tokenizer()
    if family in SEQ2SEQ_FAMILIES:  # encoder inputs end with EOS, as T5's and BART's tokenizers do
        tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single="$A <eos>", special_tokens=[("<eos>", tokenizer.eos_token_id)]
        )
        tokenizer.padding_side = "right"
    if chat:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def save_tiny_policy(path: Path, family: str, seed: int = 0, chat: bool = False) -> Path:
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    torch.manual_seed(seed)
    tokenizer = policy_tokenizer(family, chat)
    config = _policy_config(family, tokenizer)
    auto = AutoModelForSeq2SeqLM if family in SEQ2SEQ_FAMILIES else AutoModelForCausalLM
    model = auto.from_config(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return Path(path)


# --- reward models ---------------------------------------------------------------------------

REWARD_FAMILIES = ("bert", "roberta", "deberta_v2", "distilbert", "llama", "qwen2")


def reward_tokenizer(family: str) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with other ids than the policy's; encoders get [CLS] ... [SEP]."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {tok: i for i, tok in enumerate(specials + list(reversed(WORDS)) + SPECIAL)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    decoder_family = family in ("llama", "qwen2")
    if not decoder_family:
        core.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
        )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", model_max_length=24)
    if decoder_family:
        tokenizer.eos_token = "[SEP]"  # no pad token: the loader must fall back to EOS
    else:
        tokenizer.add_special_tokens({"pad_token": "[PAD]", "cls_token": "[CLS]", "sep_token": "[SEP]", "mask_token": "[MASK]"})
    return tokenizer


def _reward_config(family: str, tokenizer, num_labels: int):
    from transformers import BertConfig, DebertaV2Config, DistilBertConfig, LlamaConfig, Qwen2Config, RobertaConfig

    labels = {}
    if num_labels == 2:
        labels = dict(id2label={0: "hate", 1: "nothate"}, label2id={"hate": 0, "nothate": 1})
    common = dict(vocab_size=len(tokenizer), num_labels=num_labels, **labels)
    encoder = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                   pad_token_id=tokenizer.pad_token_id, **common)
    if family == "bert":
        return BertConfig(max_position_embeddings=64, **encoder)
    if family == "roberta":  # positions start after the padding index
        return RobertaConfig(max_position_embeddings=64 + tokenizer.pad_token_id + 1, **encoder)
    if family == "deberta_v2":
        return DebertaV2Config(max_position_embeddings=64, relative_attention=True, position_buckets=16,
                               pos_att_type=["p2c", "c2p"], **encoder)
    if family == "distilbert":
        return DistilBertConfig(dim=32, hidden_dim=64, n_layers=2, n_heads=2, max_position_embeddings=64,
                                pad_token_id=tokenizer.pad_token_id, **common)
    decoder = dict(**SMALL, num_key_value_heads=1, eos_token_id=tokenizer.eos_token_id, pad_token_id=None, **common)
    return (LlamaConfig if family == "llama" else Qwen2Config)(**decoder)


def save_tiny_reward(path: Path, family: str, num_labels: int = 1, seed: int = 1) -> Path:
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    tokenizer = reward_tokenizer(family)
    model = AutoModelForSequenceClassification.from_config(_reward_config(family, tokenizer, num_labels))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return Path(path)


# --- preference pairs in each file form ---------------------------------------------------------------------

HH_RLHF = Path(__file__).parent / "fixtures" / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"
SHORT_ANSWERS = {2: ("NA", "None"), 5: ("0", "null"), 9: ("nan", "007")}  # by row: texts CSV readers take for missing or numbers


def hh_rlhf_pair_rows() -> list[dict]:
    """The hh-rlhf fixture's good pairs as prompt / chosen / rejected / margin rows, as a user exports them: margins
    whole numbers and fractions, and in three rows short answers a CSV reader's defaults take for missing or numbers."""
    rows = []
    for number, line in enumerate(gzip.open(HH_RLHF, "rt")):
        row = json.loads(line)
        try:
            prompt, chosen, rejected = prompt_of_pair(row["chosen"], row["rejected"])
        except DialogueError:
            continue
        if chosen.strip() and rejected.strip() and chosen != rejected:
            chosen, rejected = SHORT_ANSWERS.get(number, (chosen, rejected))
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "margin": [1, 0.5, 2, 1.5][number % 4]})
    return rows


def write_in_each_form(rows: list[dict], directory: Path) -> dict[str, Path]:
    """The same rows, in the same order, as a JSONL, a CSV and a Parquet file, and a directory of two JSONL shards."""
    jsonl = lambda part: "".join(json.dumps(row) + "\n" for row in part)  # noqa: E731
    (directory / "pairs.jsonl").write_text(jsonl(rows))
    pd.DataFrame(rows).to_csv(directory / "pairs.csv", index=False)
    pd.DataFrame(rows).to_parquet(directory / "pairs.parquet")
    (directory / "pairs").mkdir()
    half = len(rows) // 2
    (directory / "pairs" / "train-00000-of-00002.jsonl").write_text(jsonl(rows[:half]))
    (directory / "pairs" / "train-00001-of-00002.jsonl").write_text(jsonl(rows[half:]))
    return {"jsonl": directory / "pairs.jsonl", "csv": directory / "pairs.csv", "parquet": directory / "pairs.parquet",
            "directory": directory / "pairs"}


# --- the PPO tests: one thread, a word-share reward -----------------------------------------------

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models are op-overhead bound; with 2 intra-op threads on a busy 2-core box each op can be ~50x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def word_share(word: str):
    """A reward function: the share of `word` among the completion's words (0 for an empty completion)."""

    def reward_fn(prompts: list[str], completions: list[str]) -> torch.Tensor:
        shares = []
        for completion in completions:
            words = completion.split()
            shares.append(sum(w == word for w in words) / len(words) if words else 0.0)
        return torch.tensor(shares)

    return reward_fn


# --- the registry and the engine, as the pipeline uses them ---------------------------------------

def register_versions(config: TrackingConfig, model: str, policy_dir: Path, scores: list[float]) -> list[str]:
    """One run per score, each logging `policy_dir` and registering it as a version of `model` that passed its gates
    with that evaluation score, as the pipeline registers; returns the versions."""
    tracking.use_tracking(config)
    versions = []
    for score in scores:
        with mlflow.start_run(experiment_id=tracking.ensure_experiment(config)) as run:
            uri = registry.log_policy(policy_dir)
            mlflow.log_metric(registry.GATES_METRIC, 1.0)  # as the pipeline's gates task records it
            version = registry.register(model, run.info.run_id, uri, {registry.GATES_TAG: True, registry.SCORE_TAG: score})
        versions.append(str(version.version))
    return versions


def build_trainer_with(config, policy, tokenizer, reward_fn):
    """`components.rl.build_trainer` with the sections of a run configuration, as the flow builds it."""
    from components.rl import build_trainer

    return build_trainer(policy, tokenizer, reward_fn, **config.trainer_sections())


# --- real processes: the CLI in a child forked from a server that imported alignflow once, and the installed command ---

_CONTEXT = multiprocessing.get_context("forkserver")
_CONTEXT.set_forkserver_preload(["torch", "transformers", "mlflow", "prefect", "flows.cli", "flows.pipeline", "support"])


def _main(argv: list[str], env: dict[str, str], prefect_api_url: str | None) -> None:
    os.environ.update(env)
    import torch
    from prefect.settings import PREFECT_API_URL, temporary_settings

    torch.set_num_threads(1)  # tiny models are op-overhead bound, and several children may run at once
    from flows.cli import main

    with temporary_settings(updates={PREFECT_API_URL: prefect_api_url}):
        main(argv)


def cli_in_child(argv: list[str], env: dict[str, str] | None = None, timeout: float = 600) -> int:
    """The exit code of `alignflow ARGV` run in a child process against this session's Prefect API (-9: SIGKILL)."""
    from prefect.settings import PREFECT_API_URL

    process = _CONTEXT.Process(target=_main, args=(list(argv), dict(env or {}), PREFECT_API_URL.value()))
    process.start()
    process.join(timeout)
    if process.exitcode is None:
        process.kill()
        process.join()
        raise TimeoutError(f"alignflow {' '.join(argv)} did not end within {timeout} s")
    return process.exitcode


def alignflow_executable() -> str:
    return shutil.which("alignflow") or str(Path(sys.executable).parent / "alignflow")


def alignflow(argv: list[str], env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """The installed `alignflow` command, run to its end; its output captured."""
    return subprocess.run([alignflow_executable(), *argv], env={**os.environ, **(env or {})}, capture_output=True,
                          text=True, timeout=timeout)


# --- crash-point chains: the one run of a store, and what it left ---

@pytest.fixture(autouse=True)
def no_tracking_uri_left():
    """(Autouse where imported.) MLflow pointed back at its default after each test: `the_run` points it at a store."""
    yield
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)


TIMING = ("time/", "perf/")  # metrics whose values are wall-clock: their steps are compared, not their values


def the_run(store: Path, experiment: str):
    """The one run of `experiment` in the SQLite store under `store`, with a client of it; MLflow's own calls (the
    registry's, logged models) are pointed at that store too."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{store}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = MlflowClient(uri, registry_uri=uri)
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id]) if found else []
    assert len(runs) <= 1, "a resume started a second run"
    return client, (runs[0] if runs else None)


def end_state(store: Path, experiment: str, model: str, run_tags: tuple[str, ...]) -> dict:
    """What a run left in its store, in terms that do not depend on when it ran: its status and `run_tags`, every
    metric's history, the registered versions (this run's tags), the champion, its logged models, its artifacts,
    and what is left in the checkpoint directory."""
    client, run = the_run(store, experiment)
    run_id = run.info.run_id
    metrics = {}
    for key in sorted(run.data.metrics):
        history = client.get_metric_history(run_id, key)
        metrics[key] = [m.step for m in history] if key.startswith(TIMING) else [(m.step, round(m.value, 5)) for m in history]
    versions = client.search_model_versions(f"name='{model}'")
    mine = [v for v in versions if v.run_id == run_id]
    volatile = {"promoted_at", "alignflow.prefect_flow_run_id", "mlflow_run_id"}
    logged = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list")
    return {
        "status": run.info.status,
        "tags": {key: run.data.tags.get(key) for key in run_tags},
        "record": {"params": sorted(run.data.params), "tags": sorted(k for k in run.data.tags if k.startswith("alignflow.")),
                   "stage": run.data.tags.get(tracking.STAGE_TAG), "recorded": run.data.tags.get(tracking.RECORDED_TAG)},
        "metrics": metrics,
        "versions": sorted(int(v.version) for v in versions),
        "versions_of_the_run": len(mine),
        "version_tags": {k: v for k, v in mine[0].tags.items() if k not in volatile} if mine else {},
        "champion": str(client.get_model_version_by_alias(model, "champion").version),
        "logged_models": len([m for m in logged if m.source_run_id == run_id]),
        "artifacts": sorted(a.path for a in client.list_artifacts(run_id))
        + sorted(a.path for a in client.list_artifacts(run_id, "evaluations")),
        "leftovers": sorted(p.name for p in (store / "checkpoints").iterdir()) if (store / "checkpoints").exists() else [],
    }


def left_in_its_record(point: str, run, stage: str) -> None:
    """The state a kill at one of the record's points leaves (tracking.record_run): the run exists with its stage tag
    and nothing else (tracking.created), or with its params and config.yaml but not its provenance tags
    (tracking.config_logged). Other points leave the record whole."""
    tags, params = run.data.tags, run.data.params
    assert tags.get(tracking.STAGE_TAG) == stage
    if point == "tracking.created":
        assert not params and tracking.RECORDED_TAG not in tags and "alignflow.git_commit" not in tags
    elif point == "tracking.config_logged":
        assert params and tracking.RECORDED_TAG not in tags and "alignflow.git_commit" not in tags
    else:
        assert params and tags.get(tracking.RECORDED_TAG) == "true" and "alignflow.git_commit" in tags
