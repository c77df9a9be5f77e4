# Brain MRI: YOLOv8 detection, patient-to-patient evaluation, DeiT distillation (issue 7).
