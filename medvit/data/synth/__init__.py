"""Synthetic medical imaging studies: real files plus a Contract-1 manifest.

Four modalities mirror the systems medvit reproduces:

* ``xray``: chest radiographs with multi-label findings (PNG 8/16-bit and DICOM CR/DX).
* ``brain``: axial MRI slices (16-bit PNG) with tumour labels and YOLO boxes.
* ``prostate``: 3-channel bpMRI volumes (T2w/ADC/HBV NIfTI) with a lesion mask.
* ``histo``: H&E-like RGB patches with benign/malignant labels and four subtypes.

Every study is learnable but not trivial: patients differ in nuisance factors (position,
size, contrast, stain, noise, scanner), lesion contrast ranges from obvious to barely
visible, there are lesion mimics and (for ``xray``) a little label noise. A study is a
pure function of ``(modality, n_patients, seed, image_size)``: the same arguments write the
same files byte for byte. Patient ``i`` draws from its own random stream, so its anatomy
does not change when ``n_patients`` changes (study-level assignments such as which
patients are positive do).

The user documentation (contents, signal, sizes, timings) is ``docs/synthetic.md``.

Modules: :mod:`.study` (:func:`synthesize`, argument checks, manifest and ``synth.json``), one
generator per modality (:mod:`.xray`, :mod:`.brain`, :mod:`.prostate`, :mod:`.histo`), and what
they share: :mod:`.common` (samples, file writers) and :mod:`.shapes` (geometry, noise).
"""

from medvit.data.synth.histo import HISTO_MAGNIFICATIONS, HISTO_SUBTYPES
from medvit.data.synth.prostate import PROSTATE_FOV_MM
from medvit.data.synth.study import (
    DEFAULT_IMAGE_SIZE,
    MAX_IMAGE_SIZE,
    MIN_IMAGE_SIZE,
    MIN_PATIENTS,
    MODALITIES,
    PROGRESS_MIN_PATIENTS,
    SITES,
    SynthError,
    synthesize,
)
from medvit.data.synth.xray import XRAY_FINDINGS

__all__ = [
    "MODALITIES",
    "DEFAULT_IMAGE_SIZE",
    "MIN_IMAGE_SIZE",
    "MAX_IMAGE_SIZE",
    "MIN_PATIENTS",
    "XRAY_FINDINGS",
    "HISTO_SUBTYPES",
    "HISTO_MAGNIFICATIONS",
    "PROSTATE_FOV_MM",
    "SITES",
    "PROGRESS_MIN_PATIENTS",
    "SynthError",
    "synthesize",
]
