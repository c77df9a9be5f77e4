# Prostate bpMRI: CSwin-UNet, self-supervised pretraining, patient-level cross-validation (issue 8).
