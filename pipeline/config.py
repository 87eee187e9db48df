"""Typed job configs (pydantic, ``extra="forbid"``) and their loading from YAML presets.

One model per job, composed of shared sub-models. Variants are values (``guidance: bodybox``), never
subclasses. A run's resolved config is written next to its outputs, so a run is reproducible from a file.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, ValidationError, model_validator


class UserError(Exception):
    """A mistake the user can fix (bad path, bad config value). The CLI prints it on one line, no traceback."""


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


ZYX = tuple[float, float, float]
ZYXInt = tuple[int, int, int]


# ----------------------------------------------------------------------------------------------- shared
class TrackingConfig(StrictModel):
    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI; None = $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")
    experiment: str = Field("anatdiff", description="MLflow experiment name")


class PatchConfig(StrictModel):
    patch_size_zyx: ZYXInt = Field((32, 32, 32), description="patch size in voxels (z, y, x)")
    window_hu: tuple[float, float] = Field((-1000.0, 1000.0), description="HU window mapped to [0, 1]")

    @model_validator(mode="after")
    def _check(self) -> "PatchConfig":
        if any(s < 8 or s % 8 for s in self.patch_size_zyx):
            raise ValueError(f"patch_size_zyx must be multiples of 8 and >= 8, got {self.patch_size_zyx}")
        if self.window_hu[0] >= self.window_hu[1]:
            raise ValueError(f"window_hu must be (low, high) with low < high, got {self.window_hu}")
        return self


class ModelConfig(StrictModel):
    channels: tuple[int, ...] = Field((16, 32, 64), description="feature channels per UNet level")
    blocks_per_level: int = Field(1, ge=1, le=4, description="residual blocks per level")
    stem_stride: Literal[1, 2] = Field(
        1, description="2: strided first convolution, levels start at half resolution (CPU presets); "
                       "1: the first level runs at full resolution")
    time_embed_dim: int = Field(64, ge=8, description="timestep embedding width")
    guidance: Literal["none", "bodybox", "learned"] = Field(
        "bodybox", description="per-voxel body coordinates fed to the denoiser")
    guidance_encoding: Literal["raw", "sincos"] = Field("sincos", description="how coordinates are encoded")
    guidance_frequencies: int = Field(4, ge=1, le=16, description="sin/cos frequencies per axis")
    guidance_injection: Literal["concat", "film"] = Field("concat", description="how coordinates enter")
    guide_checkpoint: str | None = Field(
        None, description="learned guide: checkpoint path or runs:/<run_id> (guidance: learned)")

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        if not 2 <= len(self.channels) <= 6:
            raise ValueError(f"channels needs 2 to 6 levels, got {len(self.channels)}")
        if any(c % 8 for c in self.channels):
            raise ValueError(f"channels must be multiples of 8 (GroupNorm groups), got {self.channels}")
        if self.guidance == "learned" and not self.guide_checkpoint:
            raise ValueError("guidance: learned needs guide_checkpoint (a path or runs:/<run_id>)")
        return self


class DiffusionConfig(StrictModel):
    timesteps: int = Field(1000, ge=10, description="DDPM steps T")
    schedule: Literal["cosine", "linear"] = "cosine"
    prediction: Literal["epsilon", "v"] = "epsilon"


class ScalingConfig(StrictModel):
    num_workers: int | tuple[int, int] = Field(
        2, description="Ray Train workers, or (min, max) for elastic training on spot capacity")
    use_gpu: bool = Field(False, description="one GPU per worker, nccl, bf16 autocast")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs each worker reserves")

    @model_validator(mode="after")
    def _check(self) -> "ScalingConfig":
        n = self.num_workers
        lo, hi = (n, n) if isinstance(n, int) else n
        if lo < 1 or hi < lo:
            raise ValueError(f"num_workers must be >= 1, or (min, max) with 1 <= min <= max; got {n}")
        return self


# ------------------------------------------------------------------------------------------------- jobs
class SynthConfig(StrictModel):
    out: str = Field(..., description="output folder")
    n: int = Field(8, ge=1, description="number of phantoms")
    seed: int = Field(0, description="base seed; phantom i uses (seed, i)")
    format: Literal["nifti", "dicom"] = "nifti"
    labels: bool = Field(False, description="write BTCV labels + dataset.json (nnU-Net/MSD layout)")
    spacing_mm: float | None = Field(None, gt=0, description="force one in-plane/slice spacing (else scanner's)")
    workers: int = Field(0, ge=0, description="processes; 0 = all cores")


class PreprocessConfig(StrictModel):
    input: str = Field(..., description="input folder (NIfTI/NRRD/MHA files, DICOM series, BTCV or MSD layout)")
    output: str = Field(..., description="output folder for volumes/, labels/, masks/, manifest.parquet")
    target_spacing_zyx_mm: ZYX = Field((3.0, 3.0, 3.0), description="resampled spacing (z, y, x) in mm")
    body_threshold_hu: float = Field(-500.0, description="body mask threshold")
    max_voxels: int = Field(1_200_000_000, ge=1, description="reject headers claiming more voxels")
    num_cpus: int | None = Field(None, ge=1, description="CPUs for a local Ray instance (None = all)")
    readable_ids: bool = Field(
        False, description="opt in: item ids keep the file/folder name and the manifest lists input paths "
        "(public data only: exports are often named after the patient); default: keyed-hash ids, paths only in "
        "OUT/private/")
    tracking: TrackingConfig = TrackingConfig()
    log_to_mlflow: bool = Field(True, description="record the run (counts, params) in MLflow")

    @model_validator(mode="after")
    def _check(self) -> "PreprocessConfig":
        if any(s <= 0 or s > 20 for s in self.target_spacing_zyx_mm):
            raise ValueError(f"target_spacing_zyx_mm must be in (0, 20] mm, got {self.target_spacing_zyx_mm}")
        return self


class OptimConfig(StrictModel):
    steps: int = Field(200, ge=1, description="optimizer steps in total")
    batch_size: int = Field(2, ge=1, description="patches per worker per step")
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    warmup_steps: int = Field(20, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    ema_decay: float = Field(0.999, ge=0, lt=1)
    grad_accum_steps: int = Field(1, ge=1, description="micro-batches accumulated per optimizer step")


class ContrastiveConfig(StrictModel):
    """``objective: contrastive`` (vox2vec): voxel-level InfoNCE between two overlapping crops of a scan."""

    temperature: float = Field(0.1, gt=0, description="InfoNCE temperature (vox2vec: 0.1)")
    proj_dim: int = Field(128, ge=2, description="output width of the training-only projection head")
    voxels_per_view: int = Field(256, ge=2, description="positive voxel pairs sampled per crop pair")
    max_shift_fraction: float = Field(
        0.5, ge=0, le=0.75, description="view 2's corner moves up to this fraction of the patch per axis")


class ProbeConfig(StrictModel):
    """Online probe during pretraining (pipeline/evaluation/probe.py): a linear head on frozen features of a
    few labelled volumes, scored by Dice on others, logged as ``probe_dice_mean``."""

    data: str = Field(..., description="preprocessed labelled folder (manifest.parquet with label_path)")
    every: int = Field(200, ge=1, description="pretraining steps between probes (and one at the end)")
    fit_cases: int = Field(2, ge=1, description="volumes the head is fitted on (first by item id)")
    score_cases: int = Field(1, ge=1, description="volumes scored (the next ones by item id)")
    windows_per_volume: int = Field(8, ge=1, description="feature-bank windows per fitted volume")
    head_steps: int = Field(300, ge=1, description="linear head steps")
    timestep: int = Field(0, ge=0, description="diffusion timestep of the features")


class PretrainConfig(StrictModel):
    data: str = Field(..., description="preprocessed folder (holding manifest.parquet)")
    run_name: str = Field("pretrain", description="Ray run name; rerunning the same name resumes")
    storage_path: str = Field("runs", description="Ray Train storage (checkpoints): local folder or s3://")
    objective: Literal["diffusion", "restorative", "contrastive", "none"] = "diffusion"
    seed: int = 0
    patches: PatchConfig = PatchConfig()
    model: ModelConfig = ModelConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    optim: OptimConfig = OptimConfig()
    scaling: ScalingConfig = ScalingConfig()
    checkpoint_every: int = Field(50, ge=1, description="steps between checkpoints")
    max_failures: int = Field(2, ge=-1, description="worker-group restarts from the last checkpoint (-1: always)")
    registered_model: str | None = Field(
        "anatdiff-backbone", description="MLflow registered model for the final weights (alias 'final'); None: skip")
    log_every: int = Field(10, ge=1, description="steps between metric logs")
    sample_every: int = Field(0, ge=0, description="steps between DDIM sample PNGs logged to MLflow (0: off)")
    compile: bool = Field(False, description="torch.compile the denoiser (GPU runs)")
    max_seconds: float | None = Field(
        None, gt=0, description="wall-clock limit of the training loop: stop there (all workers at the same "
                                "step) and keep that checkpoint as the final model")
    probe: ProbeConfig | None = Field(None, description="online probe of the features (rank 0); None: off")
    num_cpus: int | None = Field(None, ge=1, description="CPUs for a local Ray instance (None = all)")
    tracking: TrackingConfig = TrackingConfig()
    contrastive: ContrastiveConfig = ContrastiveConfig()

    @model_validator(mode="after")
    def _check_contrastive(self) -> "PretrainConfig":
        size = self.patches.patch_size_zyx
        overlap = 1
        for n in size:
            overlap *= n - int(n * self.contrastive.max_shift_fraction)
        if self.objective == "contrastive" and self.contrastive.voxels_per_view > overlap:
            raise ValueError(f"contrastive.voxels_per_view must be at most {overlap} (the smallest overlap of two "
                             f"{tuple(size)} views shifted by max_shift_fraction {self.contrastive.max_shift_fraction}"
                             f"), got {self.contrastive.voxels_per_view}")
        return self

    @model_validator(mode="after")
    def _check(self) -> "PretrainConfig":
        multiple = self.model.stem_stride * 2 ** (len(self.model.channels) - 1)
        if any(s % multiple for s in self.patches.patch_size_zyx):
            raise ValueError(f"patches.patch_size_zyx must be multiples of {multiple} (model.stem_stride x "
                             f"2^(levels - 1)), got {self.patches.patch_size_zyx}")
        return self


class GuideModelConfig(StrictModel):
    channels: tuple[int, ...] = Field((16, 32, 64), description="encoder channels per level")
    stride: int = Field(4, description="output stride of the coordinate map (upsampled when used)")
    blocks_per_level: int = Field(1, ge=1, le=4)
    padding_mode: Literal["zeros", "replicate", "reflect"] = Field(
        "replicate", description="conv padding; zeros lets the net read its position in the crop")


class GuideAugmentConfig(StrictModel):
    """Intensity augmentation of the guide's crops (pipeline/guide/augment.py), on HU windowed to [0, 1].
    The defaults are the original mild recipe (``guide-tiny``); ``guide-real-tiny`` turns on the strong one
    (phantoms and real scans must look alike to the network)."""

    gamma_range: tuple[float, float] = Field((0.7, 1.5), description="random gamma")
    contrast_range: tuple[float, float] = Field((0.75, 1.25), description="contrast factor around the mean")
    noise_std_max: float = Field(0.05, ge=0, description="Gaussian noise sigma (window units), uniform up to it")
    blur_sigma_max_vox: float = Field(0.0, ge=0, description="Gaussian blur sigma in voxels, uniform up to it")
    shift_hu: float = Field(0.0, ge=0, description="whole-scan HU offset, uniform in +-shift_hu (calibration)")
    soft_tissue_boost_hu: float = Field(
        0.0, ge=0, description="contrast phase: voxels of -100..300 HU (enhancing soft tissue, vessels) gain up "
                               "to this many HU, smoothly weighted; 0 = off")


class GuideConfig(StrictModel):
    kind: Literal["coords", "bpr"] = Field(
        "coords", description="coords: 3-D coordinate guide (APE); bpr: 1-D body-part regression (one score "
                              "per axial slice, Yan et al. 2017), written as a (3, D, H, W) map with the body box "
                              "for y and x")
    data: str | tuple[str, ...] = Field(
        ..., description="preprocessed unlabelled folder(s) (manifest.parquet) to learn from, e.g. phantoms and "
                         "real CT")
    data_weights: tuple[float, ...] | None = Field(
        None, description="share of crop pairs drawn from each data folder; None: in proportion to its volumes")
    eval_data: str | tuple[str, ...] | None = Field(
        None, description="labelled folder(s) for the landmark score, each NAME=PATH or PATH (named eval<i>); "
                          "metrics per folder end in .NAME, the first folder's also without the suffix")
    real_data: str | tuple[str, ...] | None = Field(
        None, description="real CT folder(s) (labels not needed), NAME=PATH or PATH (named real<i>), for the "
                          "cranio-caudal check and the label-free consistency score")
    consistency_views: int = Field(
        4, ge=0, description="re-cropped, re-sampled views per scan of the label-free consistency score")
    run_name: str = Field("guide", description="Ray run name; rerunning the same name resumes")
    storage_path: str = Field("runs", description="Ray Train storage: local folder or s3://")
    seed: int = 0
    model: GuideModelConfig = GuideModelConfig()
    augment: GuideAugmentConfig = GuideAugmentConfig()
    crop_size_zyx: ZYXInt = Field((32, 32, 32), description="crop size in voxels (z, y, x)")
    spacing_range_mm: tuple[float, float] | tuple[tuple[float, float], tuple[float, float], tuple[float, float]] \
        | None = Field(None, description="crop spacing range in mm, (low, high) or one pair per axis (z, y, x); "
                                         "None: 0.75-1.5 x the volume spacing")
    max_shift_fraction: float = Field(
        0.5, ge=0, le=1, description="crop B's centre moves up to this fraction of half the smaller crop per axis")
    n_points: int = Field(128, ge=8, description="voxels sampled per crop for each loss")
    body_fraction: float = Field(0.5, ge=0, le=1, description="share of sampled voxels inside the body")
    consistency_weight: float = Field(1.0, ge=0)
    scan_end_probability: float = Field(
        0.0, ge=0, le=1, description="chance that one crop of a pair is cut as if the scan ended inside it "
                                     "(teaches invariance to where scans start and stop)")
    frame: Literal["axes", "rigid"] = Field("axes", description="axes: per-axis displacements; rigid: APE")
    bpr_slices: int = Field(8, ge=3, description="bpr: axial slices drawn per scan and step")
    bpr_slice_size: int = Field(64, ge=16, description="bpr: slices are resampled to this many pixels a side")
    bpr_min_view_fraction: float = Field(
        1.0, gt=0, le=1, description="bpr: half the training slices' in-plane crops show only a part of the body, "
                                     "down to this share per axis (fields of view that cut the body); 1: off")
    optim: OptimConfig = OptimConfig(steps=600, batch_size=2, lr=3e-3, warmup_steps=20)
    scaling: ScalingConfig = ScalingConfig()
    checkpoint_every: int = Field(200, ge=1)
    log_every: int = Field(20, ge=1)
    max_failures: int = Field(2, ge=-1)
    num_cpus: int | None = Field(None, ge=1)
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _check(self) -> "GuideConfig":
        multiple = self.model.stride * 2 ** (len(self.model.channels) - 1)
        if self.kind == "coords" and any(s % multiple for s in self.crop_size_zyx):
            raise ValueError(f"crop_size_zyx must be multiples of {multiple} (stride x 2^(levels-1)), "
                             f"got {self.crop_size_zyx}")
        folders = self.data_folders()
        if self.data_weights is not None and (len(self.data_weights) != len(folders)
                                              or any(w < 0 for w in self.data_weights)
                                              or sum(self.data_weights) <= 0):
            raise ValueError(f"data_weights must be {len(folders)} non-negative numbers (one per data folder) "
                             f"with a positive sum, got {self.data_weights}")
        self.named_folders("eval_data")
        self.named_folders("real_data")
        return self

    def data_folders(self) -> tuple[str, ...]:
        """``data`` as a tuple of folders."""
        return (self.data,) if isinstance(self.data, str) else tuple(self.data)

    def named_folders(self, field: str) -> dict[str, str]:
        """``eval_data`` / ``real_data`` as {name: folder}: NAME=PATH entries keep their name, a bare PATH is
        named ``eval<i>`` / ``real<i>``. Names are what MLflow metrics carry (never a path)."""
        value = getattr(self, field)
        entries = () if value is None else (value,) if isinstance(value, str) else tuple(value)
        out: dict[str, str] = {}
        for i, entry in enumerate(entries):
            name, sep, path = entry.partition("=")
            if not sep:
                name, path = f"{field.split('_')[0]}{i}", entry
            if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]{0,31}", name) or not path or name in out:
                raise ValueError(f"{field} entry {entry!r}: want NAME=PATH or PATH, NAME a unique word of letters, "
                                 f"digits, - or _ starting with a letter")
            out[name] = path
        return out


class FrozenHeadConfig(StrictModel):
    """How the linear / non-linear heads train on frozen features (a voxel feature bank, see
    pipeline/evaluation/features.py): the backbone runs once over sampled windows, then the head trains on
    the features of sampled voxels."""

    windows_per_volume: int = Field(32, ge=1, description="training windows per volume (organ-centred, "
                                                           "class-balanced, like the training patches)")
    voxels_per_window: int = Field(2048, ge=1, description="body voxels drawn uniformly in each window")
    voxels_per_organ: int = Field(256, ge=0, description="extra voxels of each organ present in a window")
    foreground_prob: float = Field(0.67, ge=0, le=1, description="share of windows centred on an organ voxel")
    jitter: float = Field(0.25, ge=0, le=0.5, description="organ voxel moved off the window centre by up to "
                                                          "this fraction of the window size per axis")
    steps: int = Field(2000, ge=1, description="head optimizer steps")
    batch_voxels: int = Field(4096, ge=1, description="feature vectors per step")
    lr: float = Field(2e-3, gt=0, description="peak learning rate (AdamW, warm-up then cosine)")
    hidden: int = Field(64, ge=4, description="non-linear head width")
    val_every: int = Field(500, ge=0, description="steps between validation Dice checks (0: at the end only)")


class AugmentConfig(StrictModel):
    """Random transforms of training patches (``pipeline/data/augment.py``): per-axis zoom and a rotation about
    the cranio-caudal axis (image, coordinates, label and mask together), then contrast, brightness and noise
    of the image. Ranges in the window's [0, 1] units (x 2,000 HU for the [-1000, 1000] window)."""

    p_spatial: float = Field(0.5, ge=0, le=1, description="share of patches zoomed and rotated")
    scale: tuple[PositiveFloat, PositiveFloat] = Field(
        (0.85, 1.15), description="per-axis zoom range (above 1: the patch sees more anatomy)")
    rotate_deg: float = Field(15.0, ge=0, le=45, description="rotation about z up to this many degrees either way")
    p_intensity: float = Field(0.5, ge=0, le=1, description="share of patches with contrast, brightness, noise")
    contrast: tuple[PositiveFloat, PositiveFloat] = Field(
        (0.85, 1.15), description="contrast factor range around the patch mean")
    shift: float = Field(0.025, ge=0, le=0.5, description="brightness shift up to this either way")
    noise_std: float = Field(0.015, ge=0, le=0.5, description="Gaussian noise std drawn in [0, noise_std]")

    @model_validator(mode="after")
    def _check(self) -> "AugmentConfig":
        for name in ("scale", "contrast"):
            low, high = getattr(self, name)
            if low > high:
                raise ValueError(f"{name} must be (low, high) with low <= high, got {getattr(self, name)}")
        return self


class NetworkTrainConfig(StrictModel):
    """Training of a whole network on patches: the finetune protocol, and the supervised ceiling (the same
    architecture from random initialization)."""

    steps: int = Field(2000, ge=1, description="optimizer steps")
    batch_size: int = Field(2, ge=1, description="patches per step")
    lr: float = Field(2e-3, gt=0, description="peak learning rate of the head (AdamW, warm-up then cosine)")
    backbone_lr_scale: float = Field(1.0, gt=0, le=1, description="backbone learning rate = lr x this")
    warmup_steps: int = Field(50, ge=0)
    foreground_prob: float = Field(0.67, ge=0, le=1, description="share of patches centred on an organ "
                                                                 "(organ drawn uniformly among those present)")
    jitter: float = Field(0.25, ge=0, le=0.5, description="organ voxel moved off the patch centre by up to "
                                                          "this fraction of the patch size per axis")
    head: Literal["linear", "nonlinear"] = Field("linear", description="head on the decoder's features")
    val_every: int = Field(250, ge=0, description="steps between validation Dice checks (0: at the end only)")
    max_seconds: float | None = Field(
        None, gt=0, description="wall-clock limit of one training: stop there and keep the best checkpoint")
    augment: AugmentConfig | None = Field(
        None, description="random zoom, rotation, contrast and noise of the training patches (None: off)")


class EvaluateConfig(StrictModel):
    data: str = Field(..., description="preprocessed labeled folder (manifest.parquet with label_path)")
    pretrain_run_id: str | None = Field(None, description="MLflow run id of the pretrain job")
    checkpoint: str | None = Field(None, description="or a model.pt path (wins over pretrain_run_id)")
    protocol: Literal["nonlinear", "linear", "finetune"] = Field(
        "nonlinear", description="linear / nonlinear head on frozen features, or finetune (all weights train)")
    feature_timesteps: tuple[int, ...] = Field((0,), description="diffusion timesteps features are taken at "
                                                "(0: the clean image; chosen on validation phantoms)")
    split: Literal["holdout", "kfold"] = Field(
        "holdout", description="holdout: one patient-level split (test_fraction); kfold: cross-validation")
    test_data: str | None = Field(
        None, description="another preprocessed labelled folder to test on (cross-dataset): every case of "
                          "'data' trains (less val_cases), every case of test_data is tested; split is ignored")
    folds: int = Field(5, ge=2, description="kfold: number of folds (KFold over patients, shuffled)")
    fold_seed: int = Field(42, description="kfold: KFold random_state (42 as vox2vec)")
    val_cases: int = Field(1, ge=0, description="validation patients per fold (taken from the non-test)")
    train_cases: int | None = Field(
        None, ge=1, description="keep only N training patients per fold (label-efficiency curves); None: all")
    test_fraction: float = Field(0.34, gt=0, lt=1, description="holdout: share of patients held out for Dice")
    head: FrozenHeadConfig = Field(FrozenHeadConfig(), description="linear / nonlinear protocols")
    finetune: NetworkTrainConfig = Field(
        NetworkTrainConfig(backbone_lr_scale=0.1), description="finetune protocol (pretrained weights)")
    ceiling: NetworkTrainConfig | None = Field(
        None, description="the supervised ceiling row: the same architecture from random initialization, "
                          "all weights trained on the training cases; None: no ceiling row")
    ceiling_guidance: Literal["none", "bodybox"] | None = Field(
        "none", description="coordinate input of the ceiling network: none (chosen on the tuning phantoms: "
                            "supervised training reached 0.525 mean Dice without coordinate channels, 0.408 with "
                            "the body-box ones, at 2,300 steps), bodybox, or null: as the pretrained model")
    loss: Literal["bce_dice", "dice_ce"] = Field(
        "dice_ce", description="dice_ce: softmax CE over background + organs + soft Dice (nnU-Net); "
                               "bce_dice: per-organ sigmoid BCE + soft Dice (vox2vec)")
    patch_size_zyx: ZYXInt | None = Field(None, description="default: the pretrain patch size")
    sw_overlap: float = Field(0.25, ge=0, lt=1, description="sliding-window overlap")
    island_fraction: float = Field(
        0.2, ge=0, le=1, description="post-processing of label maps before Dice: each organ's 26-connected "
                                     "components smaller than this fraction of its largest are removed (0: none; "
                                     "1: the largest component only; 0.2 chosen on the tuning phantoms' "
                                     "validation cases)")
    hd95: bool = Field(False, description="also compute the 95th-percentile Hausdorff distance (mm) per organ")
    overlays: int = Field(2, ge=0, description="prediction overlay PNGs logged (test cases of the first fold)")
    bank_cache: str | None = Field(
        None, description="folder keeping frozen-feature bank rows per volume and backbone, reused across folds, "
                          "protocols and label budgets (the study sets it); None: recomputed each time")
    compare_random_init: bool = Field(True, description="also evaluate the same protocol on random weights")
    gpus_per_task: float = Field(0.0, ge=0, description="GPUs each fold task reserves (0 on CPU machines)")
    seed: int = 0
    num_cpus: int | None = Field(None, ge=1)
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _check(self) -> "EvaluateConfig":
        if not self.feature_timesteps or any(t < 0 for t in self.feature_timesteps):
            raise ValueError(f"feature_timesteps must be one or more timesteps >= 0, got {self.feature_timesteps}")
        return self


class SegmenterConfig(StrictModel):
    """`anatdiff train-segmenter`: train the downstream model on ALL labelled cases (no test split), save it as a
    segmenter (pipeline/evaluation/segmenter.py), log and register it in MLflow."""

    data: tuple[str, ...] = Field(..., min_length=1, description="preprocessed labelled folders (all cases train)")
    pretrain_run_id: str | None = Field(None, description="MLflow run id of the pretrain job")
    checkpoint: str | None = Field(None, description="or a model.pt path (wins over pretrain_run_id)")
    protocol: Literal["nonlinear", "linear", "finetune"] = Field(
        "nonlinear", description="head on frozen features, or finetune (all weights train)")
    feature_timesteps: tuple[int, ...] = Field((0,), description="diffusion timesteps features are taken at "
                                                "(0: the clean image; chosen on validation phantoms)")
    head: FrozenHeadConfig = FrozenHeadConfig()
    finetune: NetworkTrainConfig = NetworkTrainConfig(backbone_lr_scale=0.1)
    loss: Literal["bce_dice", "dice_ce"] = "dice_ce"
    val_cases: int = Field(0, ge=0, description="cases (the last by item id) kept for validation Dice")
    patch_size_zyx: ZYXInt | None = Field(None, description="default: the pretrain patch size")
    sw_overlap: float = Field(0.25, ge=0, lt=1)
    island_fraction: float = Field(0.2, ge=0, le=1, description="post-processing the saved segmenter applies "
                                                                "to its label maps (as evaluate's)")
    registered_model: str | None = Field("anatdiff-segmenter", description="MLflow registered model; None: skip")
    alias: str = Field("current", pattern=r"^[A-Za-z][A-Za-z0-9_-]*$",
                       description="registry alias pointed at the new version ('latest' is reserved by MLflow)")
    gpus: float = Field(0.0, ge=0, description="GPUs of the training task (0 on CPU machines)")
    cpus: float = Field(1.0, gt=0, description="CPUs of the training task (its torch threads)")
    seed: int = 0
    num_cpus: int | None = Field(None, ge=1)
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _check(self) -> "SegmenterConfig":
        if self.alias.lower() == "latest":
            raise ValueError("alias 'latest' is reserved by the MLflow registry (models:/name/latest is the newest "
                             "version already); pick another alias, e.g. 'current' or 'candidate'")
        return self

    def evaluate_config(self) -> "EvaluateConfig":
        """The training settings as the ``EvaluateConfig`` the downstream functions take."""
        shared = ("protocol", "feature_timesteps", "head", "finetune", "loss", "patch_size_zyx", "sw_overlap",
                  "island_fraction", "seed", "tracking")
        return EvaluateConfig.model_validate({"data": self.data[0], "compare_random_init": False,
                                              **{k: getattr(self, k) for k in shared}})


class CompareConfig(StrictModel):
    run_ids: tuple[str, ...] = Field(..., min_length=1, description="evaluate run ids, or pretrain run ids "
                                     "whose evaluate runs are found by tag anatdiff.pretrain_run_id")
    protocol: Literal["nonlinear", "linear", "finetune"] | None = Field(
        None, description="keep evaluate runs of this protocol only; None: every protocol found")
    name: str = Field("compare", description="MLflow run name of the comparison")
    tracking: TrackingConfig = TrackingConfig()


class ExportConfig(StrictModel):
    run_id: str | None = Field(None, description="MLflow run id of a pretrain job")
    checkpoint: str | None = Field(None, description="or a model.pt path (guide.pt beside it is taken too)")
    out: str = Field(..., description="output folder of the self-contained export")
    registered_model: str | None = Field(
        "anatdiff-backbone-export", description="MLflow registered model for the export; None: skip")
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _check(self) -> "ExportConfig":
        if not self.run_id and not self.checkpoint:
            raise ValueError("export needs run_id (a pretrain run) or checkpoint (a model.pt path)")
        return self


#: model URIs ``anatdiff predict`` fetches from MLflow (anything else is a local folder)
MODEL_URI_FORMS = (r"runs:/[^/]+/.+", r"models:/[^/@]+@[^/@]+", r"models:/[^/@]+/\d+")


class PredictConfig(StrictModel):
    model: str = Field(..., description="the segmenter: runs:/<run_id>/<path>, models:/<name>@<alias>, "
                                        "models:/<name>/<version>, or a local folder holding a saved one")
    input: str = Field(..., description="one scan (NIfTI/NRRD/MHA), a folder of scans or DICOM series "
                                        "(BTCV and nnU-Net/MSD layouts too), or an s3:// / gs:// prefix")
    output: str = Field(..., description="output folder: <item_id>.nii.gz label maps, overlays/, "
                                         "predictions.csv, organ_volumes.csv, report.json")
    max_voxels: int = Field(1_200_000_000, ge=1, description="reject headers claiming more voxels")
    overlays: bool = Field(True, description="write overlays/<item_id>.png (three planes) per scan")
    dicom_seg: bool = Field(
        False, description="also write <item_id>.seg.dcm (DICOM SEG, highdicom) for DICOM series inputs; it "
                           "carries the series' patient and study identifiers, as a SEG must")
    num_actors: int | None = Field(
        None, ge=1, description="model replicas (Ray actors); None: one per GPU, else one per cpus_per_actor CPUs")
    gpus_per_actor: float | None = Field(
        None, ge=0, description="GPUs each actor holds; None: 1 where the cluster has GPUs, else 0 (0.25-0.5 "
                                "lets reading and restoring of one scan overlap another's inference)")
    cpus_per_actor: float = Field(1.0, gt=0, description="CPUs each actor reserves (its torch threads)")
    num_cpus: int | None = Field(None, ge=1, description="CPUs for a local Ray instance (None = all)")
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _check(self) -> "PredictConfig":
        if self.model.startswith(("runs:", "models:")) and not any(re.fullmatch(f, self.model)
                                                                   for f in MODEL_URI_FORMS):
            raise ValueError(f"model '{self.model}' is not runs:/<run_id>/<path>, models:/<name>@<alias> or "
                             "models:/<name>/<version>")
        return self


STUDY_VARIANTS = ("random_init", "restorative", "contrastive", "unguided", "guided_bodybox", "guided_learned",
                  "guided_bpr")


class StudyConfig(StrictModel):
    workdir: str = Field("anatdiff-study", description="where corpora, volumes and checkpoints go")
    n_unlabeled: int = Field(16, ge=2, description="phantoms in the unlabelled pretraining corpus")
    n_labeled: int = Field(10, ge=3, description="labelled phantoms for the downstream evaluation")
    seed: int = 0
    target_spacing_zyx_mm: ZYX = Field((3.0, 3.0, 3.0), description="preprocess spacing (z, y, x) mm")
    variants: tuple[Literal[STUDY_VARIANTS], ...] = Field(
        STUDY_VARIANTS, min_length=1, description="pretraining variants, all with the same budget (guided_learned: "
                                                  "the 3-D coordinate guide; guided_bpr: a body-part regression "
                                                  "guide, the guide preset with kind: bpr)")
    protocols: tuple[Literal["nonlinear", "linear", "finetune"], ...] = Field(
        ("linear", "nonlinear", "finetune"), min_length=1, description="evaluation protocols")
    train_cases: tuple[int | Literal["all"], ...] = Field(
        (1, 2, "all"), min_length=1, description="training patients per fold (label-efficiency curve); 'all'")
    ceiling: dict[str, Any] | None = Field(
        default_factory=dict, description="the supervised ceiling: overrides of the evaluate preset's finetune "
                                          "settings for the random-init network, all weights (None: no ceiling)")
    ceiling_steps: dict[int | Literal["all"], PositiveInt] = Field(
        default_factory=dict, description="the ceiling's optimizer steps per label budget (train_cases value -> "
                                          "steps), overriding ceiling.steps there: one or two patients converge "
                                          "in far fewer steps than all of them")
    guide_preset: str = Field("guide-tiny", description="train-guide preset or YAML file")
    pretrain_preset: str = Field("pretrain-tiny", description="pretrain preset or YAML file (one budget)")
    evaluate_preset: str = Field("evaluate-kfold-tiny", description="evaluate preset or YAML file")
    guide: dict[str, Any] = Field(default_factory=dict, description="overrides of the guide preset")
    pretrain: dict[str, Any] = Field(default_factory=dict, description="overrides of the pretrain preset")
    evaluate: dict[str, Any] = Field(default_factory=dict, description="overrides of the evaluate preset")
    num_cpus: int | None = Field(None, ge=1, description="CPUs for a local Ray instance (None = all)")
    tracking: TrackingConfig = TrackingConfig()


class DemoConfig(StrictModel):
    workdir: str = Field("anatdiff-demo", description="where the corpus, volumes and checkpoints go")
    n_unlabeled: int = Field(48, ge=2, description="phantoms in the unlabelled corpus (guide and pretraining)")
    n_labeled: int = Field(9, ge=3, description="labelled phantoms for the downstream evaluation")
    n_probe: int = Field(3, ge=0, description="extra labelled phantoms for the online probe during pretraining "
                                              "(n - 1 fit its head, 1 is scored; 0 or >= 2) "
                                              "(never the evaluation's); 0: no probe")
    seed: int = 0
    target_spacing_zyx_mm: ZYX = Field((3.0, 3.0, 3.0), description="preprocess spacing (z, y, x) mm")
    guidance: Literal["none", "bodybox", "learned"] = Field(
        "learned", description="learned: train the coordinate guide first, then pretrain guided by it")
    real_ct: str | None = Field("tests/data/real-ct", description="real CT: the guide's check, the segmenter's "
                                                                 "real training case and the scans predicted")
    guide_preset: str = Field(
        "guide-real-tiny", description="train-guide preset or YAML file (guide-real-tiny: phantoms + real CT; "
                                       "guide-tiny for phantoms only)")
    guide_real_share: float = Field(
        0.2, ge=0, lt=1, description="share of the guide's crop pairs cut from the real unlabelled chest CTs "
                                    "(real_ct/chest; the real abdomen stays held out for the guide's scores); "
                                    "0: phantoms only")
    guide: dict[str, Any] = Field(default_factory=dict, description="overrides of the guide preset")
    pretrain_preset: str = Field("pretrain-tiny", description="pretrain preset or YAML file")
    evaluate_preset: str = Field("evaluate-tiny", description="evaluate preset or YAML file")
    segmenter_preset: str | None = Field(
        "segmenter-tiny", description="train-segmenter preset (all labelled data, registered, then predict on "
                                      "the real scans); None: skip those stages")
    pretrain: dict[str, Any] = Field(default_factory=dict, description="overrides of the pretrain preset")
    evaluate: dict[str, Any] = Field(default_factory=dict, description="overrides of the evaluate preset")
    segmenter: dict[str, Any] = Field(default_factory=dict, description="overrides of the segmenter preset")
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _check(self) -> "DemoConfig":
        if self.n_probe == 1:
            raise ValueError("n_probe must be 0 (no online probe) or >= 2 (n - 1 phantoms fit the probe's head, "
                             "1 is scored)")
        return self


# ----------------------------------------------------------------------------------------------- loading
CONFIG_DIR = Path(__file__).resolve().parent.parent / "jobs" / "configs"


def format_validation_error(err: ValidationError, source: str) -> str:
    """One line per problem: ``source: field a.b: message (got value)``."""
    lines = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field; remove it or check its spelling"
        elif e["type"] == "missing":
            msg = "required field is missing"
        got = "" if e["type"] in ("missing",) else f" (got {e.get('input')!r})"
        if e["type"] == "extra_forbidden" or not e["loc"]:     # a whole-model check: its message names the field
            got = ""
        lines.append(f"{source}: field '{field}': {msg}{got}")
    return "\n".join(lines)


def deep_update(base: dict, updates: dict) -> dict:
    out = dict(base)
    for k, v in updates.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_update(out[k], v)
        else:
            out[k] = v
    return out


def resolve_preset(name_or_path: str | Path) -> Path:
    """A YAML path, or the name of a preset under ``jobs/configs`` (with or without ``.yaml``)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    for cand in (CONFIG_DIR / f"{name_or_path}.yaml", CONFIG_DIR / str(name_or_path)):
        if cand.is_file():
            return cand
    known = ", ".join(sorted(f.stem for f in CONFIG_DIR.glob("*.yaml")))
    raise UserError(f"config '{name_or_path}' is neither a file nor a preset (presets: {known})")


def load_config(model: type[StrictModel], path: str | Path | None = None,
                overrides: dict[str, Any] | None = None) -> StrictModel:
    """Read a YAML file (or preset name), apply ``overrides`` (nested dict), validate into ``model``."""
    data: dict[str, Any] = {}
    source = "config"
    if path is not None:
        file = resolve_preset(path)
        source = str(file)
        try:
            data = yaml.safe_load(file.read_text()) or {}
        except yaml.YAMLError as e:
            raise UserError(f"{file}: not valid YAML: {e}".replace("\n", " ")) from None
        if not isinstance(data, dict):
            raise UserError(f"{file}: the top level must be a mapping of field: value")
    if overrides:
        data = deep_update(data, overrides)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise UserError(format_validation_error(e, source)) from None


def parse_set_overrides(items: list[str] | None) -> dict[str, Any]:
    """``["optim.steps=10", "model.guidance=none"]`` -> nested dict with YAML-typed values."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise UserError(f"--set expects key=value (e.g. optim.steps=10), got '{item}'")
        key, raw = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(raw)
    return out


def dump_config(cfg: StrictModel, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
