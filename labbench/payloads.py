"""What the HIL suites flash or deploy: the models in fixtures/ (with their datasets) and, when the
MLPerf Tiny reference models sit beside the project in ../shared, those too (no dataset: timing,
energy and memory only)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

    from labbench.modelinfo import ModelInfo

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "fixtures"
MLPERF_TINY = REPO.parent / "shared" / "workloads" / "mlperf_tiny"
# payload name -> MLPerf Tiny ID (labbench.modelinfo.MLPERF_TINY)
MLPERF_PAYLOADS = {
    "ic01_resnet8": "ic01",
    "kws01_dscnn": "kws01",
    "vww01_mobilenet": "vww01",
    "ad01_autoencoder": "ad01",
}


@dataclass(frozen=True)
class Payload:
    """A model file, the dataset it is judged on (if any), and what the manifest says about it."""

    name: str
    path: Path
    config: str | None = None
    dataset: Path | None = None
    dataset_sha256: str | None = None

    @cached_property
    def info(self) -> ModelInfo:
        from labbench.modelinfo import ModelInfo

        return ModelInfo.from_file(self.path)

    @cached_property
    def data(self) -> dict[str, np.ndarray] | None:
        if self.dataset is None:
            return None
        import numpy as np

        with np.load(self.dataset) as npz:
            return {k: npz[k] for k in npz.files}

    def test_inputs(self, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The test split as the model's input tensors (quantized for int8 models) and the labels."""
        import numpy as np

        from labbench.modelinfo import quantize_input

        if self.data is None:
            raise ValueError(f"payload {self.name} has no dataset")
        x, y = self.data["x_test"][:limit], self.data["y_test"][:limit]
        shape = self.info.inputs[0].shape[1:]
        return np.stack([quantize_input(self.info, xi.reshape((1, *shape)))[0] for xi in x]), y

    def timing_input(self) -> np.ndarray:
        """One input for back-to-back timing: the first test sample, or a seeded random one."""
        if self.data is not None:
            first: np.ndarray = self.test_inputs(limit=1)[0][0]
            return first
        import numpy as np

        t = self.info.inputs[0]
        rng = np.random.default_rng(0)
        if np.issubdtype(np.dtype(t.dtype), np.integer):
            lim = np.iinfo(t.dtype)
            drawn: np.ndarray = rng.integers(lim.min, lim.max + 1, size=t.shape[1:], dtype=t.dtype)
            return drawn
        return rng.standard_normal(t.shape[1:]).astype(t.dtype)


def fixtures(fixtures_dir: Path = FIXTURES) -> dict[str, Payload]:
    manifest = json.loads((fixtures_dir / "manifest.json").read_text())
    datasets = manifest["datasets"]
    return {
        name: Payload(
            name=name,
            path=fixtures_dir / m["file"],
            config=m.get("config"),
            dataset=fixtures_dir / datasets[m["dataset"]]["file"],
            dataset_sha256=datasets[m["dataset"]]["sha256"],
        )
        for name, m in manifest["models"].items()
    }


def mlperf_tiny(directory: Path = MLPERF_TINY) -> dict[str, Payload]:
    """The MLPerf Tiny reference models, or nothing when ../shared is absent. A board running one reports
    its MLPerf Tiny ID and takes the runner's input format; labbench's DUT driver converts to it."""
    from labbench.modelinfo import MLPERF_TINY as models

    paths = {name: directory / models[model_id].file for name, model_id in MLPERF_PAYLOADS.items()}
    return {
        name: Payload(name=name, path=path, config="mlperf tiny int8")
        for name, path in paths.items()
        if path.exists()
    }


def all_payloads() -> dict[str, Payload]:
    return {**fixtures(), **mlperf_tiny()}
