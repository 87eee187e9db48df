"""Scanner profiles, fields of view, contrast phases, tissue HU tables and the acquisition model.

The acquisition model turns the painted HU volume into what a scanner reconstructs: in-plane blur of the
reconstruction kernel, partial-volume blur across the slice thickness, kernel-shaped correlated noise, a small
calibration offset, the reconstruction circle, then int16 HU.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy.ndimage import gaussian_filter

NOMINAL_SPACING_MM = 3.0
CONTRAST_PHASES: tuple[str, ...] = ("none", "arterial", "portal_venous")
FOVS: tuple[str, ...] = ("chest", "abdomen_pelvis", "chest_abdomen_pelvis", "upper_abdomen")
_FOV_PROBS = (0.25, 0.3, 0.25, 0.2)
_PHASE_PROBS = (0.35, 0.2, 0.45)


@dataclass(frozen=True)
class ScannerProfile:
    """One scanner + reconstruction kernel. Spacings are factors of the nominal spacing (3 mm by default)."""

    name: str
    manufacturer: str          # DICOM (0008,0070)
    model: str                 # DICOM (0008,1090)
    kernel: str                # DICOM (0018,1210)
    kvp: int                   # DICOM (0018,0060)
    noise_sd_hu: float         # noise SD in uniform soft tissue at 3 mm slices
    psf_sigma_mm: float        # in-plane Gaussian blur of the kernel (smaller = sharper)
    inplane_factor: float      # in-plane spacing = factor x nominal
    thickness_factor: float    # slice thickness (= slice spacing) = factor x nominal
    hu_offset: float           # calibration offset added to every voxel
    low_dose: bool = False     # lung screening protocol: no contrast, mostly chest

    def as_dict(self) -> dict:
        return asdict(self)


PROFILES: tuple[ScannerProfile, ...] = (
    ScannerProfile("siemens_as_b30f", "SIEMENS", "SOMATOM Definition AS", "B30f", 120, 12.0, 1.1, 0.9, 1.0, 2.0),
    ScannerProfile("siemens_as_b70f", "SIEMENS", "SOMATOM Definition AS", "B70f", 120, 35.0, 0.45, 0.9, 0.67, 2.0),
    ScannerProfile("siemens_force_br38f", "SIEMENS", "SOMATOM Force", "Br38f", 100, 10.0, 0.9, 0.8, 0.67, -1.0),
    ScannerProfile("siemens_mct_b30f", "SIEMENS", "Biograph mCT", "B30f", 120, 22.0, 1.3, 1.2, 1.67, 4.0),
    ScannerProfile("ge_vct_standard", "GE MEDICAL SYSTEMS", "LightSpeed VCT", "STANDARD", 120, 14.0, 1.0, 1.0,
                   1.67, 0.0),
    ScannerProfile("ge_revolution_lung", "GE MEDICAL SYSTEMS", "Revolution CT", "LUNG", 100, 38.0, 0.5, 1.0,
                   0.67, -3.0, low_dose=True),
    ScannerProfile("philips_brilliance_b", "Philips", "Brilliance 64", "B", 120, 15.0, 1.0, 1.1, 1.0, 3.0),
    ScannerProfile("philips_iqon_yb", "Philips", "IQon", "YB", 120, 30.0, 0.6, 0.85, 0.67, -2.0),
    ScannerProfile("toshiba_aquilion_fc08", "TOSHIBA", "Aquilion ONE", "FC08", 120, 11.0, 1.2, 1.0, 1.0, 1.0),
    ScannerProfile("toshiba_aquilion_fc52", "TOSHIBA", "Aquilion ONE", "FC52", 120, 36.0, 0.5, 0.95, 0.67, 1.0),
)
PROFILES_BY_NAME: dict[str, ScannerProfile] = {p.name: p for p in PROFILES}

#: Tissue HU ranges (low, high) by contrast phase; each patient draws one value per tissue uniformly.
_COMMON = {
    "skin": (30, 50), "fat": (-120, -80), "muscle": (35, 55), "lung": (-870, -800), "gas": (-990, -900),
    "bone_cortex": (700, 1200), "bone_cancellous": (150, 350), "disc": (70, 110), "csf": (5, 20),
    "cartilage": (100, 160), "bile": (0, 20), "urine": (0, 15), "stomach_fluid": (0, 20),
    "bowel_content": (5, 30), "table_shell": (150, 300), "table_foam": (-950, -850),
}
_PHASES = {
    "none": {"spleen": (45, 50), "kidney_cortex": (30, 35), "kidney_medulla": (30, 35), "liver": (55, 65),
             "pancreas": (40, 50), "adrenal": (10, 30), "aorta": (35, 45), "ivc": (35, 45), "portal": (35, 45),
             "heart_blood": (35, 45), "myocardium": (40, 50), "gut_wall": (35, 45), "esophagus": (35, 45),
             "bowel": (25, 40)},
    "arterial": {"spleen": (100, 130), "kidney_cortex": (180, 250), "kidney_medulla": (60, 100),
                 "liver": (65, 80), "pancreas": (100, 130), "adrenal": (40, 60), "aorta": (250, 350),
                 "ivc": (60, 90), "portal": (90, 130), "heart_blood": (250, 350), "myocardium": (90, 120),
                 "gut_wall": (70, 100), "esophagus": (50, 70), "bowel": (40, 60)},
    "portal_venous": {"spleen": (110, 130), "kidney_cortex": (150, 200), "kidney_medulla": (120, 160),
                      "liver": (100, 120), "pancreas": (90, 110), "adrenal": (40, 60), "aorta": (150, 180),
                      "ivc": (110, 130), "portal": (150, 180), "heart_blood": (140, 170),
                      "myocardium": (90, 110), "gut_wall": (70, 90), "esophagus": (50, 70), "bowel": (40, 60)},
}


def tissue_hu_ranges(phase: str) -> dict[str, tuple[float, float]]:
    """HU range per tissue for a contrast phase (``CONTRAST_PHASES``)."""
    if phase not in _PHASES:
        raise ValueError(f"contrast phase '{phase}' is unknown; allowed: {', '.join(CONTRAST_PHASES)}")
    return {**_COMMON, **_PHASES[phase]}


def sample_tissue_hu(rng: np.random.Generator, phase: str) -> dict[str, float]:
    """One HU value per tissue (uniform within its range), rounded to 0.1 HU."""
    return {k: round(float(rng.uniform(lo, hi)), 1) for k, (lo, hi) in tissue_hu_ranges(phase).items()}


def choose(rng: np.random.Generator, options: tuple[str, ...], probs, forced: str | None, what: str) -> str:
    """A random option by ``probs``, or ``forced`` after checking it is one of ``options``."""
    pick = options[int(rng.choice(len(options), p=probs))]   # always drawn: keeps the random stream stable
    if forced is None:
        return pick
    if forced not in options:
        raise ValueError(f"{what} '{forced}' is unknown; allowed: {', '.join(options)}")
    return forced


def sample_protocol(rng: np.random.Generator, scanner: str | None = None, fov: str | None = None,
                    contrast: str | None = None) -> tuple[ScannerProfile, str, str]:
    """Scanner profile, field of view and contrast phase (each may be forced by name)."""
    names = tuple(PROFILES_BY_NAME)
    profile = PROFILES_BY_NAME[choose(rng, names, np.full(len(names), 1 / len(names)), scanner, "scanner")]
    fov_probs = (0.7, 0.1, 0.1, 0.1) if profile.low_dose else _FOV_PROBS
    phase_probs = (1.0, 0.0, 0.0) if profile.low_dose else _PHASE_PROBS
    return (profile, choose(rng, FOVS, fov_probs, fov, "fov"),
            choose(rng, CONTRAST_PHASES, phase_probs, contrast, "contrast phase"))


def scan_spacing_zyx_mm(profile: ScannerProfile, spacing_mm: float | None) -> tuple[float, float, float]:
    """(slice spacing = thickness, row, column) spacing in mm: exact ``spacing_mm`` if given, else the profile's."""
    if spacing_mm is not None:
        if not spacing_mm > 0:
            raise ValueError(f"spacing_mm must be > 0 mm (or None for the scanner's), got {spacing_mm}")
        return (float(spacing_mm),) * 3
    inplane = round(NOMINAL_SPACING_MM * profile.inplane_factor, 3)
    return (round(NOMINAL_SPACING_MM * profile.thickness_factor, 3), inplane, inplane)


def acquire(hu_zyx: np.ndarray, rng: np.random.Generator, profile: ScannerProfile,
            spacing_zyx_mm: tuple[float, float, float], fov_radius_mm: float) -> np.ndarray:
    """Scanner model on a painted volume.

    Args:
        hu_zyx: (z, y, x) float32 ideal HU; modified in place.
        spacing_zyx_mm: voxel spacing; the slice thickness is the z spacing.
        fov_radius_mm: reconstruction circle radius around the volume's in-plane centre; outside is -1024.
    Returns:
        (z, y, x) int16 HU clipped to [-1024, 3071].
    """
    sz, sy, sx = spacing_zyx_mm
    # partial volume across a slice of thickness sz (box of width sz ~ Gaussian sigma sz/sqrt(12)) + kernel PSF
    sigma = (1.0 / np.sqrt(12.0), profile.psf_sigma_mm / sy, profile.psf_sigma_mm / sx)
    blurred = gaussian_filter(hu_zyx, sigma=sigma, output=np.float32, truncate=3.0)
    noise = rng.standard_normal(hu_zyx.shape, dtype=np.float32)
    corr = max(0.2, 0.8 * profile.psf_sigma_mm / sx)   # noise grain follows the kernel's blur
    noise = gaussian_filter(noise, sigma=(0.0, corr, corr), output=np.float32, truncate=3.0)
    target_sd = profile.noise_sd_hu * np.sqrt(NOMINAL_SPACING_MM / sz)
    blurred += noise * np.float32(target_sd / max(float(noise[::4, ::4, ::4].std()), 1e-6))
    blurred += np.float32(profile.hu_offset)
    ny, nx = hu_zyx.shape[1:]
    yy = (np.arange(ny, dtype=np.float32) - (ny - 1) / 2) * sy
    xx = (np.arange(nx, dtype=np.float32) - (nx - 1) / 2) * sx
    outside = yy[:, None] ** 2 + xx[None, :] ** 2 > fov_radius_mm ** 2
    blurred[:, outside] = -1024.0
    np.rint(blurred, out=blurred)
    return np.clip(blurred, -1024, 3071).astype(np.int16)
