"""SimulationSettings from the `simulate` PHIL scope (phil/simulate.phil)."""

from __future__ import annotations

from .settings import SimulationSettings


def settings_from_phil(scope) -> SimulationSettings:
    """scope: the extracted `simulate` PHIL object."""
    c, i, r, s, m, n = (scope.crystal, scope.instrument, scope.rotation, scope.stills,
                        scope.scale_model, scope.noise)
    model = m.model
    if model in (None, "auto") or scope.mode == "stills":
        # stills imply the per-image KB truth; a rotation model given with stills is
        # rejected by SimulationSettings.validate
        model = "KB" if scope.mode == "stills" and model in (None, "auto") else model
        model = "physical" if model in (None, "auto") else model
    n_stills = s.n_images
    if scope.mode == "stills" and n_stills is None:
        n_stills = r.n_images  # the n_images= shorthand (an alias of rotation.n_images)
    return SimulationSettings(
        mode=scope.mode,
        seed=scope.seed,
        n_obs_target=scope.n_obs_target,
        space_group=c.space_group,
        unit_cell=tuple(c.unit_cell),
        orientation=tuple(c.orientation) if c.orientation else None,
        d_min=c.d_min,
        wilson_b=c.wilson_b,
        anomalous=c.anomalous,
        bijvoet_ratio=c.bijvoet_ratio,
        true_intensities=c.true_intensities,
        structure_n_atoms=c.structure_n_atoms,
        k_sol=c.k_sol,
        b_sol=c.b_sol,
        wavelength=i.wavelength,
        polarization_fraction=i.polarization_fraction,
        distance_mm=i.distance,
        pixel_size_mm=i.pixel_size,
        image_size=tuple(i.image_size),
        sensor_thickness_mm=i.sensor_thickness,
        sensor_mu_per_mm=i.sensor_mu,
        n_sweeps=r.n_sweeps,
        multiplicity=r.multiplicity,
        n_images=r.n_images,
        osc_start_deg=r.osc_start,
        osc_width_deg=r.osc_width,
        mosaicity_deg=r.mosaicity,
        split_fraction=r.split_fraction,
        n_stills=n_stills,
        still_mosaic_half_deg=s.mosaic_half_deg,
        still_domain_size_a=s.domain_size,
        still_min_partiality=s.min_partiality,
        model=model,
        scale_variation=m.scale_variation,
        sweep_scale_sigma=m.sweep_scale_sigma,
        dose_b_per_sweep=m.dose_b_per_sweep,
        b_sigma=m.b_sigma,
        absorption=m.absorption,
        absorption_strength=m.absorption_strength,
        lmax=m.lmax,
        n_resolution_bins=m.n_resolution_bins,
        n_absorption_bins=m.n_absorption_bins,
        kb_b_sigma=m.kb_b_sigma,
        mean_i_over_sigma=n.mean_i_over_sigma,
        background_per_pixel=n.background_per_pixel,
        outlier_fraction=n.outlier_fraction,
        error_model_a=n.error_model_a,
        error_model_b=n.error_model_b,
        prf_failure_fraction=n.prf_failure_fraction,
        position_sigma_px=n.position_sigma_px,
        damage_sweep=n.damage_sweep,
        damage_last_fraction=n.damage_last_fraction,
        damage_sd=n.damage_sd,
    )
