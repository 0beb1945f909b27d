"""Every file and folder the pipeline reads or writes, anchored at the project root, in one place.

`ProjectPaths` is the only place a path is spelled out. It also knows which stage writes each
hand-over file (the `outs` of dvc.yaml, checked by a test), so the "run the X stage first"
message is written once, in `require`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from mnist_mlops.errors import PipelineError

# Where `dvc exp run --temp` runs a stage: `<repo>/.dvc/tmp/exps/<name>/`.
_EXPS_TEMP_DIR = (".dvc", "tmp", "exps")

# Output folder (relative to the root) -> the stage that writes it, as in dvc.yaml.
STAGE_OUTPUTS = {
    "data/prepared": "prepare",
    "models/baseline": "baseline",
    "tuning": "tune",
    "models/tuned": "retrain",
    "evaluation": "evaluate",
    "reports/evaluate": "evaluate",
}


def project_root() -> Path:
    """The repository the user works in, also when DVC runs a stage in a temporary copy.

    `dvc exp run --temp` executes in `<repo>/.dvc/tmp/exps/<name>/`; results must still land in
    the user's store, not in a copy that DVC deletes afterwards.
    """
    root = Path(os.environ.get("DVC_ROOT", Path.cwd())).resolve()
    parts = root.parts
    for i in range(len(parts) - len(_EXPS_TEMP_DIR) + 1):
        if parts[i : i + len(_EXPS_TEMP_DIR)] == _EXPS_TEMP_DIR:
            return Path(*parts[:i])
    return root


@dataclass(frozen=True)
class ProjectPaths:
    """The pipeline's files under `root` (a stage's working directory: the repository, or the
    copy `dvc exp run --temp` made of it)."""

    root: Path

    @classmethod
    def cwd(cls) -> ProjectPaths:
        """The paths a stage uses: relative to the directory DVC runs it in, so messages show
        short paths (`models/tuned/registered.json`)."""
        return cls(Path())

    # --- inputs ---------------------------------------------------------------------------
    @property
    def params(self) -> Path:
        return self.root / "params.yaml"

    @property
    def raw(self) -> Path:
        """Where prepare looks for MNIST when $MNIST_DIR is not set (and downloads it to)."""
        return self.root / "data" / "raw"

    # --- prepare ----------------------------------------------------------------------------
    @property
    def prepared(self) -> Path:
        return self.root / "data" / "prepared"

    def split(self, name: str) -> Path:
        """`train`, `val` or `test` as written by prepare."""
        return self.prepared / f"{name}.npz"

    @property
    def data_summary(self) -> Path:
        return self.prepared / "summary.json"

    # --- baseline and retrain: models/<name>/{model.keras,config.json,history.json} ------------
    def model_dir(self, name: str) -> Path:
        """`baseline` or `tuned`."""
        return self.root / "models" / name

    def model_file(self, name: str) -> Path:
        return self.model_dir(name) / "model.keras"

    def model_config(self, name: str) -> Path:
        """The resolved config the model was trained with."""
        return self.model_dir(name) / "config.json"

    def model_history(self, name: str) -> Path:
        """One row per epoch: what `dvc plots` reads."""
        return self.model_dir(name) / "history.json"

    @property
    def retrain_checkpoint(self) -> Path:
        """Retrain's state after its last finished epoch (a persistent DVC output: a killed
        retrain continues from there on the next `dvc repro`)."""
        return self.model_dir("tuned") / "checkpoint"

    @property
    def registered(self) -> Path:
        """The registry version retrain created (name, version, run id)."""
        return self.model_dir("tuned") / "registered.json"

    # --- tune -------------------------------------------------------------------------------
    @property
    def tuning(self) -> Path:
        return self.root / "tuning"

    @property
    def best_hparams(self) -> Path:
        return self.tuning / "best_hparams.json"

    @property
    def tuning_state(self) -> Path:
        """Keras Tuner's resumable search state (tune's own: no DVC output, never pushed)."""
        return self.tuning / "state"

    # --- evaluate ---------------------------------------------------------------------------
    @property
    def evaluation(self) -> Path:
        return self.root / "evaluation"

    @property
    def report(self) -> Path:
        return self.root / "reports" / "evaluate"

    # --- the stages' processes ---------------------------------------------------------------
    def stage_lock(self, stage: str) -> Path:
        """Held by the running process of `stage` (`stage_process`); not a pipeline output."""
        return self.root / ".locks" / f"{stage}.lock"

    # --- hand-over checks -------------------------------------------------------------------
    def producer(self, path: Path) -> str | None:
        """The stage that writes `path`, if a stage does."""
        try:
            relative = path.relative_to(self.root)
        except ValueError:
            return None
        for output, stage in STAGE_OUTPUTS.items():
            if relative.is_relative_to(output):
                return stage
        return None

    def require(self, path: Path) -> Path:
        """`path` itself if it exists; else a PipelineError saying which stage to run first."""
        if path.exists():
            return path
        stage = self.producer(path)
        hint = f"; run the {stage} stage first (dvc repro {stage})" if stage else ""
        raise PipelineError(f"{path}: not found{hint}")

    def rerun_hint(self, path: Path) -> str:
        """What to do about a broken hand-over file: rerun the stage that wrote it."""
        stage = self.producer(path)
        return f"; re-run the {stage} stage (dvc repro -f {stage})" if stage else ""
