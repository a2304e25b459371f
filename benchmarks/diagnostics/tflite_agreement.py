"""Diagnostic (not a benchmark): does labelwise's float MobileNetV2 compute what the original 8-bit
TFLite graph computes?

`../shared/weights/mobilenet_v2_imagenet.pth` was dequantised from
`../shared/weights/mobilenet_v2_1.0_224_quant.tflite`; this compares the ImageNet class each
network picks for the same images (the first 40 Imagenette files of each class, 224x224 bilinear,
as `benchmarks/imagenet_check.py`). Two steps, because the TFLite interpreter (`ai-edge-litert`)
is not a labelwise dependency:

    python3 -m venv /tmp/litert && /tmp/litert/bin/pip install ai-edge-litert pillow numpy
    /tmp/litert/bin/python benchmarks/diagnostics/tflite_agreement.py reference /tmp/tflite_top1.npy
    .venv/bin/python benchmarks/diagnostics/tflite_agreement.py compare /tmp/tflite_top1.npy

The second step prints the share of images on which both networks agree (TF 'SAME' and
symmetric padding) and each network's top-1. The quantised graph computes in 8-bit integers, so
agreement is high but not 100%.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT.parent / "shared" / "data" / "unlabeled" / "imagenette"
TFLITE = ROOT.parent / "shared" / "weights" / "mobilenet_v2_1.0_224_quant.tflite"
PER_CLASS = 40


def selected_files() -> list[Path]:
    counts: dict[str, int] = {}
    chosen = []
    for path in sorted(IMAGES.glob("*.jpg")):
        class_id = path.name.split("_")[0]
        if counts.get(class_id, 0) < PER_CLASS:
            counts[class_id] = counts.get(class_id, 0) + 1
            chosen.append(path)
    return chosen


def image(path: Path) -> np.ndarray:
    return np.array(Image.open(path).convert("RGB").resize((224, 224), Image.BILINEAR))


def reference(out: Path) -> None:
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(str(TFLITE))
    interpreter.allocate_tensors()
    inp, outp = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    top1 = []
    for path in selected_files():
        interpreter.set_tensor(inp["index"], image(path)[None].astype(inp["dtype"]))
        interpreter.invoke()
        top1.append(int(interpreter.get_tensor(outp["index"])[0].argmax()) - 1)  # output 0 is TF's background
    np.save(out, np.array(top1))
    print(f"wrote {out} ({len(top1)} images)")


def compare(reference_file: Path) -> None:
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from imagenet_check import IMAGENETTE_CLASSES
    from labelwise.models import MobileNetV2
    from labelwise.models.pretrained import load_strict, read_weights, resolve_weights

    files = selected_files()
    tflite = torch.from_numpy(np.load(reference_file))
    labels = torch.tensor([IMAGENETTE_CLASSES[p.name.split("_")[0]] for p in files])
    batch = torch.from_numpy(np.stack([image(p) for p in files])).permute(0, 3, 1, 2).float() / 127.5 - 1
    state = read_weights(resolve_weights("mobilenet_v2_imagenet"))
    print(f"tflite top-1 {float((tflite == labels).float().mean()):.4f} on {len(files)} images")
    for padding in ("tf_same", "symmetric"):
        model = MobileNetV2(padding_rule=padding).eval()
        load_strict(model, state, "mobilenet_v2_imagenet")
        with torch.no_grad():
            ours = torch.cat([model(chunk).argmax(1) for chunk in batch.split(50)])
        print(f"{padding}: agreement with tflite {float((ours == tflite).float().mean()):.4f}, "
              f"top-1 {float((ours == labels).float().mean()):.4f}")


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("reference", "compare"):
        sys.exit(__doc__)
    (reference if sys.argv[1] == "reference" else compare)(Path(sys.argv[2]))
