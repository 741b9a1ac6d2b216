"""The published CIFAR-100 top-1 accuracies (%) of the CRD benchmark and of DKD, per pair and method.

Sources:
  * Tian, Krishnan & Isola, "Contrastive Representation Distillation", ICLR 2020, Table 1 (teacher and
    student of the same architecture, mean of 5 runs) and Table 2 (different architectures, mean of
    3 runs; the last epoch of each run); the same numbers are in RepDistiller's README (commit
    b84f547: all 189 of them match this table) except the CRD+KD row, which the README omits (taken
    from the paper's tables, as quoted in later papers' READMEs). FSP has no number for WRN-40-2 ->
    WRN-40-1 (N/A: FSP needs equal widths) nor for any pair of Table 2.
  * Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022, and mdistiller's README: DKD for 11
    of the 13 pairs (none for resnet110 -> resnet20 or ResNet50 -> vgg8). mdistiller's README labels
    the last cross-architecture column "ResNet32x4 -> MobileNet-V2"; its KD figure (74.45) and the
    DKD paper's table make it ResNet32x4 -> ShuffleNet-V2, which is where it is listed here.
``ce`` is the student trained from scratch (the tables' "Student" row); ``teacher`` the teacher.
"""

from __future__ import annotations

from typing import Mapping

# Column order of the tables.
PAIRS = ("wrn_40_2-wrn_16_2", "wrn_40_2-wrn_40_1", "resnet56-resnet20", "resnet110-resnet20", "resnet110-resnet32",
         "resnet32x4-resnet8x4", "vgg13-vgg8",
         "vgg13-MobileNetV2", "ResNet50-MobileNetV2", "ResNet50-vgg8", "resnet32x4-ShuffleV1",
         "resnet32x4-ShuffleV2", "wrn_40_2-ShuffleV1")
ROWS = ("teacher", "ce", "kd", "fitnet", "at", "sp", "cc", "vid", "rkd", "pkt", "ab", "ft", "fsp", "nst", "crd",
        "crd+kd", "dkd")
LABELS = {"teacher": "Teacher", "ce": "Student (scratch)", "kd": "KD", "fitnet": "FitNet", "at": "AT", "sp": "SP",
          "cc": "CC", "vid": "VID", "rkd": "RKD", "pkt": "PKT", "ab": "AB", "ft": "FT", "fsp": "FSP", "nst": "NST",
          "crd": "CRD", "crd+kd": "CRD+KD", "dkd": "DKD"}

_NA = None
# One tuple per row, one value per pair in PAIRS order; None where the paper has no number.
_TABLE = {
    "teacher": (75.61, 75.61, 72.34, 74.31, 74.31, 79.42, 74.64, 74.64, 79.34, 79.34, 79.42, 79.42, 75.61),
    "ce":      (73.26, 71.98, 69.06, 69.06, 71.14, 72.50, 70.36, 64.60, 64.60, 70.36, 70.50, 71.82, 70.50),
    "kd":      (74.92, 73.54, 70.66, 70.67, 73.08, 73.33, 72.98, 67.37, 67.35, 73.81, 74.07, 74.45, 74.83),
    "fitnet":  (73.58, 72.24, 69.21, 68.99, 71.06, 73.50, 71.02, 64.14, 63.16, 70.69, 73.59, 73.54, 73.73),
    "at":      (74.08, 72.77, 70.55, 70.22, 72.31, 73.44, 71.43, 59.40, 58.58, 71.84, 71.73, 72.73, 73.32),
    "sp":      (73.83, 72.43, 69.67, 70.04, 72.69, 72.94, 72.68, 66.30, 68.08, 73.34, 73.48, 74.56, 74.52),
    "cc":      (73.56, 72.21, 69.63, 69.48, 71.48, 72.97, 70.71, 64.86, 65.43, 70.25, 71.14, 71.29, 71.38),
    "vid":     (74.11, 73.30, 70.38, 70.16, 72.61, 73.09, 71.23, 65.56, 67.57, 70.30, 73.38, 73.40, 73.61),
    "rkd":     (73.35, 72.22, 69.61, 69.25, 71.82, 71.90, 71.48, 64.52, 64.43, 71.50, 72.28, 73.21, 72.21),
    "pkt":     (74.54, 73.45, 70.34, 70.25, 72.61, 73.64, 72.88, 67.13, 66.52, 73.01, 74.10, 74.69, 73.89),
    "ab":      (72.50, 72.38, 69.47, 69.53, 70.98, 73.17, 70.94, 66.06, 67.20, 70.65, 73.55, 74.31, 73.34),
    "ft":      (73.25, 71.59, 69.84, 70.22, 72.37, 72.86, 70.58, 61.78, 60.99, 70.29, 71.75, 72.50, 72.03),
    "fsp":     (72.91, _NA, 69.95, 70.11, 71.89, 72.62, 70.23, _NA, _NA, _NA, _NA, _NA, _NA),
    "nst":     (73.68, 72.24, 69.60, 69.53, 71.96, 73.30, 71.53, 58.16, 64.96, 71.28, 74.12, 74.68, 74.89),
    "crd":     (75.48, 74.14, 71.16, 71.46, 73.48, 75.51, 73.94, 69.73, 69.11, 74.30, 75.11, 75.65, 76.05),
    "crd+kd":  (75.64, 74.38, 71.63, 71.56, 73.75, 75.46, 74.29, 69.94, 69.54, 74.58, 75.12, 76.05, 76.27),
    "dkd":     (76.23, 74.81, 71.97, _NA, 74.11, 76.32, 74.68, 69.71, 70.35, _NA, 76.45, 77.07, 76.70),
}
PAPER: Mapping[str, Mapping[str, float | None]] = {
    pair: {row: values[i] for row, values in _TABLE.items()} for i, pair in enumerate(PAIRS)}

SOURCE = {row: "CRD paper Tables 1-2 / RepDistiller README" for row in ROWS}
SOURCE["crd+kd"] = "CRD paper Tables 1-2 (not in RepDistiller's README)"
SOURCE["dkd"] = "DKD paper / mdistiller README"


def paper(pair: str, row: str) -> float | None:
  """The published top-1 (%) of ``row`` on ``pair`` ("teacher-student"), or None if there is none."""
  return PAPER[pair][row]


def markdown() -> str:
  """The whole published table as markdown (rows: methods; columns: pairs)."""
  head = "| | " + " | ".join(p.replace("-", " -> ") for p in PAIRS) + " |"
  lines = [head, "|---" * (len(PAIRS) + 1) + "|"]
  for row in ROWS:
    cells = ["-" if v is None else f"{v:.2f}" for v in _TABLE[row]]
    lines.append(f"| {LABELS[row]} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


if __name__ == "__main__":
  print(markdown())
