"""Metadata without PHI: the scanner identity from DICOM tags, and salted patient keys.

Only the tags in ``pipeline.io.readers.DICOM_TAGS`` are ever read; of the patient tags only PatientID, and
it is hashed (``patient_key``) before it leaves the reading function. Patient name, birth date, institution,
accession number and physicians are never read, so they cannot reach the manifest, a report, a log line or
MLflow. For formats without patient tags, ``patients.csv`` (``source,patient``) in the input root names the
patient of each source; its values are hashed the same way.
"""

from __future__ import annotations

import csv
import io
import os

from pipeline.config import UserError
from pipeline.ingest.manifest import DEFAULT_PHI_SALT, patient_key


def resolve_salt(salt: str | None = None) -> str:
    """``salt``, else ``$ANATDIFF_PHI_SALT``, else the project default (fine for public data only)."""
    return salt if salt is not None else os.environ.get("ANATDIFF_PHI_SALT", DEFAULT_PHI_SALT)


def scanner_key(tags: dict[str, str | None]) -> str:
    """``manufacturer|model|kernel`` from DICOM tags (``unknown`` when all three are missing); ``|`` inside a
    value becomes ``/``."""
    parts = [(tags.get(k) or "").replace("|", "/") for k in
             ("Manufacturer", "ManufacturerModelName", "ConvolutionKernel")]
    return "|".join(parts) if any(parts) else "unknown"


def parse_patients_csv(text: str, where: str = "patients.csv") -> dict[str, str]:
    """``source -> patient`` from CSV text with a header ``source,patient``. Raises UserError naming the line
    for a missing column, an empty value or a source listed twice with different patients."""
    reader = csv.DictReader(io.StringIO(text))
    if not reader.fieldnames or not {"source", "patient"} <= {f.strip() for f in reader.fieldnames}:
        raise UserError(f"{where}: needs a header line 'source,patient', got {reader.fieldnames}")
    out: dict[str, str] = {}
    for n, rec in enumerate(reader, start=2):
        rec = {k.strip(): (v or "").strip() for k, v in rec.items() if k}
        source, patient = rec["source"].strip("/"), rec["patient"]
        if not source or not patient:
            raise UserError(f"{where} line {n}: 'source' and 'patient' must both be non-empty")
        if out.get(source, patient) != patient:
            raise UserError(f"{where} line {n}: source '{source}' is listed twice with different patients")
        out[source] = patient
    return out


def patient_keys(patients: dict[str, str], salt: str | None = None) -> dict[str, str]:
    """``source -> patient_key`` (salted sha256) of a ``parse_patients_csv`` table."""
    salt = resolve_salt(salt)
    return {source: patient_key(patient, salt) for source, patient in patients.items()}


def key_for_source(source: str, keys: dict[str, str]) -> str | None:
    """The patient key of ``source`` (``folder#series`` falls back to its folder), or None."""
    return keys.get(source) or keys.get(source.split("#", 1)[0])
