"""Every knob of the simulator, with defaults (the PHIL scope phil/simulate.phil mirrors it)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Optional, Tuple

LYSOZYME_CELL = (79.1, 79.1, 37.9, 90.0, 90.0, 90.0)


@dataclass
class SimulationSettings:
    mode: str = "rotation"  # rotation | stills
    seed: int = 0
    # Total number of observations wanted (approximately). When set, the unit cell is scaled
    # isotropically (shape kept) so that multiplicity x unique reflections reaches it.
    n_obs_target: Optional[int] = None

    # crystal and true intensities
    space_group: str = "P 43 21 2"
    unit_cell: Tuple[float, ...] = LYSOZYME_CELL
    orientation: Optional[Tuple[float, ...]] = None  # U, 9 numbers row-major; None = random per crystal
    d_min: float = 2.0
    wilson_b: float = 20.0  # overall B fall-off of the true intensities (A^2)
    anomalous: bool = False
    bijvoet_ratio: float = 0.05  # sd of (I+ - I-) / (I+ + I-) for acentric reflections
    # wilson | random_structure | path of a .pdb/.cif model: true intensities |F_model|^2
    # (bulk solvent k_sol, b_sol) instead of Wilson draws; a file sets space group and cell
    true_intensities: str = "wilson"
    structure_n_atoms: int = 300
    k_sol: float = 0.35
    b_sol: float = 46.0

    # instrument
    wavelength: float = 0.9795
    polarization_fraction: float = 0.999
    distance_mm: Optional[float] = None  # None: d_min at the panel edge
    pixel_size_mm: float = 0.172
    image_size: Tuple[int, int] = (2463, 2527)
    sensor_thickness_mm: float = 0.45
    sensor_mu_per_mm: float = 3.96

    # rotation data
    n_sweeps: int = 3
    multiplicity: float = 6.0  # mean observations per unique reflection (sets the sweep width)
    n_images: Optional[int] = None  # per sweep; None: from multiplicity
    osc_start_deg: float = 0.0
    osc_width_deg: float = 0.5
    mosaicity_deg: float = 0.1  # rocking width sigma_m; a spot spans ~ sigma_m / |zeta| in phi
    split_fraction: float = 0.05  # fraction of multi-image reflections split into two partials

    # stills
    n_stills: Optional[int] = None  # None: from n_obs_target, else 100
    still_mosaic_half_deg: float = 0.05
    still_domain_size_a: float = 2000.0
    still_min_partiality: float = 0.1

    # true scale model
    model: str = "physical"  # physical | array | KB | dose_decay
    scale_variation: float = 0.1  # sd of the log scale random walk along the sweep
    sweep_scale_sigma: float = 0.2  # sd of log overall scale between sweeps / stills
    dose_b_per_sweep: float = 4.0  # B decreases by this much (A^2) from start to end of a sweep
    b_sigma: float = 1.0  # sd of the per-sweep B offset and of the smooth B noise (A^2)
    absorption: str = "auto"  # auto (as DIALS: only for sweeps > 60 deg) | on | off
    absorption_strength: float = 0.03  # sd of C_l1..; C_lm sd = strength / l
    lmax: int = 4
    n_resolution_bins: int = 10  # array model
    n_absorption_bins: int = 5  # array model
    kb_b_sigma: float = 3.0  # KB and stills: sd of the per-experiment B (A^2)

    # noise
    mean_i_over_sigma: float = 10.0  # mean over all observations of the expected I/sigma
    background_per_pixel: float = 0.5  # counts per pixel per image
    outlier_fraction: float = 0.0
    error_model_a: float = 1.0  # true noise = a^2 (sigma^2 + (b I)^2), sigma as reported
    error_model_b: float = 0.0
    prf_failure_fraction: float = 0.002
    position_sigma_px: float = 0.3

    # radiation damage that no smooth scale model can follow (for per-batch analysis tests):
    # over the last damage_last_fraction of the images of sweep damage_sweep (1-based; 0 =
    # none), every observation's true scale is multiplied by exp(damage_sd * N(0, 1)), a
    # different factor per observation.
    damage_sweep: int = 0
    damage_last_fraction: float = 0.1
    damage_sd: float = 0.5

    def as_dict(self):
        return asdict(self)

    @classmethod
    def from_mapping(cls, values) -> "SimulationSettings":
        names = {f.name for f in fields(cls)}
        unknown = set(values) - names
        if unknown:
            raise TypeError(f"unknown simulation settings: {sorted(unknown)}")
        return cls(**values)

    def validate(self) -> None:
        from ..errors import PhilError

        def bad(name, why):
            raise PhilError(f"simulate.{name}={getattr(self, name)!r}: {why}")

        if self.mode not in ("rotation", "stills"):
            bad("mode", "must be rotation or stills")
        if self.model not in ("physical", "array", "KB", "dose_decay"):
            bad("model", "must be physical, array, KB or dose_decay")
        if self.mode == "stills" and self.model != "KB":
            bad("model", "stills data are simulated with a per-image KB model (model=KB)")
        if self.d_min <= 0 or self.wavelength / (2 * self.d_min) >= 0.7:
            bad("d_min", "must be positive and reachable at this wavelength (2 theta < ~90 deg)")
        if self.true_intensities not in ("wilson", "random_structure"):
            import os

            if not os.path.isfile(self.true_intensities):
                bad("true_intensities", "must be wilson, random_structure or a model file")
            if self.mode == "rotation" and self.n_obs_target:
                bad("n_obs_target", "cannot rescale the cell of a model file (use n_images)")
        if len(self.unit_cell) != 6:
            bad("unit_cell", "needs six numbers a b c alpha beta gamma")
        if self.orientation is not None and len(self.orientation) != 9:
            bad("orientation", "needs nine numbers (U, row-major)")
        if self.n_sweeps < 1:
            bad("n_sweeps", "must be at least 1")
        if self.multiplicity <= 0:
            bad("multiplicity", "must be positive")
        if not 0 <= self.outlier_fraction < 1:
            bad("outlier_fraction", "must be in [0, 1)")
        if not 0 <= self.split_fraction <= 1:
            bad("split_fraction", "must be in [0, 1]")
        if self.damage_sweep < 0 or self.damage_sweep > self.n_sweeps:
            bad("damage_sweep", "must be 0 (none) or a sweep number 1..n_sweeps")
        if not 0 < self.damage_last_fraction <= 1 or self.damage_sd < 0:
            bad("damage_last_fraction", "must be in (0, 1], with damage_sd >= 0")
        if self.mean_i_over_sigma <= 0:
            bad("mean_i_over_sigma", "must be positive")
        if self.osc_width_deg <= 0:
            bad("osc_width_deg", "must be positive")
        if self.absorption not in ("auto", "on", "off"):
            bad("absorption", "must be auto, on or off")
        if not 1 <= self.lmax <= 10:
            bad("lmax", "must be between 1 and 10")
        if self.n_obs_target is not None and self.n_obs_target < 100:
            bad("n_obs_target", "must be at least 100")
