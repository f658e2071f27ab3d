#!/usr/bin/env python
"""Train a tiny MobileNetV3-style CNN on scikit-learn's bundled digits and export it to ONNX.

Offline and deterministic: the data comes from ``sklearn.datasets.load_digits()``
(bundled with scikit-learn, no download), all seeds are fixed.

Outputs (next to this script):
  digits_mobilenet_bn.onnx  BatchNormalization kept as separate ops
  digits_mobilenet.onnx     BatchNormalization folded into the convolutions
  calib.npz                 200 calibration images  (keys: input, labels)
  test.npz                  400 test images         (keys: input, labels)

Regenerate with:  pip install torch==2.13.0 scikit-learn onnx onnxruntime
                  python examples/digits/make_model.py
"""

from __future__ import annotations

import collections
import random
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import numpy_helper
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

HERE = Path(__file__).resolve().parent
SEED = 0
N_CALIB = 200
N_TEST = 400
IMG = 32
EPOCHS = 30
BATCH = 64
LR = 3e-3
OPSET = 17


def set_determinism(seed: int = SEED) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)  # single thread: bitwise-reproducible CPU reductions


# --------------------------------------------------------------------------- data
def load_data():
    """Return (train, calib, test) as tuples of (float32 [N,1,32,32], int64 [N])."""
    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32)).unsqueeze(1)  # [1797,1,8,8], 0..16
    x = F.interpolate(x, size=(IMG, IMG), mode="bilinear", align_corners=False)
    x = (x / 16.0 * 2.0 - 1.0).numpy().astype(np.float32)  # roughly [-1, 1]
    y = d.target.astype(np.int64)

    idx = np.arange(len(y))
    rest_idx, test_idx = train_test_split(
        idx, test_size=N_TEST, stratify=y, random_state=SEED
    )
    train_idx, calib_idx = train_test_split(
        rest_idx, test_size=N_CALIB, stratify=y[rest_idx], random_state=SEED
    )
    # keep the original dataset order inside each split
    split = lambda i: (np.ascontiguousarray(x[np.sort(i)]), y[np.sort(i)])  # noqa: E731
    return split(train_idx), split(calib_idx), split(test_idx)


def random_shift(xb: torch.Tensor, g: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Shift each image by up to +-max_shift pixels, filling with background (-1)."""
    n = xb.shape[0]
    padded = F.pad(xb, (max_shift,) * 4, value=-1.0)
    off = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=g)
    out = torch.empty_like(xb)
    for i in range(n):
        dy, dx = int(off[i, 0]), int(off[i, 1])
        out[i] = padded[i, :, dy : dy + IMG, dx : dx + IMG]
    return out


# -------------------------------------------------------------------------- model
class ConvBNAct(nn.Sequential):
    def __init__(self, cin, cout, k, stride=1, groups=1, act: type[nn.Module] | None = None):
        layers = [
            nn.Conv2d(cin, cout, k, stride, padding=k // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
        ]
        if act is not None:
            layers.append(act())
        super().__init__(*layers)


class SqueezeExcite(nn.Module):
    def __init__(self, ch: int, squeeze: int):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(ch, squeeze, 1)
        self.relu = nn.ReLU()
        self.fc2 = nn.Conv2d(squeeze, ch, 1)
        self.gate = nn.Hardsigmoid()

    def forward(self, x):
        s = self.gate(self.fc2(self.relu(self.fc1(self.pool(x)))))
        return x * s


class InvertedResidual(nn.Module):
    def __init__(self, cin, exp, cout, stride, dw_act: type[nn.Module], se: bool):
        super().__init__()
        self.expand = ConvBNAct(cin, exp, 1, act=nn.ReLU6)
        self.dw = ConvBNAct(exp, exp, 3, stride, groups=exp, act=dw_act)
        self.se = SqueezeExcite(exp, max(8, exp // 4)) if se else nn.Identity()
        self.project = ConvBNAct(exp, cout, 1, act=None)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.project(self.se(self.dw(self.expand(x))))
        return x + y if self.residual else y


class DigitsMobileNet(nn.Module):
    #           cin exp cout stride dw_act        se
    CFG = [
        (16, 32, 16, 1, nn.ReLU6, False),  # 16x16
        (16, 64, 24, 2, nn.ReLU6, True),  # -> 8x8
        (24, 72, 24, 1, nn.Hardswish, True),
        (24, 96, 40, 2, nn.Hardswish, True),  # -> 4x4
        (40, 120, 40, 1, nn.Hardswish, True),
    ]

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = ConvBNAct(1, 16, 3, stride=2, act=nn.Hardswish)  # 32 -> 16
        self.blocks = nn.Sequential(*[InvertedResidual(*c) for c in self.CFG])
        self.head = ConvBNAct(40, 128, 1, act=nn.Hardswish)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x):
        x = self.head(self.blocks(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


# ----------------------------------------------------------------------- training
@torch.no_grad()
def accuracy(model, x: np.ndarray, y: np.ndarray) -> float:
    model.eval()
    logits = model(torch.from_numpy(x))
    return float((logits.argmax(1).numpy() == y).mean())


def train(model, train_set, test_set) -> None:
    xtr, ytr = torch.from_numpy(train_set[0]), torch.from_numpy(train_set[1])
    g = torch.Generator().manual_seed(SEED)
    opt = torch.optim.Adam(model.parameters(), lr=LR, weight_decay=1e-4)
    steps_per_epoch = (len(ytr) + BATCH - 1) // BATCH
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=LR, epochs=EPOCHS, steps_per_epoch=steps_per_epoch
    )
    t0 = time.time()
    for epoch in range(EPOCHS):
        model.train()
        perm = torch.randperm(len(ytr), generator=g)
        tot_loss, correct = 0.0, 0
        for b in range(steps_per_epoch):
            bi = perm[b * BATCH : (b + 1) * BATCH]
            xb, yb = random_shift(xtr[bi], g), ytr[bi]
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot_loss += loss.item() * len(yb)
            correct += int((logits.argmax(1) == yb).sum())
        if epoch % 5 == 4 or epoch == EPOCHS - 1:
            print(
                f"epoch {epoch + 1:2d}  loss {tot_loss / len(ytr):.4f}  "
                f"train(aug) acc {correct / len(ytr):.4f}  "
                f"test acc {accuracy(model, *test_set):.4f}  ({time.time() - t0:.0f}s)"
            )


# ------------------------------------------------------------------------- export
def constants_to_initializers(model: onnx.ModelProto) -> int:
    """Move top-level Constant nodes (e.g. Clip min/max) into graph initializers."""
    g = model.graph
    keep, moved = [], 0
    for node in g.node:
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            t = onnx.TensorProto()
            t.CopyFrom(node.attribute[0].t)
            t.name = node.output[0]
            g.initializer.append(t)
            moved += 1
        else:
            keep.append(node)
    del g.node[:]
    g.node.extend(keep)
    return moved


def rename_folded_conv_params(m: onnx.ModelProto, conv_weight_names: dict[str, str]) -> None:
    """Give folded Conv weight/bias initializers (exported as "onnx::Conv_123") the
    parameter names of the same Conv in the BN-kept export, e.g. "stem.0.weight"/"stem.0.bias"."""
    rename = {}
    for n in m.graph.node:
        if n.op_type == "Conv" and n.name in conv_weight_names:
            w = conv_weight_names[n.name]
            for old, new in zip(n.input[1:], (w, w[: -len("weight")] + "bias")):
                if old != new:
                    rename[old] = new
    existing = {t.name for t in m.graph.initializer}
    assert not (set(rename.values()) - set(rename)) & existing, "initializer name clash"
    for t in m.graph.initializer:
        t.name = rename.get(t.name, t.name)
    for n in m.graph.node:
        for i, name in enumerate(n.input):
            n.input[i] = rename.get(name, name)


def export(
    model: nn.Module, path: Path, keep_bn: bool, conv_weight_names: dict[str, str] | None = None
) -> onnx.ModelProto:
    model.eval()
    dummy = torch.zeros(1, 1, IMG, IMG)
    with warnings.catch_warnings():
        # The legacy TorchScript exporter is deprecated but is the reliable way to keep
        # BatchNormalization in inference form. Constant folding is harmless here: the
        # model is in eval mode (that warning is about models in training mode).
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", message=".*constant folding be turned off.*")
        torch.onnx.export(
            model,
            (dummy,),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
            # PRESERVE skips the conv+BN folding pass; the model is in eval mode, so
            # BatchNormalization is emitted in inference form (1 output, training_mode=0).
            training=torch.onnx.TrainingMode.PRESERVE if keep_bn else torch.onnx.TrainingMode.EVAL,
            do_constant_folding=True,
            export_params=True,
            keep_initializers_as_inputs=False,
        )
    m = onnx.load(str(path))
    moved = constants_to_initializers(m)
    if conv_weight_names:
        rename_folded_conv_params(m, conv_weight_names)
    m.doc_string = (
        "MobileNetV3-style CNN on scikit-learn digits (8x8 upsampled to 32x32, x = pixel/16*2-1); "
        + ("BatchNormalization kept" if keep_bn else "BatchNormalization folded into Conv")
    )
    onnx.checker.check_model(m, full_check=True)
    onnx.save(m, str(path))

    ops = collections.Counter(n.op_type for n in m.graph.node)
    bn = [n for n in m.graph.node if n.op_type == "BatchNormalization"]
    if keep_bn:
        assert bn, "expected BatchNormalization nodes"
        assert all(len(n.output) == 1 for n in bn), "BatchNormalization must be inference form"
    else:
        assert not bn, "expected BatchNormalization folded"
    assert not any(n.op_type == "Constant" for n in m.graph.node)
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    for n in m.graph.node:
        if n.op_type == "Clip":
            lo, hi = float(inits[n.input[1]]), float(inits[n.input[2]])
            assert (lo, hi) == (0.0, 6.0), (lo, hi)
    print(
        f"{path.name}: {len(m.graph.node)} nodes, {len(m.graph.initializer)} initializers "
        f"({moved} Constant nodes moved to initializers), {path.stat().st_size / 1024:.1f} KiB"
    )
    print("  ops:", dict(sorted(ops.items())))
    return m


def ort_logits(path: Path, x: np.ndarray) -> np.ndarray:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return sess.run(["logits"], {"input": x})[0]


# --------------------------------------------------------------------------- main
def main() -> None:
    set_determinism()
    train_set, calib_set, test_set = load_data()
    print(
        f"data: train {train_set[0].shape}, calib {calib_set[0].shape}, test {test_set[0].shape}, "
        f"range [{train_set[0].min():.3f}, {train_set[0].max():.3f}]"
    )

    model = DigitsMobileNet()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params: {n_params}")
    assert n_params < 100_000

    train(model, train_set, test_set)
    model.eval()
    train_acc = accuracy(model, *train_set)
    calib_acc = accuracy(model, *calib_set)
    test_acc = accuracy(model, *test_set)
    print(f"torch accuracy: train {train_acc:.4f}  calib {calib_acc:.4f}  test {test_acc:.4f}")
    assert test_acc >= 0.95, f"test accuracy {test_acc:.4f} < 0.95"

    np.savez_compressed(HERE / "calib.npz", input=calib_set[0], labels=calib_set[1])
    np.savez_compressed(HERE / "test.npz", input=test_set[0], labels=test_set[1])

    with torch.no_grad():
        ref = model(torch.from_numpy(test_set[0])).numpy()
    conv_weight_names: dict[str, str] = {}
    for name, keep_bn in (("digits_mobilenet_bn.onnx", True), ("digits_mobilenet.onnx", False)):
        path = HERE / name
        m = export(model, path, keep_bn, conv_weight_names)
        if keep_bn:  # Conv node name -> weight name, reused to name the folded params
            conv_weight_names.update(
                {n.name: n.input[1] for n in m.graph.node if n.op_type == "Conv"}
            )
        out = ort_logits(path, test_set[0])
        one = ort_logits(path, test_set[0][:1])  # dynamic batch axis
        assert np.abs(one - out[:1]).max() < 1e-5
        diff = float(np.abs(out - ref).max())
        acc = float((out.argmax(1) == test_set[1]).mean())
        print(f"  onnxruntime: max |logits - torch| = {diff:.2e}, test acc {acc:.4f}")
        assert out.shape == (N_TEST, 10)
        assert diff < 1e-4, diff


if __name__ == "__main__":
    main()
