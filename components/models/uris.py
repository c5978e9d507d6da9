"""`models:/NAME@ALIAS` and `models:/NAME/VERSION`: a registered version as a directory `from_pretrained` loads.

The transformers flavour stores weights in `model/` and the tokenizer in `components/tokenizer/`; a download is
assembled into one folder, cached per registry and version under `artifacts/registry/`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from components.config import PROJECT_ROOT, parse_registry_uri
from components.errors import UserError

DEFAULT_CACHE = PROJECT_ROOT / "artifacts" / "registry"


class ModelURIError(UserError):
    """A `models:/...` URI that cannot be turned into a loadable directory."""


def _find(ref: str) -> ModelVersion:
    parsed = parse_registry_uri(ref)
    if parsed is None:
        raise ModelURIError(f"{ref!r} is not a registry URI; use models:/NAME@ALIAS or models:/NAME/VERSION")
    name, alias, version = parsed
    client = MlflowClient()
    try:
        return client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except MlflowException as exc:
        raise ModelURIError(f"cannot resolve {ref} in the registry at {mlflow.get_registry_uri()}: {exc.message}") from None


def pin_model_uri(ref: str) -> str:
    """`models:/NAME@ALIAS` as `models:/NAME/VERSION`, the version the alias points at now; any other model URI
    (hub id, local path) unchanged. What resolves it later (the other machines of a multi-machine launch) then loads the same
    weights as this process even if the alias moves in between."""
    parsed = parse_registry_uri(ref) if ref.startswith("models:") else None
    if parsed is None or parsed[1] is None:
        return ref
    return f"models:/{parsed[0]}/{_find(ref).version}"


def resolve_model_uri(ref: str, cache_dir: Path | None = None) -> str:
    """A directory `from_pretrained` loads (model and tokenizer) for `models:/NAME@ALIAS` or `models:/NAME/VERSION`;
    any other model URI (hub id, local path) is returned unchanged.

    The transformers flavour stores weights in `model/` and the tokenizer in `components/tokenizer/`; the download
    is assembled into one folder, cached per registry and version under `cache_dir` (default `artifacts/registry/`)."""
    if not ref.startswith("models:"):
        return ref
    found = _find(ref)
    name, version = found.name, str(found.version)
    # Version numbers repeat across registries: the cache key also names the store and the logged model.
    origin = hashlib.sha256(f"{mlflow.get_registry_uri()}|{found.source}|{found.run_id}".encode()).hexdigest()[:12]
    target = Path(cache_dir or DEFAULT_CACHE) / f"{name}-v{version}-{origin}"
    if (target / "config.json").is_file() or (target / "adapter_config.json").is_file():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as scratch:
        downloaded = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{version}", dst_path=scratch))
        assembled = _assemble_policy_dir(downloaded, ref)
        if target.exists():  # a half-written folder from an interrupted download
            shutil.rmtree(target)
        assembled.rename(target)
    return str(target)


def adapter_base(path: str | Path) -> str | None:
    """The base model of a saved LoRA adapter (a folder with adapter_config.json and no config.json), else None."""
    path = Path(path)
    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        return json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"]
    return None


def _assemble_policy_dir(downloaded: Path, ref: str) -> Path:
    """The folder `load_policy` reads: a saved model, or a LoRA adapter whose config names its base."""
    import yaml


    mlmodel = downloaded / "MLmodel"
    flavors = (yaml.safe_load(mlmodel.read_text()) or {}).get("flavors", {}) if mlmodel.is_file() else {}
    flavor = flavors.get("transformers")
    if flavor is None and (downloaded / "artifacts" / "policy").is_dir():  # a Seq2SeqGenerator pyfunc
        return downloaded / "artifacts" / "policy"
    if flavor is None:
        raise ModelURIError(f"{ref} is not a model logged by alignflow (no transformers flavour or policy artifact)")
    if flavor.get("peft_adaptor"):
        model_dir = downloaded / flavor["peft_adaptor"]
        config_path = model_dir / "adapter_config.json"
        adapter_config = json.loads(config_path.read_text())
        adapter_config["base_model_name_or_path"] = flavor.get("local_base_model_path") or flavor.get("source_model_name")
        config_path.write_text(json.dumps(adapter_config, indent=2))
    else:
        model_dir = downloaded / flavor.get("model_binary", "model")
    if not (model_dir / "config.json").is_file() and adapter_base(model_dir) is None:
        raise ModelURIError(
            f"{ref} holds no model weights (logged with save_pretrained=False?); "
            f"its source model is {flavor.get('source_model_name')!r}"
        )
    for component in flavor.get("components", []):
        for item in (downloaded / "components" / component).glob("*"):
            if item.is_file() and not (model_dir / item.name).exists():
                shutil.copy2(item, model_dir / item.name)
    return model_dir
