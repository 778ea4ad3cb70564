"""The entropy on E: estimators, the measurement along a Δθ, the probe, the sweep, the decomposition and the predictors."""
