# DVPT prompt tuning of a frozen ViT and the adaptation-method comparison (issue 6).
