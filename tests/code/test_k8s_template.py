"""The Kubernetes work-pool template (infra/k8s) is one Prefect can fill in: every placeholder is a variable."""

import json
import re

from components.config import PROJECT_ROOT


def test_every_placeholder_of_the_gpu_job_template_is_a_declared_variable_and_the_checkpoint_volume_is_mounted():
    template = json.loads((PROJECT_ROOT / "infra" / "k8s" / "gpu-work-pool.json").read_text())
    used = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", json.dumps(template["job_configuration"])))
    assert used <= set(template["variables"]["properties"]), used - set(template["variables"]["properties"])
    pod = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert claims == {"checkpoints": "{{ checkpoint_claim }}"} and mounts["checkpoints"] == "{{ checkpoint_mount_path }}"
