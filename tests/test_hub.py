"""Publishing adapters to a Hub and pulling them back, against a real HTTP server.

The server (tests/hub_server.py) speaks the Hub's plain-HTTP API on 127.0.0.1, LFS
included; the client side is unmodified huggingface_hub code in child processes pointed
at it through HF_ENDPOINT, exactly as a user's would be. The base models are published
on it too (``org/new-model``, ``org/old-model``: the tiny models' own folders), so a
pushed adapter names only references any machine can load.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file

from hub_server import Blob, HubServer
from xbt import InputError, load_backbone
from xbt.cli import main as cli
from xbt.demo.scenes import write_split
from xbt.hub import adapter_files, choose_card, hub_reference
from xbt.model import XBTModel
from xbt.model_card import CARD_ROLES, is_generated, render_model_card
from xbt.projection import Projection, ProjectionConfig
from xbt.references import parse_reference

TEXTS = ["a red circle", "two blue squares", "a small green triangle"]
NEW_PUBLIC, OLD_PUBLIC = "hf:org/new-model", "open_clip:hf-hub:org/old-model"
PUBLIC_REFS = ["--public_ref", f"new={NEW_PUBLIC}", f"old={OLD_PUBLIC}"]

# Child process: load an adapter by repo id (optionally at a revision), save its vectors.
PULL = """
import sys
from safetensors.torch import save_file
from xbt import XBTModel
repo, revision, out, images = sys.argv[1], sys.argv[2] or None, sys.argv[3], sys.argv[4:]
model = XBTModel.from_pretrained(repo, revision=revision)
vectors = {"text": model.encode_text(%r), "blended": model.encode_text(%r, blend_old=0.5)}
if images:
    vectors["image"] = model.encode_image(images)
save_file(vectors, out)
""" % (TEXTS, TEXTS)


# Child process, offline: load a fetched revision and save its text vectors; print why a never-fetched repo fails.
OFFLINE = """
import sys
from safetensors.torch import save_file
from xbt import ModelLoadError, XBTModel
save_file({"text": XBTModel.from_pretrained(sys.argv[1], revision=sys.argv[2]).encode_text(%r)}, sys.argv[3])
try:
    XBTModel.from_pretrained("team/never-pushed")
except ModelLoadError as error:
    print(error)
""" % TEXTS

# Child process: run `xbt` command lines one after the other; print each exit status.
XBT = """
import json, sys
from xbt.cli import main
for argv in json.loads(sys.argv[1]):
    print(main(argv), flush=True)
"""


def _adapter(new_reference: str, old_reference: str, seed: int) -> XBTModel:
    backbone, old = load_backbone(new_reference), load_backbone(old_reference)
    torch.manual_seed(seed)
    projection = Projection.build(backbone.embed_dim, old.embed_dim, ProjectionConfig(kind="linear"),
                                  source_space=backbone.fingerprint, target_space=old.fingerprint)
    model = XBTModel(backbone, projection, old_reference=old_reference, old_model_id=old.model_id,
                     training={"models": [new_reference, old_reference]})  # a summary may name them too
    with torch.no_grad():  # LoRA B starts at zero: give each adapter an effect of its own
        for parameter in model.lora_parameters():
            parameter.normal_(std=0.1)
    return model.eval()


@pytest.fixture(scope="module")
def adapters(tiny_refs, tmp_path_factory):
    """Two adapters trained (as a user would) on the tiny models' local folders."""
    root = tmp_path_factory.mktemp("adapters")
    models = {name: _adapter(tiny_refs["hf"], tiny_refs["open_clip"], seed) for name, seed in (("v1", 1), ("v2", 2))}
    for name, model in models.items():
        model.save_pretrained(root / name)
    return root, models


@pytest.fixture(scope="module")
def hub(tiny_refs):
    """The test Hub, holding the tiny base models as ``org/new-model`` and ``org/old-model``."""
    with HubServer(writable=("team", "org")) as server:
        server.state.seed("org/new-model", parse_reference(tiny_refs["hf"]).path)
        server.state.seed("org/old-model", parse_reference(tiny_refs["open_clip"]).path)
        yield server


def _env(home: Path, endpoint: str, offline: bool = False) -> dict[str, str]:
    """A machine: its own HF_HOME, the test Hub as endpoint (whose storage speaks LFS, not Xet)."""
    return dict(os.environ, HF_ENDPOINT=endpoint, HF_HUB_OFFLINE="1" if offline else "0", HF_TOKEN="test-token",
                HF_HUB_DISABLE_XET="1", HF_HOME=str(home), PYTHONPATH=os.pathsep.join(sys.path))


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=300)


def _pushes(env: dict[str, str], *pushes: list[str]) -> list[str]:
    """``xbt push`` command lines (``[ADAPTER_DIR, REPO_ID, *OPTIONS]``) run in one child process; their commits."""
    argvs = [["push", "--adapter_dir", str(folder), "--repo_id", repo_id, *options]
             for folder, repo_id, *options in pushes]
    result = _run(["-c", XBT, json.dumps(argvs)], env)
    assert result.returncode == 0 and result.stdout.split()[1::2] == ["0"] * len(pushes), result.stderr
    return [line.split("@")[1] for line in result.stdout.split()[::2]]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _card_results(card: ModelCard) -> list[tuple[str, str, float]]:
    return [(r.task_type, r.metric_name, r.metric_value) for r in card.data.eval_results or []]


def _expected_results(metrics: dict) -> list[tuple[str, str, float]]:
    tasks = {"text→image": "text-to-image-retrieval", "image→text": "image-to-text-retrieval"}
    return [(tasks[d], f"R@{k} {c['name']}", value) for d in tasks for c in metrics["cells"]
            if c["direction"] == d and c.get("role") in CARD_ROLES for k, value in c["recall"].items()]


@pytest.mark.slow
def test_each_push_replaces_the_tree_through_lfs_and_keeps_a_card_someone_wrote(adapters, hub, tiny_refs, tmp_path):
    root, models = adapters
    eval_dir = tmp_path / "eval"
    data = write_split(tmp_path / "evalset", "shapes", 12, seed=5, split="test")
    assert cli(["eval", "--old_model", tiny_refs["open_clip"], "--new_model", tiny_refs["hf"],
                "--adapter", str(root / "v1"), "--eval_set", str(data), "--output_dir", str(eval_dir)]) == 0
    env, repo = _env(tmp_path / "hf_home", hub.endpoint), "team/clip-upgrade"
    local_before = _snapshot(root / "v1")

    (commit,) = _pushes(env, [root / "v1", repo, "--eval_dir", str(eval_dir), *PUBLIC_REFS])
    first = hub.state.tree(repo, commit)
    assert _snapshot(root / "v1") == local_before  # card and eval/ were staged elsewhere
    plots = sorted(p.name for p in eval_dir.glob("*.png"))
    assert plots and {"README.md", "xbt_config.json", "projection/config.json", "projection/model.safetensors",
                      "adapter_config.json", "adapter_model.safetensors", "eval/metrics.json",
                      *(f"eval/{name}" for name in plots)} <= set(first)
    binaries = [name for name in first if name.endswith((".safetensors", ".png"))]
    assert all(first[name].lfs and first[name].sha256 in hub.state.lfs_uploads for name in binaries)
    assert not first["xbt_config.json"].lfs

    config = json.loads(first["xbt_config.json"].data)
    assert (config["new_model"]["reference"], config["old_model"]["reference"]) == (NEW_PUBLIC, OLD_PUBLIC)
    local = [str(parse_reference(ref).path).encode() for ref in tiny_refs.values()] + [str(root / "v1").encode()]
    assert not [name for name, blob in first.items() if any(path in blob.data for path in local)]

    card = ModelCard(first["README.md"].data.decode())
    assert is_generated(card.content) and card.data.library_name == "xbt"
    assert (card.data.base_model, card.data.base_model_relation, card.data.pipeline_tag) == (
        "org/new-model", "adapter", "feature-extraction")
    assert card.data.xbt == {"source_space": models["v1"].source_space_id, "source_model": NEW_PUBLIC,
                             "target_space": models["v1"].space_id, "target_model": OLD_PUBLIC}
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    listed, expected = _card_results(card), _expected_results(metrics)
    assert listed and [row[:2] for row in listed] == [row[:2] for row in expected]
    assert [row[2] for row in listed] == pytest.approx([row[2] for row in expected], abs=0.005)  # 2 decimals
    assert all(f"](eval/{name})" in card.text for name in plots)

    # Someone writes the repo's card by hand; the next push keeps it and drops the stale eval/.
    own_card = b"---\nlicense: mit\n---\n# Our upgraded CLIP\n\nWritten by us.\n"
    hub.state.commit(repo, "main", {"README.md": Blob(own_card)}, [])
    # Then, asked to, a push to a new branch renders the card again; main keeps the hand-written one.
    second, third = (hub.state.tree(repo, commit) for commit in _pushes(
        env, [root / "v2", repo, *PUBLIC_REFS], [root / "v2", repo, "--replace_card", "--branch", "rendered",
                                                 *PUBLIC_REFS]))
    assert second["README.md"].data == own_card
    assert not [name for name in second if name.startswith("eval/")]
    assert json.loads(second["xbt_config.json"].data)["model_id"] == models["v2"].model_id
    assert second["adapter_model.safetensors"].sha256 in hub.state.lfs_uploads
    assert second["adapter_model.safetensors"].data == (root / "v2" / "adapter_model.safetensors").read_bytes()
    assert hub.state.tree(repo, "rendered") == third and hub.state.tree(repo, "main") == second
    card = ModelCard(third["README.md"].data.decode())
    assert is_generated(card.content) and card.data.eval_results is None and "Not evaluated yet" in card.text
    assert set(third) == set(second)


@pytest.mark.slow
def test_an_adapter_pushed_from_one_machine_loads_on_another(hub, tiny_refs, tmp_path):
    """Trained on local folders, pushed with public references for them, the local files deleted, pulled afresh."""
    machine = tmp_path / "trainer"
    folders = {backend: machine / "models" / backend for backend in ("hf", "open_clip")}
    for backend, folder in folders.items():
        shutil.copytree(parse_reference(tiny_refs[backend]).path, folder)
    model = _adapter(f"hf:{folders['hf']}", f"open_clip:local-dir:{folders['open_clip']}", seed=3)
    model.save_pretrained(machine / "adapter")
    images = sorted(str(p) for p in write_split(tmp_path / "images", "shapes", 3, seed=1, split="test").glob("*.png"))
    before = {"text": model.encode_text(TEXTS), "blended": model.encode_text(TEXTS, blend_old=0.5),
              "image": model.encode_image(images)}
    downloads = len(hub.state.lfs_downloads)

    # The new model has a public copy; the old one is published by the push itself.
    push = [machine / "adapter", "team/portable", "--public_ref", f"new={NEW_PUBLIC}",
            "--push_base", "old=org/pushed-old"]
    (commit,) = _pushes(_env(machine / "hf_home", hub.endpoint), push)
    shutil.rmtree(machine)
    config = json.loads(hub.state.tree("team/portable", commit)["xbt_config.json"].data)
    assert (config["new_model"]["reference"], config["old_model"]["reference"]) == (
        NEW_PUBLIC, "open_clip:hf-hub:org/pushed-old")
    assert hub.state.tree("org/pushed-old")["open_clip_model.safetensors"].lfs

    out = tmp_path / "pulled.safetensors"
    pulled = _run(["-c", PULL, "team/portable", commit, str(out), *images], _env(tmp_path / "fresh", hub.endpoint))
    assert pulled.returncode == 0, pulled.stderr
    after = load_file(out)
    assert {name: (after[name] - vectors).abs().max().item() <= 1e-6 for name, vectors in before.items()} == {
        name: True for name in before}
    served = set(hub.state.lfs_downloads[downloads:])
    assert {blob.sha256 for name, blob in hub.state.tree("team/portable", commit).items()
            if name.endswith(".safetensors")} <= served

    # Offline, the filled cache serves that revision (base models included); a repo never fetched says so.
    offline = _run(["-c", OFFLINE, "team/portable", commit, str(out)], _env(tmp_path / "fresh", "http://127.0.0.1:9",
                                                                            offline=True))
    assert offline.returncode == 0, offline.stderr
    assert torch.equal(load_file(out)["text"], after["text"])
    assert "Could not fetch the adapter repo 'team/never-pushed'" in offline.stdout


def test_a_reference_that_only_exists_here_is_refused(adapters, capsys):
    root, _ = adapters
    before = _snapshot(root / "v2")
    for extra, named, fix in (([], "the new model", "--public_ref new=hf:ORG/REPO old=open_clip:hf-hub:ORG/REPO"),
                              (["--public_ref", f"new={NEW_PUBLIC}"], "the old model", "--push_base old=ORG/REPO")):
        assert cli(["push", "--adapter_dir", str(root / "v2"), "--repo_id", "team/x", *extra]) == 2
        error = capsys.readouterr().err
        assert error.startswith("xbt push: error: ") and error.count("\n") == 1
        assert named in error and fix in error and "Traceback" not in error
    for option, bad in (("--public_ref", "new=hf:/not/public"), ("--public_ref", "newer=hf:org/repo"),
                        ("--push_base", "newer=org/repo"), ("--push_base", "old=org//repo")):
        assert cli(["push", "--adapter_dir", str(root / "v2"), "--repo_id", "team/x", option, bad]) == 2
        assert f"xbt push: error: {option}" in capsys.readouterr().err
    assert _snapshot(root / "v2") == before


@pytest.mark.parametrize("local, public", [
    ("hf:/gone/new", "hf:ORG/REPO"),
    ("open_clip:local-dir:/gone/old", "open_clip:hf-hub:ORG/REPO"),
    ("xbt:/gone/v2-adapter", "xbt:ORG/REPO"),  # a chained upgrade's old side is an adapter repo
])
def test_the_suggested_public_reference_keeps_the_backend(local, public):
    assert hub_reference(local, "ORG/REPO") == public


def test_a_failed_push_writes_nothing_locally_and_wrong_public_weights_are_refused(adapters, hub, tmp_path):
    root, _ = adapters
    eval_dir = tmp_path / "eval"
    eval_dir.mkdir()
    (eval_dir / "metrics.json").write_text(json.dumps({"cells": [], "ks": [1, 5, 10]}))
    before = _snapshot(root / "v2")
    push = ["push", "--adapter_dir", str(root / "v2"), "--eval_dir", str(eval_dir)]
    # The token may create repos under team/ and org/ only, as on the Hub: creating this one is refused ...
    refused = [*push, "--repo_id", "someone-else/x", *PUBLIC_REFS]
    # ... and a public reference to other weights than the recorded ones is caught before any upload.
    swapped = [*push, "--repo_id", "team/wrong", "--public_ref", f"new={NEW_PUBLIC}", "old=hf:org/new-model"]
    result = _run(["-c", XBT, json.dumps([refused, swapped])], _env(tmp_path / "hf_home", hub.endpoint))
    assert result.stdout.split() == ["2", "2"] and "Traceback" not in result.stderr
    failed, wrong = [line for line in result.stderr.splitlines() if line.startswith("xbt push: error: ")]
    assert failed.startswith("xbt push: error: Pushing") and "403" in failed and "HF_TOKEN" in failed
    assert "is another model than the one this adapter records" in wrong and "old model" in wrong
    assert _snapshot(root / "v2") == before
    assert "someone-else/x" not in hub.state.repos and "team/wrong" not in hub.state.repos
    assert cli(["push", "--adapter_dir", str(root / "v2"), "--repo_id", "team//x"]) == 2


def test_a_card_someone_wrote_is_kept_the_local_one_first(adapters, tmp_path):
    root, _ = adapters
    staging = tmp_path / "staging"
    shutil.copytree(root / "v2", staging)
    ours, theirs = "# Written here\n", "# Written on the Hub\n"
    assert choose_card(staging, "team/x", theirs, replace_card=False) == "the README.md already in the repo"
    assert (staging / "README.md").read_text() == theirs  # the local card was xbt's: the repo's wins
    (staging / "README.md").write_text(ours)
    assert choose_card(staging, "team/x", theirs, replace_card=False) == "the adapter directory's own README.md"
    assert (staging / "README.md").read_text() == ours
    assert choose_card(staging, "team/x", theirs, replace_card=True) == "rendered"
    assert is_generated((staging / "README.md").read_text())


def test_model_card_without_evaluation(adapters):
    root, models = adapters
    card = ModelCard(render_model_card(root / "v2", repo_id="team/x"))
    assert card.data.eval_results is None and card.data.tags[0] == "xbt" and is_generated(card.content)
    assert card.data.base_model is None  # the new model is a local folder: no Hub id to name
    assert "Not evaluated yet" in card.text and 'XBTModel.from_pretrained("team/x")' in card.text
    config = json.loads((root / "v2" / "xbt_config.json").read_text())
    assert config["old_model"]["fingerprint"] in card.text and "lora_rank" in card.text


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


def test_a_pickled_projection_on_the_hub_is_refused(hub, tmp_path):
    folder = tmp_path / "psi"
    Projection(6, 4, kind="linear").save_pretrained(folder)
    torch.save(Projection.from_pretrained(folder).state_dict(), folder / "pytorch_model.bin")
    result = _run(["-c", PICKLED_PROJECTION, str(folder)], _env(tmp_path / "hf_home", hub.endpoint))
    assert result.returncode != 0 and "xbt loads Projection weights from model.safetensors only" in result.stderr
    assert hub.state.tree("team/psi")["pytorch_model.bin"].lfs  # the pickle went the LFS way, as on the Hub
