"""Write predicted volumes back in the input's space, so they open in any viewer on top of
the input: NIfTI with the input's affine (and voxel grid), and DICOM SEG (highdicom)
referencing the input series when the input was DICOM.

Models see volumes as :func:`medvit.data.io.read_image` returns them: channel-first
``(C, D, H, W)`` where (D, H, W) is (z, y, x) of the closest canonical (RAS) orientation for
NIfTI, resized to the model grid by the loading transform. :func:`to_input_grid` undoes the
resize; :func:`save_nifti_like` undoes the canonical reorientation and writes the input's
affine; :func:`save_dicom_seg` maps slices back to the source instances.
"""

from __future__ import annotations

import gzip
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from medvit import __version__
from medvit.errors import ImageReadError, MedvitError
from medvit.fileio import atomic_path, atomic_write_bytes


class ExportError(MedvitError):
    """A prediction cannot be written in the input's space (unsupported or mismatched input)."""


def to_input_grid(volume: np.ndarray | torch.Tensor, shape: Sequence[int], mode: str = "trilinear") -> np.ndarray:
    """Resize a (D, H, W) volume of the model grid to the input's (D, H, W) ``shape``.

    Args:
        volume: probabilities (``mode="trilinear"``) or a binary mask (``mode="nearest"``).
        shape: the input volume's spatial shape (as :func:`medvit.data.io.read_image` returns it).
        mode: ``trilinear`` or ``nearest``.

    Returns:
        float32 array of ``shape``.
    """
    t = torch.as_tensor(np.asarray(volume, dtype=np.float32))[None, None]
    if tuple(t.shape[2:]) != tuple(shape):
        kwargs = {"align_corners": False} if mode == "trilinear" else {}
        t = F.interpolate(t, size=tuple(int(s) for s in shape), mode=mode, **kwargs)
    return t[0, 0].numpy().astype(np.float32)


def save_nifti_like(volume: np.ndarray, reference: str | Path, out_path: str | Path,
                    dtype: type | np.dtype = np.float32) -> Path:
    """Write ``volume`` (D, H, W) in the canonical voxel order of ``reference`` (a NIfTI file,
    as read by :func:`medvit.data.io.read_image`) to ``out_path`` on the reference's own voxel
    grid, orientation and affine (sform and qform copied), atomically.

    Raises:
        ExportError: ``volume``'s shape is not the reference's spatial shape.
        ImageReadError: the reference is not a readable NIfTI.
    """
    import nibabel as nib

    reference = Path(reference)
    try:
        ref = nib.load(str(reference))
    except Exception as exc:  # nibabel raises many types for a bad header
        raise ImageReadError(reference, f"unreadable NIfTI header ({exc})") from exc
    ref_shape = tuple(int(s) for s in ref.shape[:3])
    ref_ornt = nib.io_orientation(ref.affine)
    canon_ornt = nib.orientations.axcodes2ornt(("R", "A", "S"))
    to_canon = nib.orientations.ornt_transform(ref_ornt, canon_ornt)
    canon_shape = tuple(int(s) for s in nib.orientations.apply_orientation(np.empty(ref_shape, np.uint8),
                                                                            to_canon).shape)
    vol = np.asarray(volume)
    if vol.shape != canon_shape[::-1]:
        raise ExportError(f"prediction of shape {vol.shape} does not fit {reference} (canonical (z, y, x) shape "
                          f"{canon_shape[::-1]}); resize it with to_input_grid first")
    xyz = np.transpose(vol, (2, 1, 0))  # (z, y, x) -> (x, y, z) of the canonical grid
    back = nib.orientations.apply_orientation(xyz, nib.orientations.ornt_transform(canon_ornt, ref_ornt))
    header = ref.header.copy()
    header.set_data_dtype(dtype)
    img = nib.Nifti1Image(np.ascontiguousarray(back).astype(dtype), ref.affine, header)
    img.set_sform(ref.affine, code=int(ref.header["sform_code"]) or 1)
    img.set_qform(ref.affine, code=int(ref.header["qform_code"]) or 1)
    img.header["scl_slope"], img.header["scl_inter"] = 1.0, 0.0
    data = img.to_bytes()
    if str(out_path).endswith(".gz"):
        data = gzip.compress(data, compresslevel=6, mtime=0)
    return atomic_write_bytes(out_path, data)


def dicom_source_files(path: str | Path) -> list[Path]:
    """The DICOM instances of a series folder (or the single file), sorted as
    :func:`medvit.data.io.read_image` stacks them: by position along the slice normal."""
    import pydicom

    path = Path(path)
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    datasets = []
    for f in files:
        try:
            ds = pydicom.dcmread(str(f), stop_before_pixels=True)
        except Exception:  # not DICOM (e.g. a README in the folder): read_image skips it too
            continue
        datasets.append((f, ds))
    if not datasets:
        raise ExportError(f"no DICOM instance found in {path}")

    def position(item) -> float:
        ds = item[1]
        iop = np.asarray(getattr(ds, "ImageOrientationPatient", [1, 0, 0, 0, 1, 0]), float)
        ipp = np.asarray(getattr(ds, "ImagePositionPatient", [0, 0, float(getattr(ds, "InstanceNumber", 0))]), float)
        return float(np.dot(np.cross(iop[:3], iop[3:]), ipp))

    return [f for f, _ in sorted(datasets, key=position)]


def dicom_series_affine(source: str | Path) -> np.ndarray:
    """The RAS voxel-to-world affine of a DICOM series as :func:`medvit.data.io.read_image` stacks
    it, for a NIfTI array in (x, y, z) = (column, row, slice) order: from the first slice's
    ImagePositionPatient, ImageOrientationPatient and PixelSpacing and the step between slice
    positions (one slice: the normal times SpacingBetweenSlices or SliceThickness).

    Raises:
        ExportError: the instances lack the geometry (position, orientation, pixel spacing).
    """
    import pydicom

    files = dicom_source_files(source)
    headers = [pydicom.dcmread(str(f), stop_before_pixels=True) for f in files]
    ds = headers[0]
    if any(k not in ds for k in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")) or \
            int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
        raise ExportError(f"{source}: no per-slice ImagePositionPatient/ImageOrientationPatient/PixelSpacing; "
                          "its geometry cannot be written as NIfTI")
    iop = np.asarray(ds.ImageOrientationPatient, float)
    row_dir, col_dir = iop[:3], iop[3:]  # along a row (increasing column), along a column (increasing row)
    row_spacing, col_spacing = (float(v) for v in ds.PixelSpacing)  # between rows, between columns
    first = np.asarray(ds.ImagePositionPatient, float)
    if len(headers) > 1:
        step = (np.asarray(headers[-1].ImagePositionPatient, float) - first) / (len(headers) - 1)
    else:
        normal = np.cross(row_dir, col_dir)
        step = normal * float(getattr(ds, "SpacingBetweenSlices", None) or getattr(ds, "SliceThickness", None) or 1.0)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = row_dir * col_spacing, col_dir * row_spacing, step, first
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def save_nifti_dicom_grid(volume: np.ndarray, source: str | Path, out_path: str | Path,
                          dtype: type | np.dtype = np.float32) -> Path:
    """Write ``volume`` (D, H, W) on the grid of the DICOM series ``source`` (slices in
    :func:`dicom_source_files` order, rows, columns) as NIfTI with that series' RAS affine.

    Raises:
        ExportError: no geometry in the series, or a shape that does not fit it.
    """
    import nibabel as nib

    vol = np.asarray(volume)
    files = dicom_source_files(source)
    if vol.ndim != 3 or vol.shape[0] != len(files):
        raise ExportError(f"prediction of shape {vol.shape} does not fit the {len(files)} slice(s) of {source}")
    affine = dicom_series_affine(source)
    img = nib.Nifti1Image(np.ascontiguousarray(np.transpose(vol, (2, 1, 0))).astype(dtype), affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    data = img.to_bytes()
    if str(out_path).endswith(".gz"):
        data = gzip.compress(data, compresslevel=6, mtime=0)
    return atomic_write_bytes(out_path, data)


def save_dicom_seg(mask: np.ndarray, source: str | Path, out_path: str | Path, patient_id: str,
                   label: str = "csPCa lesion", series_description: str = "medvit lesion segmentation") -> Path:
    """Write a binary DICOM Segmentation of ``mask`` referencing the source series.

    Args:
        mask: (D, H, W) 0/1 on the source's grid, slices in :func:`dicom_source_files` order.
        source: the DICOM series folder (or multi-frame file) the mask was predicted on.
        out_path: the ``.dcm`` file to write.
        patient_id: the pseudonymous id of the manifest; replaces the source's identifiers
            (patient name, birth date, other ids) so no DICOM identifier leaves the pipeline.
            The study/series UIDs stay: a viewer needs them to overlay the SEG on its source.

    Raises:
        ExportError: the mask does not match the source's slices or size.
    """
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    files = dicom_source_files(source)
    sources = [pydicom.dcmread(str(f)) for f in files]
    mask = (np.asarray(mask) > 0).astype(np.uint8)
    frames = sum(int(getattr(ds, "NumberOfFrames", 1)) for ds in sources)
    if mask.shape[0] != frames or mask.shape[1:] != (int(sources[0].Rows), int(sources[0].Columns)):
        raise ExportError(f"mask of shape {mask.shape} does not fit the {frames} frame(s) of "
                          f"{int(sources[0].Rows)}x{int(sources[0].Columns)} in {source}")
    description = hd.seg.SegmentDescription(
        segment_number=1, segment_label=label,
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Neoplasm,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name="medvit", version=__version__, family=codes.cid7162.ArtificialIntelligence))
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=mask,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=[description],
        series_instance_uid=hd.UID(), series_number=900, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="medvit", manufacturer_model_name="medvit", software_versions=__version__,
        device_serial_number="0", series_description=series_description)
    seg.PatientName = ""
    seg.PatientID = str(patient_id)
    seg.PatientBirthDate = ""
    for keyword in ("OtherPatientIDs", "OtherPatientNames", "PatientAddress", "AccessionNumber",
                    "ReferringPhysicianName", "InstitutionName", "InstitutionAddress", "StationName", "StudyID"):
        if keyword in seg:
            setattr(seg, keyword, "")
    # highdicom copies the sources' equipment (institution, station) into this sequence
    if "ContributingEquipmentSequence" in seg:
        del seg.ContributingEquipmentSequence
    _mark_deidentified(seg)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_path) as tmp:
        seg.save_as(str(tmp), enforce_file_format=True)
    return out_path


def _mark_deidentified(ds) -> None:
    """Declare the DICOM basic application level confidentiality profile (PS3.15 E.1):
    PatientIdentityRemoved YES and the profile's code (DCM 113100) in
    DeidentificationMethodCodeSequence."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    code = Dataset()
    code.CodeValue = "113100"
    code.CodingSchemeDesignator = "DCM"
    code.CodeMeaning = "Basic Application Confidentiality Profile"
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "medvit: PS3.15 basic application confidentiality"  # LO: 64 characters at most
    ds.DeidentificationMethodCodeSequence = Sequence([code])
