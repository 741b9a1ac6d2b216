"""PyTorch eager reference for benchmarks/kd_step.py: the CRD benchmark's KD step, written for kdlab.

  /tmp/torchbench/bin/python benchmarks/torch_kd_step.py --iters 10

torch is a benchmark-only dependency and lives outside kdlab's venv (see benchmarks/README.md):
  python3 -m venv /tmp/torchbench && /tmp/torchbench/bin/pip install torch==2.13.0 numpy

The models are CIFAR ResNets with the architecture of kdlab's zoo (``kdlab/models/resnet.py``,
itself RepDistiller's): a 3x3 stem conv + BN + ReLU, three stages of post-activation basic blocks
(the first block of stages 2 and 3 halves the resolution; a 1x1 strided conv + BN shortcut where
the shape changes), global average pool, linear classifier. resnet8x4 has one block per stage,
resnet32x4 five; widths (32, 64, 128, 256). Parameter counts at 100 classes are asserted equal to
the zoo's: 1,233,540 and 7,433,860.

Three timed steps, all batch 64 of 32x32x3 in NCHW (PyTorch's default layout):
  kd       teacher (resnet32x4, eval mode, no_grad) forward; student (resnet8x4, train mode)
           forward; loss = 0.1 * CE + 0.9 * T^2 KL(p_t || p_s) at T = 4; backward; SGD step
           (lr 0.05, momentum 0.9, weight decay 5e-4).
  student  the same step without the teacher: loss = CE.
  teacher  the teacher's forward alone (eval mode, no_grad).

With ``--serve`` it answers JSON requests on stdin, one per line: ``{"op": "kd", "n": 5}`` ->
``{"times": [seconds, ...]}``; ``{"op": "info"}`` -> versions and thread count. kd_step.py uses
this to interleave PyTorch and kdlab measurements.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from torch import nn
from torch.nn import functional as F

STUDENT_PARAMS = 1_233_540  # kdlab.models.create("resnet8x4", num_classes=100)
TEACHER_PARAMS = 7_433_860  # kdlab.models.create("resnet32x4", num_classes=100)
CE_WEIGHT, KD_WEIGHT, TEMPERATURE = 0.1, 0.9, 4.0


class BasicBlock(nn.Module):
  """conv3x3-BN-ReLU-conv3x3-BN, plus the (projected) input, then ReLU."""

  def __init__(self, in_ch: int, width: int, stride: int):
    super().__init__()
    self.conv1 = nn.Conv2d(in_ch, width, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(width)
    self.shortcut = None
    if stride != 1 or in_ch != width:
      self.shortcut = nn.Sequential(nn.Conv2d(in_ch, width, 1, stride, 0, bias=False), nn.BatchNorm2d(width))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    h = F.relu(self.bn1(self.conv1(x)))
    h = self.bn2(self.conv2(h))
    return F.relu(h + (x if self.shortcut is None else self.shortcut(x)))


class CifarResNet(nn.Module):
  """``depth = 6n + 2``; ``widths = (stem, stage1, stage2, stage3)``. Returns ``(logits, feats)``."""

  def __init__(self, depth: int, widths: tuple[int, int, int, int], num_classes: int = 100):
    super().__init__()
    n = (depth - 2) // 6
    self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
    stages, in_ch = [], widths[0]
    for i, width in enumerate(widths[1:]):
      blocks = []
      for j in range(n):
        blocks.append(BasicBlock(in_ch, width, 2 if i > 0 and j == 0 else 1))
        in_ch = width
      stages.append(nn.Sequential(*blocks))
    self.stages = nn.ModuleList(stages)
    self.fc = nn.Linear(in_ch, num_classes)
    for m in self.modules():  # The zoo's init (kaiming fan_out convs, BN scale 1 / bias 0).
      if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
      elif isinstance(m, nn.BatchNorm2d):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)

  def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    feats = {"stem": self.stem(x)}
    h = feats["stem"]
    for i, stage in enumerate(self.stages, start=1):
      h = stage(h)
      feats[f"stage{i}"] = h
    feats["pool"] = torch.flatten(F.adaptive_avg_pool2d(h, 1), 1)
    return self.fc(feats["pool"]), feats


def resnet8x4(num_classes: int = 100) -> CifarResNet:
  return CifarResNet(8, (32, 64, 128, 256), num_classes)


def resnet32x4(num_classes: int = 100) -> CifarResNet:
  return CifarResNet(32, (32, 64, 128, 256), num_classes)


def num_params(model: nn.Module) -> int:
  """Trainable parameters (weights, biases, BN scale and bias; running statistics excluded)."""
  return sum(p.numel() for p in model.parameters() if p.requires_grad)


def kd_loss(s_logits: torch.Tensor, t_logits: torch.Tensor, temperature: float) -> torch.Tensor:
  """``T^2 * KL(p_t || p_s)`` at temperature T, averaged over the batch."""
  log_ps = F.log_softmax(s_logits / temperature, dim=1)
  log_pt = F.log_softmax(t_logits / temperature, dim=1)
  return F.kl_div(log_ps, log_pt, reduction="batchmean", log_target=True) * temperature**2


class Bench:
  """The models, optimizer and one fixed batch; ``run(op)`` performs one step of ``op``."""

  def __init__(self, batch_size: int = 64, channels_last: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    self.student, self.teacher = resnet8x4(), resnet32x4()
    for model, expected in ((self.student, STUDENT_PARAMS), (self.teacher, TEACHER_PARAMS)):
      got = num_params(model)
      assert got == expected, f"{type(model).__name__}: {got:,} parameters, expected {expected:,}"
    self.teacher.eval()
    for p in self.teacher.parameters():
      p.requires_grad_(False)
    self.student.train()
    self.opt = torch.optim.SGD(self.student.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    self.x = torch.randn(batch_size, 3, 32, 32)
    self.y = torch.randint(0, 100, (batch_size,))
    if channels_last:
      self.student.to(memory_format=torch.channels_last)
      self.teacher.to(memory_format=torch.channels_last)
      self.x = self.x.contiguous(memory_format=torch.channels_last)

  def kd(self) -> None:
    with torch.no_grad():
      t_logits, _ = self.teacher(self.x)
    s_logits, _ = self.student(self.x)
    loss = CE_WEIGHT * F.cross_entropy(s_logits, self.y) + KD_WEIGHT * kd_loss(s_logits, t_logits, TEMPERATURE)
    self.opt.zero_grad(set_to_none=True)
    loss.backward()
    self.opt.step()

  def student_step(self) -> None:
    s_logits, _ = self.student(self.x)
    loss = F.cross_entropy(s_logits, self.y)
    self.opt.zero_grad(set_to_none=True)
    loss.backward()
    self.opt.step()

  def teacher_forward(self) -> None:
    with torch.no_grad():
      self.teacher(self.x)

  def run(self, op: str) -> None:
    {"kd": self.kd, "student": self.student_step, "teacher": self.teacher_forward}[op]()

  def times(self, op: str, n: int, warmup: int = 0) -> list[float]:
    for _ in range(warmup):
      self.run(op)
    out = []
    for _ in range(n):
      t0 = time.perf_counter()
      self.run(op)
      out.append(time.perf_counter() - t0)
    return out


def info() -> dict:
  return {"torch": torch.__version__, "threads": torch.get_num_threads(), "python": sys.version.split()[0],
          "mkldnn": torch.backends.mkldnn.is_available()}


def serve(bench: Bench) -> None:
  for line in sys.stdin:
    req = json.loads(line)
    if req["op"] == "info":
      reply = info()
    else:
      reply = {"times": bench.times(req["op"], int(req.get("n", 1)), int(req.get("warmup", 0)))}
    sys.stdout.write(json.dumps(reply) + "\n")
    sys.stdout.flush()


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--threads", type=int, default=2)
  parser.add_argument("--batch-size", type=int, default=64)
  parser.add_argument("--iters", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--channels-last", action="store_true", help="NHWC memory format (default NCHW)")
  parser.add_argument("--serve", action="store_true", help="answer JSON requests on stdin (kd_step.py)")
  args = parser.parse_args()
  torch.set_num_threads(args.threads)
  bench = Bench(args.batch_size, args.channels_last)
  if args.serve:
    serve(bench)
    return
  print(json.dumps(info()))
  print("| step | median ms |")
  print("|---|---|")
  for op in ("kd", "student", "teacher"):
    print(f"| {op} | {1e3 * statistics.median(bench.times(op, args.iters, args.warmup)):.0f} |", flush=True)


if __name__ == "__main__":
  main()
