"""Publishing adapters to a Hub and pulling them back, against a real HTTP server.

The server (tests/hub_server.py) speaks the Hub's plain-HTTP API on 127.0.0.1; the
client side is unmodified huggingface_hub code in child processes pointed at it
through HF_ENDPOINT, exactly as a user's would be.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from hub_server import HubServer
from xbt import InputError, load_backbone
from xbt.cli import main as cli
from xbt.demo.scenes import write_split
from xbt.hub import adapter_files
from xbt.model import XBTModel
from xbt.model_card import render_model_card
from xbt.projection import Projection, ProjectionConfig

TEXTS = ["a red circle", "two blue squares", "a small green triangle"]

# Child process: load an adapter by repo id (optionally at a revision), save its text embeddings.
PULL = """
import sys
from safetensors.torch import save_file
from xbt import XBTModel
repo, revision, out = sys.argv[1], sys.argv[2] or None, sys.argv[3]
model = XBTModel.from_pretrained(repo, revision=revision)
save_file({"text": model.encode_text(%r)}, out)
""" % TEXTS


def _adapter(tiny_refs, seed: int) -> XBTModel:
    backbone, old = load_backbone(tiny_refs["hf"]), load_backbone(tiny_refs["open_clip"])
    torch.manual_seed(seed)
    projection = Projection.build(backbone.embed_dim, old.embed_dim, ProjectionConfig(kind="linear"),
                                  source_space=backbone.fingerprint, target_space=old.fingerprint)
    model = XBTModel(backbone, projection, old_reference=tiny_refs["open_clip"], old_model_id=old.model_id)
    with torch.no_grad():  # LoRA B starts at zero: give each adapter an effect of its own
        for parameter in model.lora_parameters():
            parameter.normal_(std=0.1)
    return model.eval()


@pytest.fixture(scope="module")
def adapters(tiny_refs, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    models = {name: _adapter(tiny_refs, seed) for name, seed in (("v1", 1), ("v2", 2))}
    for name, model in models.items():
        model.save_pretrained(root / name)
    return root, models


def _env(tmp_path, endpoint: str, offline: bool = False) -> dict[str, str]:
    return dict(os.environ, HF_ENDPOINT=endpoint, HF_HUB_OFFLINE="1" if offline else "0", HF_TOKEN="test-token",
                HF_HOME=str(tmp_path / "hf_home"), PYTHONPATH=os.pathsep.join(sys.path))


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_push_then_pull_by_repo_id_revision_and_offline(adapters, tiny_refs, tmp_path):
    root, models = adapters
    eval_dir = tmp_path / "eval"
    data = write_split(tmp_path / "evalset", "shapes", 12, seed=5, split="test")
    assert cli(["eval", "--old_model", tiny_refs["open_clip"], "--new_model", tiny_refs["hf"],
                "--adapter", str(root / "v1"),
                "--eval_set", str(data), "--output_dir", str(eval_dir)]) == 0

    with HubServer() as hub:
        env = _env(tmp_path, hub.endpoint)
        first = _run(["-m", "xbt", "push", "--adapter_dir", str(root / "v1"), "--repo_id", "team/clip-upgrade",
                      "--eval_dir", str(eval_dir)], env)
        assert first.returncode == 0, first.stderr
        commit_v1 = first.stdout.strip().split("@")[1]
        second = _run(["-m", "xbt", "push", "--adapter_dir", str(root / "v2"), "--repo_id", "team/clip-upgrade",
                       "--commit_message", "v2"], env)
        assert second.returncode == 0, second.stderr

        repo = hub.state.repos["team/clip-upgrade"]
        published = repo["commits"][commit_v1]
        assert {"README.md", "xbt_config.json", "projection/config.json", "projection/model.safetensors",
                "adapter_config.json", "adapter_model.safetensors", "eval/metrics.json",
                "eval/matrix.png"} <= set(published)
        assert not [name for name in published if name.endswith((".bin", ".pt", ".pth", ".pkl"))]
        card = published["README.md"].decode()
        meta = yaml.safe_load(card.split("---")[1])
        assert meta["library_name"] == "xbt" and meta["model-index"][0]["name"] == "team/clip-upgrade"
        metric_names = [m["name"] for r in meta["model-index"][0]["results"] for m in r["metrics"]]
        assert "R@1 xbt→old" in metric_names
        assert models["v1"].backbone.fingerprint in card

        for revision, name in (("", "v2"), (commit_v1, "v1")):
            out = tmp_path / f"pulled-{name}.safetensors"
            pulled = _run(["-c", PULL, "team/clip-upgrade", revision, str(out)], env)
            assert pulled.returncode == 0, pulled.stderr
            assert torch.equal(load_file(out)["text"], models[name].encode_text(TEXTS))

    # The server is gone: a filled cache still serves the repo with HF_HUB_OFFLINE=1 ...
    out = tmp_path / "offline.safetensors"
    offline = _run(["-c", PULL, "team/clip-upgrade", "", str(out)], _env(tmp_path, hub.endpoint, offline=True))
    assert offline.returncode == 0, offline.stderr
    assert torch.equal(load_file(out)["text"], models["v2"].encode_text(TEXTS))
    # ... and a repo never fetched fails with a message that says what to do.
    missing = _run(["-c", PULL, "team/never-pushed", "", str(out)], _env(tmp_path, hub.endpoint, offline=True))
    assert missing.returncode != 0 and "Could not fetch the adapter repo 'team/never-pushed'" in missing.stderr


def test_model_card_without_evaluation(adapters):
    root, models = adapters
    card = render_model_card(root / "v2", repo_id="team/x")
    meta = yaml.safe_load(card.split("---")[1])
    assert "model-index" not in meta and meta["tags"][0] == "xbt"
    assert "Not evaluated yet" in card and 'XBTModel.from_pretrained("team/x")' in card
    config = json.loads((root / "v2" / "xbt_config.json").read_text())
    assert config["old_model"]["fingerprint"] in card and "lora_rank" in card


def test_only_adapter_directories_without_pickles_are_published(adapters, tmp_path):
    root, _ = adapters
    names = {p.relative_to(root / "v2").as_posix() for p in adapter_files(root / "v2")}
    assert {"xbt_config.json", "projection/config.json", "projection/model.safetensors",
            "adapter_model.safetensors"} <= names
    with pytest.raises(InputError, match="not an xbt adapter directory"):
        adapter_files(tmp_path)
    with pytest.raises(InputError, match="does not exist"):
        adapter_files(tmp_path / "nowhere")
    (root / "v2" / "optimizer.pt").write_bytes(b"pickle")
    try:
        with pytest.raises(InputError, match="pickle files"):
            adapter_files(root / "v2")
    finally:
        (root / "v2" / "optimizer.pt").unlink()


def test_push_to_an_unreachable_hub_says_so(adapters, tmp_path):
    root, _ = adapters
    env = _env(tmp_path, "http://127.0.0.1:9")  # discard port: nothing listens
    result = _run(["-m", "xbt", "push", "--adapter_dir", str(root / "v2"), "--repo_id", "team/x"], env)
    assert result.returncode == 2 and "Pushing" in result.stderr and "HF_ENDPOINT" in result.stderr
    bad = _run(["-m", "xbt", "push", "--adapter_dir", str(root / "v2"), "--repo_id", "team//x"], env)
    assert bad.returncode == 2 and "repo_id must be a Hub repo id" in bad.stderr and "Traceback" not in bad.stderr


# Child process: publish a projection whose weights exist only as a pickle, then try to load it.
PICKLED_PROJECTION = """
import sys
from huggingface_hub import CommitOperationAdd, HfApi
from xbt.projection import Projection
folder = sys.argv[1]
api = HfApi()
api.create_repo("team/psi", exist_ok=True)
api.create_commit("team/psi", [CommitOperationAdd(name, f"{folder}/{name}") for name in ("config.json",
                  "pytorch_model.bin")], commit_message="pickle")
Projection.from_pretrained("team/psi")
"""


def test_a_pickled_projection_on_the_hub_is_refused(tmp_path):
    folder = tmp_path / "psi"
    Projection(6, 4, kind="linear").save_pretrained(folder)
    torch.save(Projection.from_pretrained(folder).state_dict(), folder / "pytorch_model.bin")
    with HubServer() as hub:
        result = _run(["-c", PICKLED_PROJECTION, str(folder)], _env(tmp_path, hub.endpoint))
    assert result.returncode != 0 and "loads projections from model.safetensors only" in result.stderr
