"""``xbt export``: how long an export takes, and whether the exported model encodes as fast as the plain one.

    python scripts/bench_export.py [--items 512] [--repeats 3]

Per backend, builds the demo's NEW-size tiny model and an old model of another dimension,
saves an adapter with an orthogonal ψ and one with an MLP ψ (random non-zero LoRA), and
times the export of each (load, merge, fold or trace, write, self-check: what
``xbt export`` does). Then, on the same preprocessed images and tokenised captions,
side by side and interleaved (the order rotates every repeat), it times:

- ``plain``: the unadapted new model in its own library (what serving ran before);
- ``native``: the exported checkpoint loaded by its own library (same architecture,
  LoRA merged, ψ folded; the target ratio native/plain is 1.0 within noise);
- ``xbt``: XBTModel with live LoRA layers and ψ (what export removes);
- ``onnx``: the ONNX export (towers + MLP ψ) in onnxruntime.

Reports items/s (best of ``--repeats``) and the ratios to ``plain``, as JSON.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from xbt import load_backbone
from xbt.demo.models import BUILDERS, TinyClipConfig
from xbt.demo.scenes import generate
from xbt.export import export_adapter
from xbt.model import XBTModel
from xbt.projection import Projection

NEW, OLD = TinyClipConfig(width=96, layers=3), TinyClipConfig(embed_dim=24, width=32, seed=1)


def save_adapter(folder: Path, new_ref: str, old_ref: str, kind: str) -> Path:
    backbone, old = load_backbone(new_ref), load_backbone(old_ref)
    torch.manual_seed(0)
    projection = Projection(backbone.embed_dim, old.embed_dim, kind=kind, source_space=backbone.fingerprint,
                            target_space=old.fingerprint)
    model = XBTModel(backbone, projection, old_reference=old_ref, old_model_id=old.model_id)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.05)
    model.save_pretrained(folder)
    return folder


def native_encoders(backend: str, folder: Path):
    """(text, image) functions of a model folder in its own library: tokens / pixels -> unnormalised vectors."""
    if backend == "hf":
        from transformers import CLIPModel

        model = CLIPModel.from_pretrained(str(folder)).eval()
        pick = (lambda output: output if isinstance(output, torch.Tensor) else output.pooler_output)
        return (lambda tokens: pick(model.get_text_features(**tokens)),
                lambda pixels: pick(model.get_image_features(pixel_values=pixels)))
    import open_clip

    model = open_clip.create_model_and_transforms(f"local-dir:{folder}")[0].eval()
    return (lambda tokens: model.encode_text(tokens["input_ids"]), model.encode_image)


def onnx_encoders(folder: Path):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    # idle onnxruntime threads spin by default and would slow down whichever engine runs next
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    text, image = (onnxruntime.InferenceSession(str(folder / name), options, providers=["CPUExecutionProvider"])
                   for name in ("text.onnx", "image.onnx"))
    return (lambda tokens: text.run(["embedding"], {k: v.numpy() for k, v in tokens.items()}),
            lambda pixels: image.run(["embedding"], {"pixel_values": pixels.numpy()}))


def batched(function, items, batch_size: int = 64):
    def go():
        with torch.inference_mode():
            for start in range(0, len(items), batch_size):
                function(items[start:start + batch_size])
    return go


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    options = parser.parse_args()

    images, caption_lists = generate("shapes", options.items, seed=0)
    captions = [group[0] for group in caption_lists]
    results = {"torch_threads": torch.get_num_threads(), "items": options.items, "runs": []}
    with tempfile.TemporaryDirectory() as root:
        root = Path(root)
        old_ref = BUILDERS["open_clip"](root / "old", OLD)
        for backend, build in BUILDERS.items():
            new_ref = build(root / f"new-{backend}", NEW)
            plain = load_backbone(new_ref)
            pixels = plain.preprocess_images(images)
            token_batches = [plain.tokenize(captions[i:i + 64]) for i in range(0, len(captions), 64)]
            export_seconds, engines = {}, {}
            for kind, format in (("orthogonal", "native"), ("mlp", "onnx")):
                adapter = save_adapter(root / f"{backend}-{kind}", new_ref, old_ref, kind)
                start = time.perf_counter()
                export_adapter(XBTModel.from_pretrained(adapter), root / f"{backend}-{format}", format)
                export_seconds[format] = time.perf_counter() - start
                if format == "native":
                    engines["xbt"] = XBTModel.from_pretrained(adapter)
            engines = {
                "plain": (plain.text_features, plain.image_features),
                "native": native_encoders(backend, root / f"{backend}-native"),
                "xbt": (lambda model: (lambda t: model(tokens=t)[1], lambda p: model(pixels=p)[0]))(engines["xbt"]),
                "onnx": onnx_encoders(root / f"{backend}-onnx"),
            }
            best = {name: {"text": float("inf"), "image": float("inf")} for name in engines}
            names = list(engines)
            for repeat in range(options.repeats):  # interleaved, so drift in machine load hits every engine alike
                for name in names[repeat % len(names):] + names[:repeat % len(names)]:
                    text, image = engines[name]
                    for what, work in (("text", lambda: [text(tokens) for tokens in token_batches]),
                                       ("image", batched(image, pixels))):
                        start = time.perf_counter()
                        with torch.inference_mode():
                            work()
                        best[name][what] = min(best[name][what], time.perf_counter() - start)
            rates = {name: {f"{what}_per_s": round(options.items / seconds, 1) for what, seconds in times.items()}
                     for name, times in best.items()}
            results["runs"].append({
                "backend": backend, "export_seconds": {k: round(v, 2) for k, v in export_seconds.items()},
                "rates": rates,
                "ratio_to_plain": {name: {what: round(best["plain"][what] / seconds, 3)
                                          for what, seconds in times.items()} for name, times in best.items()},
            })
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
